"""Continuous evaluation: `loft watch` marks a failing alias degraded and can roll it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli, trained_tiny_home

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """One tiny LoRA run registered twice; champion moved to 1, then to 2."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("watch")
    home, run_dir, data, cfg = trained_tiny_home(root, _session_home, tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        mp.setenv("COLUMNS", "200")
        train(validate_config(cfg), progress=False)
        from loft.registry import move_alias, register

        register(run_dir, name="watched", metrics={"eval_loss": 50.0})
        register(run_dir, name="watched", metrics={"eval_loss": 50.0})
        move_alias("watched", "champion", 1, reason="first")
        move_alias("watched", "champion", 2, reason="second")
        yield root, data


_run = run_cli


def _gate(root: Path, name: str, *exprs: str) -> str:
    path = root / name
    path.write_text("gate:\n" + "".join(f"  - {e}\n" for e in exprs))
    return str(path)


def test_watch_healthy_then_degraded_with_rollback(watched, capsys: pytest.CaptureFixture):
    from loft.evaluate.continuous import check_alias
    from loft.registry import get_version, history

    root, data = watched
    ok = _gate(root, "ok.yaml", "eval_loss <= 1000", "eval_loss <= champion + 1000")
    capsys.readouterr()
    assert _run("watch", "watched@champion", "--data", str(data), "--gate", ok, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["version"] == 2 and result["degraded"] is None
    assert [c["passed"] for c in result["checks"]] == [True, True]
    # compared with version 1 scored on the same file now (its declared 50.0 is on no known
    # data, so it is never compared), and that measurement is kept on version 1
    assert "skipped" not in result["checks"][1]["reason"]
    assert Path(data).name in result["checks"][1]["reason"]
    on_data = [e for e in get_version("watched:1", verify=False).card["evaluations"]
               if e["on"].get("path") == str(Path(data).resolve())]  # fmt: skip
    assert [e["source"] for e in on_data] == ["watch"]
    mv = get_version("watched@champion", verify=False)
    assert mv.version == 2 and mv.card["degraded"] is None
    assert "eval_loss" in mv.card["metrics"] and mv.card["metrics"]["eval_loss"] != 50.0

    # without --rollback: degraded, alias unchanged
    bad = _gate(root, "bad.yaml", "eval_loss <= 0.0001")
    direct = check_alias("watched@champion", data, bad)
    assert not direct["passed"] and direct["rolled_back_to"] is None
    assert "eval_loss <= 0.0001" in direct["degraded"]
    assert get_version("watched@champion", verify=False).version == 2

    # with --rollback: exit 3, the failing check named, champion back on version 1
    capsys.readouterr()
    code = _run("watch", "watched@champion", "--data", str(data), "--gate", bad, "--rollback")
    assert code == 3
    out = capsys.readouterr()
    assert "eval_loss <= 0.0001" in out.out + out.err and "FAIL" in out.out
    assert "now serves version 1" in out.err and "roll back with" not in out.err  # no stale hint
    assert get_version("watched@champion", verify=False).version == 1
    degraded = get_version("watched:2", verify=False).card["degraded"]
    assert "eval_loss <= 0.0001" in degraded["reason"]
    last = history("watched")[-1]
    assert last["rollback"] is True and last["from"] == 2 and last["to"] == 1
    assert get_version("watched:1", verify=False).card["degraded"] is None


def test_watch_relative_check_without_previous_is_skipped(watched):
    from loft.evaluate.continuous import check_alias
    from loft.registry import move_alias

    root, data = watched
    move_alias("watched", "solo", 1, reason="an alias that never moved before")
    gate = _gate(root, "solo.yaml", "eval_loss <= champion + 0.1", "task/acc >= 0.5")
    result = check_alias("watched@solo", data, gate, metrics=["eval_loss"])
    assert result["passed"] and result["degraded"] is None
    relative, other = result["checks"]
    assert relative["reason"].startswith("skipped: no previous version")
    assert other["reason"].startswith("skipped: 'task/acc' was not measured")


def test_watch_refuses_a_non_alias_ref(watched):
    from loft.core.errors import ConfigError
    from loft.evaluate.continuous import check_alias

    root, data = watched
    with pytest.raises(ConfigError, match="alias"):
        check_alias("watched:2", data, _gate(root, "g.yaml", "eval_loss <= 1"))
