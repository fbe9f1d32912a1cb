"""The training code paths a first GPU user takes, checked on this CPU (issue 12): the decisions
they make (precision, checkpointing mode, determinism), the fp16 gradient scaler, packed attention
that never reads boundaries back from the device, and parameter counts of 4-bit weights.

tests/test_gpu_train.py runs the same paths on CUDA wherever it is present.
"""

from __future__ import annotations

import json
import os
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import CHAT_ROWS, MemoryTracker
from loft.core.config import validate_config
from loft.core.errors import HardwareError, TrainingInterrupted
from loft.train.device import GpuCapability, Placement, choose_precision

ROOT = Path(__file__).resolve().parents[1]
T4 = GpuCapability("Tesla T4", 7, 5)
V100 = GpuCapability("Tesla V100-SXM2-32GB", 7, 0)
A100 = GpuCapability("NVIDIA A100-SXM4-80GB", 8, 0)


def _config(tmp_path: Path, tiny_model: Path, name: str = "run", **training) -> dict:
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        rows = [
            [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
            for i in range(3)
            for q, a in CHAT_ROWS
        ]
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return {
        "base_model": str(tiny_model),
        "method": "lora",
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": 64, "dedup": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "max_steps": 6,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "save_every": 2,
            "keep_checkpoints": 5,
            **training,
        },  # fmt: skip
        "output_dir": str(tmp_path / name),
        "register": False,
    }


# ---------------------------------------------------------------- 4: native bf16 only


@pytest.mark.unit
@pytest.mark.parametrize(
    ("gpu", "cpu_bf16", "want"),
    [
        (A100, False, ("bf16", "")),
        (T4, False, ("fp16", "Tesla T4 has no native bf16")),
        (V100, True, ("fp16", "Tesla V100-SXM2-32GB has no native bf16")),
        (None, True, ("bf16", "")),
        (None, False, ("fp32", "")),
    ],
)
def test_auto_precision_is_bf16_only_where_native(gpu, cpu_bf16, want):
    assert choose_precision("auto", gpu=gpu, cpu_bf16=cpu_bf16) == want


@pytest.mark.unit
def test_explicit_precisions_refuse_what_the_hardware_lacks():
    with pytest.raises(HardwareError, match="no native bf16") as e:
        choose_precision("bf16", gpu=T4, cpu_bf16=True)
    assert "training.precision=fp16" in e.value.hint
    with pytest.raises(HardwareError, match="CUDA GPUs only"):
        choose_precision("fp16", gpu=None, cpu_bf16=True)
    assert choose_precision("fp16", gpu=A100, cpu_bf16=False) == ("fp16", "")
    assert choose_precision("fp32", gpu=T4, cpu_bf16=False) == ("fp32", "")


@pytest.mark.unit
def test_placement_on_a_t4_is_fp16_although_torch_counts_emulated_bf16(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path
):
    """torch.cuda.is_bf16_supported() says True on a T4 (emulation counts by default): the
    placement must still choose fp16 with a scaler, and say why in the run header."""
    from loft.train.device import plan_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    p = plan_placement(validate_config(_config(tmp_path, tiny_model)))
    assert p.device == "cuda" and p.precision == "fp16" and p.grad_scaler
    assert p.autocast_dtype is torch.float16
    assert p.describe() == (
        "cuda, fp16 autocast with a gradient scaler (Tesla T4 has no native bf16), "
        "gradient checkpointing on"
    )


@pytest.mark.unit
def test_models_load_and_compute_in_the_placements_dtype(tmp_path: Path, tiny_model: Path):
    """LoRA on a GPU loads its frozen base in the compute dtype; QLoRA computes in it (bf16
    was hard-coded, an emulated dtype on a T4)."""
    from loft.train.model_setup import load_dtypes

    t4 = Placement("cuda", "fp16", True)
    h100 = Placement("cuda", "bf16", True)
    assert load_dtypes("qlora", t4) == (torch.float16, torch.float16)
    assert load_dtypes("qlora", h100) == (torch.bfloat16, torch.bfloat16)
    assert load_dtypes("lora", t4) == (torch.float16, torch.float16)
    assert load_dtypes("full", t4) == (torch.float32, torch.float16)  # fp32 master weights
    assert load_dtypes("lora", Placement("cpu", "bf16", False)) == (torch.float32, torch.bfloat16)


