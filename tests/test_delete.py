"""Deleting what a newcomer expects to delete: a registry version (never one an alias serves), a
run, a stored model (never silently one that registered versions are built on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_lora_adapter, run_cli, trained_tiny_home

pytestmark = pytest.mark.unit


def test_registry_delete_refuses_an_aliased_version_and_never_reuses_a_number(
    loft_home: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from loft import registry
    from loft.core.errors import NotFoundError

    folder = make_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    for _ in range(3):
        registry.register(folder, name="gone")
    registry.move_alias("gone", "champion", 2, reason="test")
    digest = registry.get_version("gone:1").to_dict()["weights_digest"]

    assert run_cli("registry", "delete", "gone:2", "--yes") == 2
    assert "@champion points at" in capsys.readouterr().err.replace("is what ", "")
    assert run_cli("registry", "delete", "gone", "--yes") == 2  # names no version
    capsys.readouterr()

    assert run_cli("registry", "delete", "gone:1", "--yes", "--reason", "leaked data") == 0
    with pytest.raises(NotFoundError):
        registry.get_version("gone:1")
    (listed,) = registry.list_models()
    assert (listed["latest"], listed["n_versions"]) == (3, 2)
    tomb = loft_home / "registry" / "gone" / "1"
    assert [p.name for p in tomb.iterdir()] == ["DELETED.json"]
    record = json.loads((tomb / "DELETED.json").read_text())
    assert record["why"] == "leaked data" and record["weights_digest"] == digest
    assert registry.history("gone")[-1]["deleted"] == 1
    capsys.readouterr()
    assert run_cli("registry", "history", "gone") == 0
    assert "deleted version 1" in capsys.readouterr().out
    assert registry.register(folder, name="gone").version == 4  # 1 is not handed out again
    assert registry.get_version("gone@champion").version == 2  # aliases still resolve


def test_runs_delete_removes_the_run_but_not_what_it_registered(
    tmp_path: Path, tiny_model: Path, _session_home: Path, monkeypatch, capsys
):
    from loft.core.config import validate_config
    from loft.registry import get_version
    from loft.tracking import mlflow_client
    from loft.train import train

    home, run_dir, _data, cfg = trained_tiny_home(tmp_path, _session_home, tiny_model)
    monkeypatch.setenv("LOFT_HOME", str(home))
    cfg["register"] = {"name": "kept"}
    summary = train(validate_config(cfg), progress=False).summary
    assert run_cli("runs", "delete", str(run_dir), "--yes") == 0
    out = capsys.readouterr().out
    assert not run_dir.exists() and "kept:1 stays in the registry" in out
    assert mlflow_client().get_run(summary["mlflow_run_id"]).info.lifecycle_stage == "deleted"
    assert get_version("kept:1").card["lineage"]["run"]["run_id"] == summary["run_id"]

    live = home / "runs" / "live-run"  # a run whose summary says it is still running
    live.mkdir(parents=True)
    (live / "resolved.yaml").write_text("base_model: x\ndata: {train: /x.jsonl}\n")
    (live / "run_summary.json").write_text(json.dumps({"run_id": "live-run", "status": "running"}))
    assert run_cli("runs", "delete", "live-run", "--yes") == 2
    assert "--force" in capsys.readouterr().err and live.exists()
    assert run_cli("runs", "delete", "live-run", "--yes", "--force") == 0
    assert not live.exists()


def test_models_remove_guards_versions_built_on_it(
    loft_home: Path, tiny_model: Path, tmp_path: Path, capsys
):
    from loft import registry
    from loft.models import add_model, list_models

    add_model(tiny_model, "tiny-added")
    adapter = make_lora_adapter(tmp_path / "ad", "tiny-added", seed=2)
    registry.register(adapter, name="on-added")
    assert registry.versions_built_on("tiny-added") == ["on-added:1"]

    assert run_cli("models", "remove", "tiny-added", "--yes") == 2
    assert "on-added:1" in capsys.readouterr().err
    assert any(m["name"] == "tiny-added" for m in list_models())
    assert run_cli("models", "remove", "tiny-added", "--yes", "--force") == 0
    assert not any(m["name"] == "tiny-added" for m in list_models())
    assert not list((loft_home / "models").glob("*tiny-added*"))  # no half copy left
    assert run_cli("models", "remove", "no-such-model", "--yes") == 2
