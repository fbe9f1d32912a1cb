"""The training paths of issue 12 on CUDA (skipped with the reason where torch sees no GPU):
native-only bf16 and the fp16 scaler, QLoRA's non-reentrant checkpointing, packed attention
without device-to-host syncs, and bit-exact resume with deterministic algorithms.

tests/test_train_gpu_paths.py checks the same decisions on the CPU.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import MemoryTracker
from loft.core.config import validate_config
from loft.core.errors import TrainingInterrupted
from test_train_gpu_paths import _config, _qkv

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_auto_precision_is_native_bf16_or_fp16_with_a_scaler(tmp_path: Path, tiny_model: Path):
    from loft.train.device import plan_placement

    p = plan_placement(validate_config(_config(tmp_path, tiny_model)))
    major, _ = torch.cuda.get_device_capability()
    assert p.device == "cuda" and p.precision == ("bf16" if major >= 8 else "fp16")


def test_fp16_training_with_the_scaler_learns_on_cuda(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    import loft.train.sft as sft

    cfg = validate_config(
        _config(tmp_path, tiny_model, precision="fp16", max_steps=30, lr=3e-3, save_every=10)
    )
    tracker = MemoryTracker()
    result = sft.train(cfg, progress=False, tracker=tracker)
    assert "fp16 autocast with a gradient scaler" in result.summary["placement"]
    assert all(math.isfinite(x) for x in tracker.losses)
    assert sum(tracker.losses[-5:]) < 0.7 * sum(tracker.losses[:5]), tracker.losses


def test_qlora_checkpointing_is_non_reentrant_on_cuda(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install '.[gpu]')")
    import loft.train.sft as sft

    cfg = validate_config(
        {
            **_config(tmp_path, tiny_model, gradient_checkpointing=True, max_steps=3),
            "method": "qlora",
        }  # fmt: skip
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sft.train(cfg, progress=False, tracker=MemoryTracker())
    assert result.summary["status"] == "completed"
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_attention_on_cuda_never_syncs_and_matches_per_example_sdpa(dtype):
    """With the host bounds given, a packed row's attention issues no device-to-host copy
    (sync debug mode raises on one); bf16 uses flash-attn's varlen kernel where installed."""
    import torch.nn.functional as F

    from loft.train.attention import BOUNDS_KEY, packed_attention

    q, k, v, cu = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _qkv([37, 5, 90]))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    module = torch.nn.Module().eval()
    cu_dev = torch.tensor(cu, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = packed_attention(
            module, q, k, v, None, cu_seq_lens_q=cu_dev, max_length_q=90, **{BOUNDS_KEY: tuple(cu)}
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        alone = F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(out[:, s:e], alone.transpose(1, 2), **tol)


def test_deterministic_resume_on_cuda_is_bit_exact(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    import loft.train.sft as sft

    def cfg(name: str):
        return validate_config(_config(tmp_path, tiny_model, name, deterministic=True))

    whole = sft.train(cfg("whole"), progress=False, tracker=MemoryTracker())
    with pytest.raises(TrainingInterrupted):
        sft.train(cfg("stopped"), progress=False, tracker=MemoryTracker(stop_after=3))
    resumed = sft.train(cfg("stopped"), resume=True, progress=False, tracker=MemoryTracker())
    assert resumed.summary["sessions"][-1]["start_step"] == 3
    a = load_file(str(whole.run_dir / "adapter/adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