@pytest.mark.unit
def test_fp16_runs_scale_the_loss_and_resume_with_the_scalers_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path, loft_home: Path
):
    """The fp16 path (GPUs without native bf16) on this CPU: the loop scales the loss with a
    GradScaler, checkpoints keep the scaler's state, and a run stopped at step 3 and resumed
    ends with the weights of a run nothing stopped."""
    import loft.train.sft as sft

    fp16 = Placement("cpu", "fp16", False)
    monkeypatch.setattr(sft, "plan_placement", lambda config: fp16)
    scaled: list[float] = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scaled.append(float(self.get_scale()))
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    whole = sft.train(
        validate_config(_config(tmp_path, tiny_model, "whole")),
        progress=False,
        tracker=MemoryTracker(),
    )
    assert whole.summary["status"] == "completed"
    assert scaled and scaled[0] == 65536.0  # the scaler's initial scale: the loss was scaled
    assert "fp16 autocast with a gradient scaler" in whole.summary["placement"]

    cfg = validate_config(_config(tmp_path, tiny_model, "stopped"))
    with pytest.raises(TrainingInterrupted):
        sft.train(cfg, progress=False, tracker=MemoryTracker(stop_after=3))
    state = json.loads(
        (tmp_path / "stopped/checkpoints/step-00000003/trainer_state.json").read_text()
    )
    assert state["grad_scaler"]["scale"] > 0
    resumed = sft.train(cfg, resume=True, progress=False, tracker=MemoryTracker())
    assert resumed.summary["sessions"][-1]["start_step"] == 3
    a = load_file(str(whole.run_dir / "adapter/adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 5: QLoRA checkpointing mode


@pytest.mark.unit
def test_kbit_preparation_keeps_non_reentrant_checkpointing(tiny_model: Path):
    """PEFT's prepare_model_for_kbit_training given no kwargs passes {} on, skipping
    transformers' use_reentrant=False default: torch then checkpoints reentrantly and warns
    that it will raise. loft's preparation passes the mode explicitly."""
    from loft.models import load_causal_lm, resolve_model
    from loft.train.model_setup import prepare_kbit

    model = load_causal_lm(resolve_model(str(tiny_model)))
    model.is_loaded_in_4bit = True  # what PEFT checks; the weights stay fp32 on this CPU
    model = prepare_kbit(model, Placement("cuda", "bf16", True))
    funcs = [m._gradient_checkpointing_func for m in model.modules() if m is not model and
             getattr(m, "gradient_checkpointing", False)]  # fmt: skip
    assert funcs and all(f.keywords == {"use_reentrant": False} for f in funcs)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(
            input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])
        ).loss.backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


# ---------------------------------------------------------------- 8: packed attention


def _qkv(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q = torch.randn(1, heads, n, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=g) for _ in range(2))
    cu = [0]
    for x in lengths:
        cu.append(cu[-1] + x)
    return q, k, v, cu


@pytest.mark.unit
def test_packed_attention_slices_by_host_bounds_never_reading_the_device_tensor():
    """The boundaries tensor lives on the device (where a varlen kernel reads it); reading it
    back (.tolist()) stalls a GPU in every layer. A meta tensor stands for the device copy here:
    any read of it raises, so the attention must slice by the collator's host bounds."""
    import torch.nn.functional as F

    from loft.train.attention import BOUNDS_KEY, packed_attention

    q, k, v, cu = _qkv([5, 3, 7])
    module = torch.nn.Module().eval()
    on_device = torch.tensor(cu, dtype=torch.int32, device="meta")
    out, _ = packed_attention(
        module, q, k, v, None, cu_seq_lens_q=on_device, max_length_q=7, **{BOUNDS_KEY: tuple(cu)}
    )
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        alone = F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(out[:, s:e], alone.transpose(1, 2))


