"""`loft train` checks the planner's memory estimate against this device before loading a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from loft.core.config import validate_config
from loft.core.errors import HardwareError


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
    tokens, trained = largest_micro_batch(rows, plan)
    mbs = [mb for s in range(2) for mb in plan.micro_batches(s)]
    largest = max(mbs, key=lambda mb: sum(len(rows[i]["input_ids"]) for i in mb))
    assert tokens == sum(len(rows[i]["input_ids"]) for i in largest)
    # positions that predict a trained token: k per example, less one where the first token is
    # itself labelled (nothing predicts it) -- the (30, 30) example counts 29
    predicted = {10: 2, 50: 10, 30: 29, 5: 1}
    assert trained == sum(predicted[len(rows[i]["input_ids"])] for i in largest) / tokens
    # every example is drawn once per epoch, so over one epoch the largest pair is what we got
    assert tokens <= 50 + 30


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

    monkeypatch.setattr(preflight, "device_capacity", lambda device: 1 << 20)  # a 1 MiB device
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
