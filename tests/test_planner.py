"""The planner: arithmetic on hand-checked cases, published figures, presets, CLI, speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loft.cli.main import app
from loft.core.errors import ConfigError, NotFoundError
from loft.planner import (
    BREAKDOWN_KEYS,
    Arch,
    RunSettings,
    arch_from_config,
    cost_defaults,
    estimate,
    fit,
    get_gpu,
    get_preset,
    parse_tokens,
    preset_info,
    preset_names,
    recommend,
    resolve_arch,
    settings_from_train_config,
    time_and_cost,
)
from loft.planner import memory as est_mod

runner = CliRunner()
GB, GIB = 10**9, 1024**3

# hidden 8, 2 layers, 2 heads of 4 (1 kv head), SwiGLU 16, vocab 10, untied
TINY = Arch(
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=10,
    tie_embeddings=False,
)


@pytest.mark.unit
def test_tiny_param_count_by_hand():
    # embed 10*8=80, lm_head 80; per layer: q 8*8=64, k 8*4=32, v 32, o 64 -> 192;
    # MLP 3*8*16=384; norms 2*8=16 -> 592; x2 layers = 1184; final norm 8. Total 1352.
    assert TINY.n_params == 1352
    assert TINY.quantizable_params == 2 * (192 + 384)
    tied = Arch(**{**TINY.__dict__, "tie_embeddings": True})
    assert tied.n_params == 1352 - 80


@pytest.mark.unit
@pytest.mark.parametrize("name", preset_names())
def test_preset_param_counts_match_published(name):
    published = preset_info(name)["published_params"]
    assert get_preset(name).n_params == pytest.approx(published, rel=0.02)


@pytest.mark.unit
def test_lora_and_dora_trainable_by_hand():
    # rank 2, all-linear, per layer: q 2*(8+8)=32, k 2*(8+4)=24, v 24, o 32, gate 2*(8+16)=48,
    # up 48, down 2*(16+8)=48 -> 256; x2 layers = 512. DoRA adds a magnitude per output:
    # 8+4+4+8+16+16+8 = 64 per layer -> +128 = 640. q_proj,v_proj only: (32+24)*2 = 112.
    s = RunSettings(method="lora", lora_rank=2, device="cpu", precision="fp32")
    assert estimate(TINY, s).trainable_params == 512
    assert estimate(TINY, s.with_(method="dora")).trainable_params == 640
    assert estimate(TINY, s.with_(lora_targets=("q_proj", "v_proj"))).trainable_params == 112


@pytest.mark.unit
def test_full_fp32_breakdown_by_hand():
    s = RunSettings(
        method="full",
        precision="fp32",
        device="cpu",
        micro_batch=1,
        seq_len=4,
        gradient_checkpointing=False,
    )
    e = estimate(TINY, s)
    b = e.breakdown
    assert list(b) == list(BREAKDOWN_KEYS)
    # fp32 weights and grads 1352*4 = 5408 each; AdamW m+v 1352*8 = 10816, no master in fp32
    assert (b["weights"], b["gradients"], b["optimizer"]) == (5408, 5408, 10816)
    assert b["quant_constants"] == b["trainable"] == 0
    # per layer per token (elements): norms 2 norms * 2 copies * 8 = 32; q,k,v,attn-out
    # (2*2+2*1)*4 = 24; SwiGLU 4*16 = 64 -> 120 elements * 4 B = 480 B;
    # x 2 layers x 4 tokens = 3840, plus embedding output and final norm 2*4*8*4 = 256 -> 4096
    per_layer = (2 * est_mod.NORM_SAVED_COPIES * 8 + 24 + est_mod.MLP_SAVED_COPIES * 16) * 4
    assert b["activations"] == 2 * 4 * per_layer + 256 == 4096
    # logits 4 tokens * vocab 10 * (4 B + 2 fp32 loss copies * 4 B) = 480
    assert b["logits"] == 4 * 10 * (4 + est_mod.LOSS_FP32_COPIES * 4) == 480
    subtotal = 5408 + 5408 + 10816 + 4096 + 480
    overhead = est_mod.CPU_RUNTIME_BYTES + est_mod.CPU_ALLOCATOR_FRACTION * subtotal
    assert b["overhead"] == round(overhead)
    assert e.total_bytes == sum(b.values())


@pytest.mark.unit
def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    s = RunSettings(method="full", precision="fp32", device="cpu", micro_batch=1, seq_len=4)
    off = estimate(TINY, s.with_(gradient_checkpointing=False)).breakdown["activations"]
    on = estimate(TINY, s.with_(gradient_checkpointing=True)).breakdown["activations"]
    # on: 2 layer inputs * 4 tokens * 8 * 4 B = 256, one layer 4 * 480 = 1920, +256 = 2432
    assert (off, on) == (4096, 2432)


@pytest.mark.unit
def test_qlora_weights_and_constants_by_hand():
    s = RunSettings(method="qlora", lora_rank=2, micro_batch=1, seq_len=4)
    b = estimate(TINY, s).breakdown
    # 1152 quantised params * 0.5 B = 576; the other 200 upcast to fp32 = 800 -> 1376
    assert b["weights"] == 1152 // 2 + 200 * est_mod.QLORA_UNQUANTISED_BYTES == 1376
    # double quant: 1152 * (1/64 + 4/(64*256)) = 18 + 0.28 -> 18
    assert b["quant_constants"] == 18
    # adapters are fp32: 512 * 4 = 2048 weights, 2048 grads, AdamW 512 * 8 = 4096
    assert (b["trainable"], b["gradients"], b["optimizer"]) == (2048, 2048, 4096)


@pytest.mark.unit
def test_qlora_activations_between_projections_are_fp32_by_hand():
    """peft's prepare_model_for_kbit_training upcasts embeddings and norms to fp32, so the
    residual stream, the norms' outputs and what the 4-bit projections return (their input's
    dtype: the MLP intermediates) are fp32; attention keeps bf16 q, k, v and output."""
    s = RunSettings(
        method="qlora", lora_rank=2, lora_dropout=0.0, micro_batch=1, seq_len=4,
        gradient_checkpointing=False, device="cuda",
    )  # fmt: skip
    # per layer per token: norms 2 x 2 copies x 8 = 32 and SwiGLU 4 x 16 = 64 elements x 4 B
    # = 384; q, k, v, out (2*2 + 2*1) x 4 = 24 elements x 2 B = 48. Adapters (no dropout: the
    # cast to fp32): inputs 8+8+8+8+8+8+16 = 64 x 4 B + 7 modules x rank 2 x 4 B = 312 -> 744
    layer = (32 + 64) * 4 + 24 * 2 + (64 * 4 + 7 * 2 * 4)
    assert layer == 744
    ends = 2 * 4 * 8 * 4  # embedding output and final norm, fp32: 256
    b = estimate(TINY, s).breakdown
    assert b["activations"] == 2 * 4 * layer + ends == 6208
    # checkpointing keeps each layer's input (the fp32 residual) and recomputes one layer
    ckpt = estimate(TINY, s.with_(gradient_checkpointing=True)).breakdown
    assert ckpt["activations"] == 2 * 4 * 8 * 4 + 4 * layer + ends == 3488
    # the LM head (fp32 after the upcast) runs under autocast: bf16 logits + two fp32 copies
    assert b["logits"] == 4 * 10 * (2 + 2 * 4) == 400
    # LoRA on a bf16 base keeps all of them in bf16: (32 + 64 + 24) x 2 + 312, ends 2 x 4 x 8 x 2
    lora = estimate(TINY, s.with_(method="lora")).breakdown
    assert lora["activations"] == 2 * 4 * (120 * 2 + 312) + 128


@pytest.mark.unit
def test_flops_per_token_by_hand():
    # N (matmul) = 2 layers * 576 + LM head 80 = 1232; attention A = 4*2 layers*2 heads*4*seq 4
    # = 256. Full: 6N + 3A = 7392 + 768 = 8160; checkpointing adds 2N + A = 2720 -> 10880.
    s = RunSettings(method="full", seq_len=4, gradient_checkpointing=False)
    assert estimate(TINY, s).flops_per_token == 8160
    assert estimate(TINY, s.with_(gradient_checkpointing=True)).flops_per_token == 10880
    # LoRA rank 2 (512 adapter params): 4N + 6*512 + 3A = 4928 + 3072 + 768 = 8768
    lora = RunSettings(method="lora", lora_rank=2, seq_len=4, gradient_checkpointing=False)
    assert estimate(TINY, lora).flops_per_token == 8768


@pytest.mark.unit
def test_zero_sharding_divides_states():
    arch = get_preset("llama-3.1-8b")
    s = RunSettings(method="full", micro_batch=1, seq_len=2048)
    one = estimate(arch, s).breakdown
    z1 = estimate(arch, s.with_(n_gpus=8, zero_stage=1)).breakdown
    z2 = estimate(arch, s.with_(n_gpus=8, zero_stage=2)).breakdown
    z3 = estimate(arch, s.with_(n_gpus=8, zero_stage=3)).breakdown
    assert z1["optimizer"] == pytest.approx(one["optimizer"] / 8, abs=1)
    assert z1["gradients"] == one["gradients"] and z2["gradients"] == pytest.approx(
        one["gradients"] / 8, abs=1
    )
    assert z2["weights"] == one["weights"] > z3["weights"] > one["weights"] / 8
    # FSDP as loft runs it: the layers' eighth plus the replicated embeddings and LM head
    rest = (arch.embedding_params + arch.lm_head_params + arch.hidden_size) * 2
    layers = arch.n_params * 2 - rest
    gathered = 2 * (arch.layer_linear_params + arch.layer_other_params) * 2
    assert z3["weights"] == pytest.approx(layers / 8 + rest + gathered, rel=1e-6)
    assert z3["optimizer"] == pytest.approx(
        one["optimizer"] * (layers / 8 + rest) / (layers + rest)
    )
    # the replicated 1.05 B embedding and LM head params cost 16 B each: 2 x 80 GB do not hold a
    # full fine-tune of the 8B; 4 do
    full = s.with_(precision="bf16", zero_stage=3)
    assert not fit(estimate(arch, full.with_(n_gpus=2)), "a100-80").fits
    assert fit(estimate(arch, full.with_(n_gpus=4)), "a100-80").fits


@pytest.mark.unit
def test_fsdp_on_cpu_still_casts_every_layer_under_bf16_autocast():
    """Sharding the fp32 base does not remove the bf16 autocast copies: every rank casts each
    gathered layer (bench/distributed.py measured the fsdp ranks' peaks at the single run's)."""
    arch = get_preset("llama-3.1-8b")
    s = RunSettings(method="lora", precision="bf16", device="cpu", seq_len=256)
    one, z3 = estimate(arch, s), estimate(arch, s.with_(n_gpus=2, zero_stage=3))
    casts = est_mod.CPU_AUTOCAST_WEIGHT_COPIES * 2 * arch.n_params
    assert z3.breakdown["weights"] < one.breakdown["weights"]
    assert z3.breakdown["overhead"] > casts
    fp32 = estimate(arch, s.with_(precision="fp32", n_gpus=2, zero_stage=3))
    assert fp32.breakdown["overhead"] < casts


# --- published figures ---------------------------------------------------------------------------


@pytest.mark.unit
def test_qlora_70b_fits_one_80gb_gpu():
    arch = get_preset("llama-3.1-70b")
    s = RunSettings(method="qlora", seq_len=2048, micro_batch=1, gradient_checkpointing=True)
    e = estimate(arch, s)
    assert fit(e, "a100-80").fits and fit(e, "h100-sxm").fits
    assert not fit(e, "a100-40").fits
    assert 35 * GB < e.breakdown["weights"] < 45 * GB  # ~0.5 B/param + fp32 embeddings


@pytest.mark.unit
@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b", "qwen2.5-7b"])
def test_full_finetune_7b_8b_needs_about_16_bytes_per_param(name):
    arch = get_preset(name)
    e = estimate(arch, RunSettings(method="full", precision="bf16", micro_batch=1, seq_len=2048))
    b = e.breakdown
    states = b["weights"] + b["gradients"] + b["optimizer"]  # 2 + 2 + (8 + 4 master) B/param
    assert states == pytest.approx(16 * arch.n_params, rel=1e-6)
    assert 100 * GB < states < 130 * GB
    assert not fit(e, "a100-80").fits
    assert fit(estimate(arch, e.settings.with_(n_gpus=4, zero_stage=3)), "a100-80").fits


@pytest.mark.unit
def test_lora_and_qlora_8b_on_a_24gb_card():
    arch = get_preset("llama-3.1-8b")
    q = estimate(arch, RunSettings(method="qlora", seq_len=2048, micro_batch=1))
    assert fit(q, "rtx-4090").fits
    lora = estimate(arch, RunSettings(method="lora", seq_len=512, micro_batch=1))
    assert fit(lora, "rtx-4090").fits
    assert not fit(estimate(arch, lora.settings.with_(method="full")), "rtx-4090").fits


@pytest.mark.unit
def test_eight_bit_optimizer_is_two_bytes_per_param():
    arch = get_preset("mistral-7b")
    s = RunSettings(method="full", precision="fp32", micro_batch=1, seq_len=512)
    adam = estimate(arch, s).breakdown["optimizer"]
    eight = estimate(arch, s.with_(optimizer="adamw-8bit")).breakdown["optimizer"]
    assert (adam, eight) == (8 * arch.n_params, 2 * arch.n_params)


@pytest.mark.unit
@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_every_preset_and_method_answers(method):
    """Pure arithmetic (no torch import, see the CLI test); timing is not asserted here (machines
    are noisy): `loft plan` for any preset answers in ~0.2 s including interpreter start."""
    for name in preset_names():
        plan = recommend(get_preset(name), RunSettings(method=method), gpu="h100-sxm")
        assert plan.estimate.total_bytes > 0 and plan.estimate.flops_per_token > 0


# --- hardware, suggestions, time and cost --------------------------------------------------------


@pytest.mark.unit
def test_recommend_smallest_gpu_and_suggestions():
    arch = get_preset("llama-3.1-8b")
    small = recommend(arch, RunSettings(method="qlora", seq_len=1024, micro_batch=1))
    assert small.recommended_gpu in {"l4", "a10"}  # 22.5 GiB cards; cheaper than the 24 GiB ones
    s = RunSettings(method="full", micro_batch=8, grad_accum=2, gradient_checkpointing=False)
    plan = recommend(arch, s, gpu="rtx-4090")
    assert not plan.fits
    changes = [sg.change for sg in plan.suggestions]
    assert changes[0].startswith("turn gradient checkpointing on")
    mb = plan.suggestions[1].settings
    assert mb.micro_batch * mb.grad_accum >= 16  # effective batch kept
    assert any(sg.fits for sg in plan.suggestions)
    assert "keep full" in changes[-1] and "ZeRO-3" in changes[-1]


@pytest.mark.unit
def test_time_and_cost_by_hand():
    arch = get_preset("llama-3.1-8b")
    e = estimate(arch, RunSettings(method="lora", seq_len=2048, micro_batch=1))
    g, d = get_gpu("a100-80"), cost_defaults()
    tc = time_and_cost(e, g, tokens=parse_tokens("50M"), epochs=2, mfu=0.5)
    hours = 100e6 * e.flops_per_token / (312e12 * 0.5) / 3600
    assert tc.hours == pytest.approx(hours)
    assert tc.on_demand_usd == pytest.approx(hours * g.on_demand_usd_h)
    per_h = g.purchase_usd / (3 * 8760 * d.utilisation) + g.power_kw * d.electricity_usd_per_kwh
    assert tc.on_prem_usd_per_gpu_hour == pytest.approx(per_h)
    be = g.purchase_usd / (3 * 8760 * (g.on_demand_usd_h - g.power_kw * 0.15))
    assert tc.break_even_utilisation == pytest.approx(be)
    q = estimate(arch, e.settings.with_(method="qlora"))
    assert time_and_cost(q, g, tokens=1000).mfu == d.mfu_qlora


@pytest.mark.unit
@pytest.mark.parametrize(
    "text,value", [("50M", 50_000_000), ("1.2B", 1_200_000_000), ("500k", 500_000), ("1_000", 1000)]
)
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["", "5X", "-3M", "0", "M"])
def test_parse_tokens_rejects(bad):
    with pytest.raises(ConfigError, match="bad token count"):
        parse_tokens(bad)


# --- architectures and settings ------------------------------------------------------------------


@pytest.mark.unit
def test_arch_from_hf_configs(tmp_path):
    qwen = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert resolve_arch(str(tmp_path)).n_params == get_preset("qwen2.5-0.5b").n_params
    mixtral = {**qwen, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    a = arch_from_config(mixtral)
    assert (a.num_experts, a.experts_per_token, a.attention_bias) == (8, 2, False)
    gemma = arch_from_config({**qwen, "model_type": "gemma2", "head_dim": 256})
    assert gemma.norms_per_layer == 4 and gemma.head_dim == 256
    phi = arch_from_config({**qwen, "model_type": "phi3", "tie_word_embeddings": False})
    assert phi.fused_projections and not phi.tie_embeddings
    with pytest.raises(ConfigError, match="hidden_size, num_hidden_layers"):
        arch_from_config({"vocab_size": 10})


@pytest.mark.unit
def test_resolve_arch_names_and_errors(tmp_path):
    assert resolve_arch("SmolLM2-135M-Instruct").name == "smollm2-135m"
    tiny = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}
    tiny.update(num_key_value_heads=1, intermediate_size=16, vocab_size=10)
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    resolved = resolve_arch("my-model", resolve_path=lambda ref: tmp_path)
    assert resolved.n_params == TINY.n_params

    def missing(ref: str) -> Path:
        raise NotFoundError(f"no model {ref}")

    with pytest.raises(NotFoundError, match="Did you mean llama-3.1-8b") as e:
        resolve_arch("lama-3.1-8b", resolve_path=missing)
    assert "qwen2.5-7b" in (e.value.hint or "")


@pytest.mark.unit
def test_fused_targets_and_unknown_targets():
    phi = get_preset("phi-3-mini")
    s = RunSettings(method="lora", lora_targets=("q_proj", "v_proj"))
    mods = est_mod.targeted_linears(phi, s.lora_targets)
    assert [m.name for m in mods] == ["qkv_proj"]
    with pytest.raises(ConfigError, match="not projections"):
        estimate(phi, s.with_(lora_targets=("qq_proj",)))


@pytest.mark.unit
def test_settings_validation_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        RunSettings(method="lorra", micro_batch=0, zero_stage=5)
    msg = str(e.value)
    assert "3 problems" in msg and "method" in msg and "micro_batch" in msg and "zero_stage" in msg


@pytest.mark.unit
def test_settings_from_train_config():
    from loft.core.config import validate_config

    cfg = validate_config(
        {
            "method": "qlora",
            "data": {"train": "x.jsonl", "max_seq_len": 512, "packing": False},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"micro_batch_size": 2, "grad_accum": 4},
        }
    )
    gpu = settings_from_train_config(cfg, device="cuda")
    assert (gpu.method, gpu.lora_rank, gpu.lora_targets) == ("qlora", 8, ("q_proj", "v_proj"))
    assert (gpu.seq_len, gpu.micro_batch, gpu.grad_accum, gpu.packing) == (512, 2, 4, False)
    assert (gpu.precision, gpu.gradient_checkpointing) == ("bf16", True)
    cpu = settings_from_train_config(cfg, device="cpu")
    assert (cpu.precision, cpu.gradient_checkpointing, cpu.device) == ("fp32", False, "cpu")


@pytest.mark.unit
def test_planner_never_imports_torch():
    src = Path(__file__).parents[1] / "src" / "loft" / "planner"
    for f in src.glob("*.py"):
        text = f.read_text()
        for lib in ("torch", "transformers", "mlflow", "loft.models", "loft.train"):
            assert f"import {lib}" not in text and f"from {lib}" not in text, (f.name, lib)


# --- CLI -----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cli_json_keys():
    args = ["plan", "--model", "llama-3.1-70b", "--method", "qlora", "--seq-len", "2048"]
    result = runner.invoke(app, [*args, "--gpu", "a100-80", "--tokens", "50M", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    for key in ("total_bytes", "breakdown", "fits", "recommended_gpu", "hours", "cost"):
        assert key in r
    assert r["fits"] is True and set(r["breakdown"]) == set(BREAKDOWN_KEYS)
    assert set(r["cost"]) == {"on_demand", "spot", "on_prem"} and r["hours"] > 0


@pytest.mark.unit
def test_cli_table_and_config(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("method: lora\ndata: {train: data.jsonl, max_seq_len: 256}\n")
    result = runner.invoke(app, ["plan", str(cfg), "--gpu", "rtx-3090", "--tokens", "2M"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "peak memory" in result.output
    assert "fits" in result.output and "cost:" in result.output


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from loft.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n    print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration
def test_cli_errors_exit_2_without_traceback_or_torch():
    out = _run_cli("plan", "--model", "lama-3.1-8b")
    assert out.returncode == 2
    assert "Did you mean llama-3.1-8b" in out.stderr and "Traceback" not in out.stderr
    out = _run_cli("plan", "--model", "llama-3.1-8b", "--tokens", "lots")
    assert out.returncode == 2 and "bad token count" in out.stderr
    out = _run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "a100")
    assert out.returncode == 2 and "unknown GPU" in out.stderr
    ok = _run_cli("plan", "--model", "mixtral-8x7b", "--method", "qlora", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "TORCH False" in ok.stderr
    # a config planned for a catalogue GPU is arithmetic too: no torch, no data read
    config = Path(__file__).parents[1] / "examples" / "support_tickets" / "lora.yaml"
    ok = _run_cli("plan", str(config), "--gpu", "l4", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "TORCH False" in ok.stderr
    out = _run_cli("plan", "--list", "--json")
    assert out.returncode == 0 and "TORCH False" in out.stderr


@pytest.mark.unit
def test_cli_dataset_fingerprint_tokens(loft_home):
    ds = loft_home / "datasets" / "abc123def"
    ds.mkdir(parents=True)
    (ds / "report.json").write_text(json.dumps({"stats": {"train": {"tokens": 2_000_000}}}))
    args = ["plan", "--model", "qwen2.5-0.5b", "--gpu", "l4", "--dataset", "abc123", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["time_cost"]["tokens"] == 2_000_000
    missing = runner.invoke(app, [*args[:-3], "--dataset", "zzz"])
    assert missing.exit_code != 0 and "no prepared dataset" in str(missing.exception)


def _train_configs() -> list[Path]:
    import yaml

    found = sorted((Path(__file__).parents[1] / "examples").glob("*/*.yaml"))
    return [p for p in found if "data" in (yaml.safe_load(p.read_text()) or {})]


def _other_device() -> str:
    """The device this machine does not have: a plan for it is arithmetic, whatever the host."""
    import torch

    return "cpu" if torch.cuda.is_available() else "cuda"


@pytest.mark.unit
@pytest.mark.parametrize("config", _train_configs(), ids=lambda p: p.name)
@pytest.mark.parametrize("target", ["gpu", "other-device"])
def test_every_example_config_plans_for_another_target(config, target):
    """Every shipped config plans for a catalogue GPU and for the device this machine lacks
    (arithmetic: no data read, nothing converted); this machine's plan is the pre-flight's,
    tested in test_plan_preflight.py."""
    args = ["--gpu", "h100-sxm"] if target == "gpu" else ["--device", _other_device()]
    result = runner.invoke(app, ["plan", str(config), *args, "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    device = "cuda" if target == "gpu" else args[1]
    assert r["model"] == "smollm2-135m" and r["settings"]["device"] == device
    import yaml

    assert r["settings"]["method"] == yaml.safe_load(config.read_text())["method"]
    assert r["assumptions"]["this_machine"] is False