@pytest.mark.unit
def test_training_loss_passes_host_bounds_to_packed_attention(tiny_model: Path):
    """loss_sum on a packed batch whose boundary tensor sits on a device it must not read from
    (meta) gives the loss of the same batch with the tensor on the CPU: the longest example and
    the bounds come from the collator's Python ints."""
    from loft.data import tokenize_conversation
    from loft.data.packing import pack_batch
    from loft.models import load_causal_lm, load_tokenizer, resolve_model
    from loft.train.attention import register
    from loft.train.loss import loss_sum

    info = resolve_model(str(tiny_model))
    tok = load_tokenizer(info)
    model = load_causal_lm(info).eval()
    model.set_attn_implementation(register())
    exs = [
        tokenize_conversation(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok,
            max_seq_len=64,
        )
        for q, a in CHAT_ROWS[:3]
    ]  # fmt: skip
    batch = pack_batch(exs)
    assert batch["seq_bounds"] == tuple(batch["cu_seq_lens"].tolist())
    with torch.no_grad():
        want, n = loss_sum(model, batch)
        got, m = loss_sum(model, {**batch, "cu_seq_lens": batch["cu_seq_lens"].to("meta")})
    assert n == m and torch.equal(want, got)


@pytest.mark.unit
def test_varlen_kernel_only_for_half_precision_cuda_tensors():
    from loft.train.attention import use_flash

    assert use_flash(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)) is None  # CPU: SDPA path


# ---------------------------------------------------------------- 9: deterministic resume


@pytest.mark.unit
def test_deterministic_runs_turn_on_deterministic_algorithms_and_restore_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path, loft_home: Path
):
    import loft.train.sft as sft
    from loft.train.device import plan_placement

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = validate_config(_config(tmp_path, tiny_model, deterministic=True, max_steps=2))
    assert plan_placement(cfg).deterministic
    seen: list[tuple[bool, str | None]] = []
    real_build = sft.build_model

    def build(*args, **kwargs):  # the flags as the model is built and trained
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))  # fmt: skip
        return real_build(*args, **kwargs)

    monkeypatch.setattr(sft, "build_model", build)
    result = sft.train(cfg, progress=False, tracker=MemoryTracker())
    assert seen == [(True, ":4096:8")]
    assert result.summary["placement"].endswith("deterministic algorithms")
    # the process is left as it was: later work in it (a job worker, a study) is not slowed
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.unit
def test_an_op_without_a_deterministic_kernel_is_reported_with_the_way_out():
    from loft.train.device import determinism_error

    err = RuntimeError(
        "scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'."
    )
    out = determinism_error(err, Placement("cuda", "bf16", True, deterministic=True))
    assert isinstance(out, HardwareError) and "scatter_add_cuda_kernel" in out.message
    assert "training.deterministic=false" in out.hint
    assert determinism_error(err, Placement("cuda", "bf16", True)) is None


# ---------------------------------------------------------------- 10: counts and extras


@pytest.mark.unit
def test_4bit_parameters_count_the_weights_they_hold():
    """bitsandbytes packs two 4-bit weights per byte: numel() of a quantised [64, 32] weight
    is 1,024 packed bytes; its quant_state keeps the real shape."""
    from loft.train.model_setup import count_params

    model = torch.nn.Module()
    packed = torch.nn.Parameter(torch.zeros(1024, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([64, 32]))
    model.w = packed
    no_state = torch.nn.Parameter(torch.zeros(512, 1, dtype=torch.uint8), requires_grad=False)
    no_state.bnb_quantized = True
    model.v = no_state
    model.lora = torch.nn.Parameter(torch.zeros(4, 32))
    assert count_params(model) == (128, 2048 + 1024 + 128)


@pytest.mark.unit
def test_every_optional_dependency_is_used_by_the_code():
    """An extra installs only what loft imports (liger-kernel sat in `gpu` and was never used)."""
    import re

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    source = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    modules = {"llama-cpp-python": "llama_cpp"}  # distributions whose module is named otherwise
    for extra, reqs in extras.items():
        if extra == "dev":  # tools for this repository, not imported by loft
            continue
        for req in reqs:
            dist = re.split(r"[<>=\[; ]", req)[0]
            module = modules.get(dist, dist.replace("-", "_"))
            assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), (extra, req)
