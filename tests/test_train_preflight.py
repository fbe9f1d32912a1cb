"""`loft train` checks the planner's memory estimate against this device before loading a model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import run_cli
from loft.core.config import validate_config
from loft.core.errors import HardwareError
from loft.core.specs import TrainConfig


def _long_chat(path: Path, n: int, words: int) -> Path:
    msg = [
        {"role": "user", "content": "say ipsum"},
        {"role": "assistant", "content": "ipsum " * words},
    ]
    path.write_text("".join(json.dumps({"messages": msg}) + "\n" for _ in range(n)))
    return path


def _config(tmp_path: Path, tiny_model: Path, *, n: int, words: int, mbs: int, seq: int) -> dict:
    return {
        "base_model": str(tiny_model),
        "data": {
            "train": str(_long_chat(tmp_path / "long.jsonl", n, words)),
            "eval_fraction": 0.0,
            "max_seq_len": seq,
            "dedup": False,
        },
        "lora": {"r": 2, "alpha": 4},
        "training": {"max_steps": 1, "micro_batch_size": mbs, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
        "register": False,
    }


@pytest.mark.unit
def test_largest_micro_batch_follows_the_step_plan():
    from loft.train.preflight import largest_micro_batch
    from loft.train.sft import StepPlan

    rows = [
        {"input_ids": [0] * n, "labels": [-100] * (n - k) + [1] * k}
        for n, k in [(10, 2), (50, 10), (30, 30), (5, 1)]
    ]
    plan = StepPlan(n_examples=4, micro_batch_size=2, grad_accum=1, seed=0, total_steps=2)
    shape = largest_micro_batch(rows, plan)
    assert shape.packed and shape.rows == 1  # packed: one row of the examples end to end
    tokens = shape.positions
    mbs = [mb for s in range(2) for mb in plan.micro_batches(s)]
    largest = max(mbs, key=lambda mb: sum(len(rows[i]["input_ids"]) for i in mb))
    assert tokens == shape.width == sum(len(rows[i]["input_ids"]) for i in largest)
    # positions that predict a trained token: k per example, less one where the first token is
    # itself labelled (nothing predicts it) -- the (30, 30) example counts 29
    predicted = {10: 2, 50: 10, 30: 29, 5: 1}
    assert shape.trained == sum(predicted[len(rows[i]["input_ids"])] for i in largest)
    assert shape.trained_fraction == shape.trained / tokens
    # every example is drawn once per epoch, so over one epoch the largest pair is what we got
    assert tokens <= 50 + 30


# one 2,048-token example among seven of 100 (issue 12): the last 1,000 and the last 40 tokens
# labelled, so 1,000 + 7 x 40 = 1,280 positions predict a trained token
LONG_AND_SHORT = [
    {"input_ids": [5] * n, "labels": [-100] * (n - k) + [7] * k}
    for n, k in [(2048, 1000)] + [(100, 40)] * 7
]


def _arith_config(*, packing: bool, method: str = "full") -> TrainConfig:
    """Eight examples in one micro-batch, one step, fp32, no checkpointing; the model's shape is
    given by ``_hand_arch`` (no model is read)."""
    return validate_config(
        {
            "base_model": "hand-arch",
            "method": method,
            "data": {"train": "unused.jsonl", "packing": packing, "max_seq_len": 4096},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
            "training": {
                "max_steps": 1,
                "micro_batch_size": 8,
                "precision": "fp32",
                "gradient_checkpointing": False,
            },
            "output_dir": "unused",
            "register": False,
        }
    )


def _hand_arch(monkeypatch):
    """hidden 8, 2 layers, 2 heads of 4 (1 kv head), SwiGLU 16, vocab 10 (tests/test_planner's)."""
    import loft.train.preflight as preflight
    from loft.planner import Arch

    arch = Arch(
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=10,
        tie_embeddings=False,
    )
    monkeypatch.setattr(preflight, "_arch", lambda config: arch)
    return arch


def _placement(config: TrainConfig, device: str):
    from loft.train.device import plan_placement

    return replace(plan_placement(config), device=device)


@pytest.mark.unit
def test_padded_micro_batch_is_its_rows_times_the_longest_example():
    """Without packing the collator right-pads every example to the micro-batch's longest: 8 rows
    x 2,048 = 16,384 positions, not the 2,748 tokens the examples hold (those are what packing
    builds: one row of 2,748)."""
    from loft.train.preflight import largest_micro_batch
    from loft.train.sft import StepPlan

    plan = StepPlan(n_examples=8, micro_batch_size=8, grad_accum=1, seed=0, total_steps=1)
    padded = largest_micro_batch(LONG_AND_SHORT, plan, packing=False)
    assert (padded.rows, padded.width, padded.trained, padded.packed) == (8, 2048, 1280, False)
    assert padded.positions == 16_384 and padded.trained_fraction == 1280 / 16_384
    packed = largest_micro_batch(LONG_AND_SHORT, plan, packing=True)
    assert (packed.rows, packed.width, packed.trained) == (1, 2048 + 7 * 100, 1280)
    # over the limit of drawn examples, the bound is the same shape from the longest examples
    bound = largest_micro_batch(LONG_AND_SHORT, plan, packing=False, limit=1)
    assert (bound.rows, bound.width, bound.trained) == (8, 2048, 1280)


@pytest.mark.unit
def test_padded_preflight_estimates_the_batch_the_collator_builds(monkeypatch):
    """`data.packing: false`: the estimate is for 8 rows x 2,048 positions, the batch `collate`
    builds for the plan's micro-batch, with logits for its 1,280 trained positions; by hand for
    full fine-tuning in fp32 on CPU (the padded batch takes SDPA's math path, which keeps the
    attention scores: micro_batch x heads x seq x seq per layer)."""
    from loft.data.packing import collate, count_label_tokens
    from loft.train.preflight import run_preflight
    from loft.train.sft import make_plan

    _hand_arch(monkeypatch)
    cfg = _arith_config(packing=False)
    plan = make_plan(cfg, len(LONG_AND_SHORT))
    pre = run_preflight(cfg, _placement(cfg, "cpu"), LONG_AND_SHORT, plan, capacity_bytes=1 << 40)
    s = pre.estimate.settings
    assert (s.micro_batch, s.seq_len, s.packing) == (8, 2048, False)
    assert pre.micro_batch_tokens == 16_384 and "8 rows padded to 2,048" in pre.shape_from

    (mb,) = plan.micro_batches(0)
    batch = collate([LONG_AND_SHORT[i] for i in mb], packing=False, pad_token_id=0)
    assert tuple(batch["input_ids"].shape) == (8, 2048)
    assert batch["input_ids"].numel() == pre.micro_batch_tokens
    assert count_label_tokens(batch) == 1280 == s.logit_fraction * pre.micro_batch_tokens

    b = pre.estimate.breakdown
    # per position per layer: norms 2 x 2 x 8 + q,k,v,out (2*2 + 2*1) x 4 + SwiGLU 4 x 16 = 120
    # elements x 4 B = 480 B, plus the scores, 2 heads x 2,048 x 4 B = 16,384 B; x 2 layers x
    # 16,384 positions, plus the embedding output and final norm, 2 x 16,384 x 8 x 4 B
    assert b["activations"] == 2 * 16_384 * (480 + 16_384) + 2 * 16_384 * 32 == 553_648_128
    # the LM head on the 1,280 trained positions: vocab 10 x (4 B + two fp32 loss copies)
    assert b["logits"] == 1280 * 10 * (4 + 2 * 4) == 153_600


@pytest.mark.unit
def test_preflight_on_cuda_projects_only_the_trained_positions(monkeypatch):
    """loft's loss projects only the positions whose next token is trained, on every device: on
    cuda too the logits are for 1,280 positions, not the 2,748 the packed row holds."""
    from loft.train.preflight import run_preflight
    from loft.train.sft import make_plan

    _hand_arch(monkeypatch)
    cfg = _arith_config(packing=True)
    plan = make_plan(cfg, len(LONG_AND_SHORT))
    pre = run_preflight(cfg, _placement(cfg, "cuda"), LONG_AND_SHORT, plan, capacity_bytes=1 << 40)
    s = pre.estimate.settings
    assert (s.device, s.micro_batch, s.seq_len, s.packing) == ("cuda", 1, 2748, True)
    assert pre.estimate.breakdown["logits"] == 1280 * 10 * (4 + 2 * 4) == 153_600


@pytest.mark.unit
def test_padded_suggestions_halve_the_rows_not_the_row_length(monkeypatch):
    """Halving micro_batch_size takes rows out of a padded batch; each row is still as long as
    the longest example it may hold (a packed row would get shorter instead)."""
    from loft.planner import estimate
    from loft.train.preflight import run_preflight, suggestions
    from loft.train.sft import make_plan

    arch = _hand_arch(monkeypatch)
    cfg = _arith_config(packing=False)
    plan = make_plan(cfg, len(LONG_AND_SHORT))
    pre = run_preflight(cfg, _placement(cfg, "cpu"), LONG_AND_SHORT, plan, capacity_bytes=1)
    changes = suggestions(pre, cfg)
    ckpt = pre.estimate.settings.with_(gradient_checkpointing=True)
    halvings = [(4, 2), (2, 4), (1, 8)]
    assert [c for c, _ in changes] == ["--set training.gradient_checkpointing=true"] + [
        f"--set training.gradient_checkpointing=true --set training.micro_batch_size={m} "
        f"--set training.grad_accum={a}"
        for m, a in halvings
    ]
    expected = [estimate(arch, ckpt).total_bytes] + [
        estimate(arch, ckpt.with_(micro_batch=m)).total_bytes for m, _ in halvings
    ]
    assert [t for _, t in changes] == expected
    assert ckpt.seq_len == 2048


class _GivenPlan:
    """The StepPlan interface (what pre-flight reads of it), with the micro-batches given."""

    def __init__(self, micro_batches: list[list[int]]):
        self._mbs = micro_batches
        self.total_steps, self.per_step = 1, sum(len(mb) for mb in micro_batches)
        self.micro_batch_size = max(len(mb) for mb in micro_batches)

    def micro_batches(self, step: int) -> list[list[int]]:
        return self._mbs


@pytest.mark.unit
def test_padded_largest_is_the_largest_estimate_not_the_most_positions(monkeypatch):
    """Padded on CPU, attention keeps heads x width scores per position: one row of 390 tokens
    needs more than four rows of 100 (400 positions), so pre-flight estimates the one row."""
    from loft.planner import estimate
    from loft.train.preflight import largest_micro_batch, run_preflight

    arch = _hand_arch(monkeypatch)
    rows = [{"input_ids": [5] * n, "labels": [7] * n} for n in (100, 100, 100, 100, 390)]
    plan = _GivenPlan([[0, 1, 2, 3], [4]])
    most = largest_micro_batch(rows, plan, packing=False)  # by positions: 4 x 100
    assert (most.rows, most.width) == (4, 100)

    cfg = _arith_config(packing=False)
    pre = run_preflight(cfg, _placement(cfg, "cpu"), rows, plan, capacity_bytes=1 << 40)
    s = pre.estimate.settings
    assert (s.micro_batch, s.seq_len, s.packing, pre.micro_batch_tokens) == (1, 390, False, 390)
    # per position per layer: 480 B + 2 heads x width x 4 B of scores (fp32, full fine-tuning)
    four_rows = estimate(arch, s.with_(micro_batch=4, seq_len=100, logit_fraction=396 / 400))
    assert four_rows.breakdown["activations"] == 2 * 400 * (480 + 2 * 100 * 4) + 2 * 400 * 8 * 4
    assert pre.estimate.breakdown["activations"] == 2 * 390 * (480 + 2 * 390 * 4) + 2 * 390 * 32
    assert pre.estimate.total_bytes > four_rows.total_bytes


@pytest.mark.unit
def test_refusal_names_the_breakdown_and_the_changes(tmp_path, tiny_model, loft_home):
    from loft.data import prepare_dataset
    from loft.models import load_tokenizer, resolve_model
    from loft.train.device import plan_placement
    from loft.train.preflight import refuse_if_too_big, run_preflight
    from loft.train.sft import _rows, make_plan

    cfg = validate_config(_config(tmp_path, tiny_model, n=8, words=100, mbs=8, seq=512))
    ds = prepare_dataset(cfg.data, load_tokenizer(resolve_model(str(tiny_model))), progress=False)
    rows = _rows(ds.train)
    pre = run_preflight(cfg, plan_placement(cfg), rows, make_plan(cfg, len(rows)))
    assert pre.fits and pre.micro_batch_tokens == sum(len(r["input_ids"]) for r in rows)
    small = run_preflight(
        cfg, plan_placement(cfg), rows, make_plan(cfg, len(rows)), capacity_bytes=1 << 20
    )
    with pytest.raises(HardwareError) as err:
        refuse_if_too_big(small, cfg)
    text = str(err.value)
    assert "nothing was loaded" in text and "1.0 MiB" not in text
    for item in ("weights", "activations", "logits", "overhead"):
        assert item in text
    assert "--force" in text


@pytest.mark.unit
def test_train_refuses_a_run_that_cannot_fit_here(tmp_path, tiny_model, loft_home, capsys):
    """128 examples x ~1000 trained tokens in one micro-batch: the 49k-vocabulary logits alone need
    about 70 GiB, more than this machine (or CI) has; the run stops before the model is loaded."""
    import yaml

    from loft.data import prepare_dataset
    from loft.models import load_tokenizer, resolve_model
    from loft.train.device import plan_placement
    from loft.train.preflight import run_preflight
    from loft.train.sft import _rows, make_plan

    cfg = _config(tmp_path, tiny_model, n=128, words=960, mbs=128, seq=1024)
    # pre-flight compares against the device the run would use (GPU memory where CUDA is)
    spec = validate_config(cfg)
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    rows = _rows(prepare_dataset(spec.data, tok, progress=False).train)
    pre = run_preflight(spec, plan_placement(spec), rows, make_plan(spec, len(rows)))
    if pre.fits:
        pytest.skip(f"this machine's {pre.device} has {pre.capacity_bytes / 2**30:.0f} GiB: fits")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = run_cli("train", str(path), "-q")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing was loaded" in err and "GiB" in err
    assert "training.gradient_checkpointing=true" in err  # the changes that would fit, as --set
    assert "training.micro_batch_size=" in err
    assert not (tmp_path / "run").exists()  # the run never started: no run dir blocks a retry


@pytest.mark.unit
def test_force_trains_past_a_refused_preflight(
    tmp_path, tiny_model, loft_home, monkeypatch, capsys
):
    """On a device too small for the estimate `loft train` refuses (exit 2, no run dir);
    `--force` trains anyway and records the estimate that did not fit."""
    import yaml

    import loft.train.preflight as preflight

    monkeypatch.setattr(
        preflight, "device_capacity", lambda device, ranks=1: 1 << 20
    )  # a 1 MiB device
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model, n=4, words=20, mbs=2, seq=128)))
    assert run_cli("train", str(path), "-q") == 2
    assert "nothing was loaded" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    assert run_cli("train", str(path), "-q", "--force") == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 1
    assert s["memory_estimate"]["fits"] is False
    assert s["memory_estimate"]["capacity_bytes"] == 1 << 20
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.unit
def test_completed_run_records_estimate_beside_measured_peak(tmp_path, tiny_model, loft_home):
    from loft.train import train

    res = train(validate_config(_config(tmp_path, tiny_model, n=4, words=20, mbs=2, seq=128)),
                progress=False)  # fmt: skip
    s = json.loads((res.run_dir / "run_summary.json").read_text())
    est = s["memory_estimate"]
    assert est["fits"] and est["device"] == "cpu"
    assert set(est["breakdown"]) >= {"weights", "activations", "logits", "overhead"}
    assert est["total_bytes"] == sum(est["breakdown"].values())
    assert s["peak_mem_bytes"] > 0


@pytest.mark.integration
def test_peak_memory_is_this_process_not_the_parent_it_was_forked_from():
    """Linux carries ru_maxrss across execve; a trainer started from a big process must still
    report its own peak (the planner's calibration compares against it)."""
    import subprocess
    import sys

    ballast = bytearray(600 * 1024**2)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from loft.train.device import peak_memory_bytes; print(peak_memory_bytes('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 500 * 1024**2  # the child imports little; the parent holds 600 MiB
    del ballast
