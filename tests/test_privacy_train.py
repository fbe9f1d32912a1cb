"""DP-SGD runs end to end on the tiny model: the adapter trains, the epsilon reported everywhere is
Opacus' accountant's for the run's (noise, sampling rate, steps, delta), a resumed run continues
the accounting and equals an uninterrupted one bit for bit, and a run that trains nothing fails
(opacus#820)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import linked_home

pytestmark = pytest.mark.integration

STEPS = 4


def _config(root: Path, tiny_model: Path, **training) -> dict:
    data = root / "chat.jsonl"
    rows = [(f"Question number {i}?", f"The answer is {i * 7}.") for i in range(40)]
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in rows
        )
    )
    return {
        "base_model": str(tiny_model),
        "data": {
            "train": str(data), "eval_fraction": 0.0, "max_seq_len": 64, "dedup": False,
            "packing": False,
        },
        "lora": {"r": 2, "alpha": 4},
        "training": {
            "max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "precision": "fp32",
            "save_every": 2, "lr": 1e-2, **training,
        },
        "output_dir": str(root / "run"),
        "register": {"name": "dp-tiny"},
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 0.5},
    }  # fmt: skip


def _train(cfg: dict, **kw):
    from loft.core.config import validate_config
    from loft.train import train

    return train(validate_config(cfg), progress=False, **kw)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, tiny_model, _session_home):
    root = tmp_path_factory.mktemp("dp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(linked_home(root, _session_home)))
        cfg = _config(root, tiny_model)
        result = _train(cfg)
        from loft.registry import get_version

        card = get_version("dp-tiny:1").card
        yield root, cfg, result, card


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_a_private_run_trains_the_adapter_and_reports_opacus_epsilon(dp_run):
    from opacus.accountants import RDPAccountant

    _, cfg, result, card = dp_run
    weights = _adapter(result.run_dir)
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it moved
    dp = result.summary["privacy"]
    assert dp["steps"] == STEPS and dp["noise_multiplier"] == 1.0 and dp["max_grad_norm"] == 0.5
    assert dp["sample_rate"] == 8 / 40 and dp["delta"] == 1e-5 and dp["accountant"] == "rdp"
    independent = RDPAccountant()
    for _ in range(STEPS):
        independent.step(noise_multiplier=1.0, sample_rate=8 / 40)
    eps = independent.get_epsilon(1e-5)
    assert dp["epsilon"] == pytest.approx(eps, abs=1e-6)
    lineage = json.loads((result.run_dir / "adapter" / "lineage.json").read_text())
    assert lineage["privacy"] == dp and lineage["metrics"]["dp_epsilon"] == dp["epsilon"]
    assert card["lineage"]["privacy"] == dp  # the registered version's card
    assert card["metrics"]["dp_epsilon"] == pytest.approx(eps, abs=1e-6)
    from loft.registry.card import describe_privacy

    assert describe_privacy(card["lineage"]["privacy"]).startswith(f"({eps:.3g}, 1e-05)-DP")


def test_registry_show_prints_the_guarantee(dp_run, capsys):
    from helpers import run_cli

    root, _, result, _ = dp_run
    eps = result.summary["privacy"]["epsilon"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(root / "home"))
        assert run_cli("registry", "show", "dp-tiny:1") == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "privacy:" in ln)
        assert f"({eps:.3g}, 1e-05)-DP per example" in line and "rdp accountant" in line
        assert run_cli("registry", "show", "dp-tiny:1", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["privacy"]["epsilon"] == eps


def test_the_tracker_holds_the_spent_epsilon(dp_run):
    from mlflow.tracking import MlflowClient

    root, _, result, _ = dp_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(root / "home"))
        from loft.tracking.mlflow_tracker import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(None))
        run = client.get_run(result.summary["mlflow_run_id"])
    assert run.data.metrics["privacy/epsilon"] == pytest.approx(
        result.summary["privacy"]["epsilon"]
    )
    assert float(run.data.params["dp.noise_multiplier"]) == 1.0
    assert run.data.params["dp.sampling"] == "poisson"


def test_resuming_continues_the_accounting_and_equals_the_uninterrupted_run(dp_run):
    root, cfg, result, _ = dp_run
    again = root / "resumed"
    shutil.copytree(result.run_dir, again)
    shutil.rmtree(again / "adapter")  # as if stopped after the step-2 checkpoint
    summary = json.loads((again / "run_summary.json").read_text())
    summary["status"] = "interrupted"
    (again / "run_summary.json").write_text(json.dumps(summary))
    assert [p.name for p in (again / "checkpoints").iterdir()] == ["step-00000002"]
    saved = json.loads((again / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert saved["privacy"]["history"] == [[1.0, 0.2, 2]]  # the accountant after 2 steps
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(root / "home"))
        resumed = _train({**cfg, "output_dir": str(again), "register": False}, resume=True)
    sessions = resumed.summary["sessions"]
    assert (sessions[-1]["start_step"], sessions[-1]["steps_run"]) == (2, STEPS - 2)
    assert resumed.summary["privacy"] == result.summary["privacy"]  # epsilon after all 4 steps
    a, b = _adapter(result.run_dir), _adapter(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same draws


def test_a_private_run_whose_adapter_does_not_move_fails(
    tmp_path, tiny_model, loft_home, monkeypatch
):
    """opacus#820: Opacus + PEFT reported epsilon while the weights stayed as they were. Here the
    optimizer's update is dropped; the run must fail instead of registering its starting point."""
    from loft.core.errors import TrainingDiverged

    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    cfg = _config(tmp_path, tiny_model, max_steps=1)
    with pytest.raises(TrainingDiverged) as e:
        _train(cfg)
    assert "no adapter weight changed in 1 DP-SGD steps" in e.value.message
    assert "opacus#820" in e.value.message
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and summary["privacy"]["steps"] == 1
    assert not (tmp_path / "run" / "adapter").exists()
