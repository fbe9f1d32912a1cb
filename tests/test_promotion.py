"""Gated promotion and rollback through `loft registry promote` (exit 0 moved, 3 refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli, trained_tiny_home

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """A LOFT_HOME with one tiny LoRA run registered three times with chosen metrics."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("promotion")
    home, run_dir, data, cfg = trained_tiny_home(root, _session_home, tiny_model, repeat=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        train(validate_config(cfg), progress=False)
        from loft.registry import register

        register(run_dir, name="bot", metrics={"eval_loss": 1.00, "exact_match": 0.90})
        register(run_dir, name="bot", metrics={"eval_loss": 1.50, "exact_match": 0.60})
        register(run_dir, name="bot", metrics={"eval_loss": 0.95, "exact_match": 0.92})
        gate = root / "gate.yaml"
        gate.write_text("gate:\n  - eval_loss <= champion + 0.02\n  - exact_match >= 0.8\n")
        mp.setenv("COLUMNS", "200")
        yield gate


_run = run_cli


def test_promote_refuse_force_and_rollback(home: Path, capsys: pytest.CaptureFixture):
    from loft.registry import get_version, history

    gate = str(home)
    # no champion yet: the relative check passes, the absolute one holds
    assert _run("registry", "promote", "bot:1", "--to", "champion", "--gate", gate) == 0
    assert get_version("bot@champion", verify=False).version == 1

    # a deliberately worse version: refused with the failing checks named, alias unchanged
    capsys.readouterr()
    assert _run("registry", "promote", "bot:2", "--to", "champion", "--gate", gate) == 3
    err = capsys.readouterr()
    text = err.out + err.err
    assert "eval_loss <= champion + 0.02" in text and "exact_match >= 0.8" in text
    assert "FAIL" in text
    assert get_version("bot@champion", verify=False).version == 1

    # a better one passes the relative check
    assert _run("registry", "promote", "bot:3", "--to", "champion", "--gate", gate) == 0
    assert get_version("bot@champion", verify=False).version == 3

    # --force moves past a failing gate and says so in the history
    assert _run("registry", "promote", "bot:2", "--gate", gate, "--force", "--json") == 0
    last = history("bot")[-1]
    assert last["to"] == 2 and last["forced"] is True
    assert any(not c["passed"] for c in last["gate"])
    assert {"who", "when", "from", "to", "why", "gate"} <= set(last)

    # rollback restores the previous champion in one command
    assert _run("registry", "rollback", "bot") == 0
    assert get_version("bot@champion", verify=False).version == 3


def test_tampered_candidate_is_never_promoted(home: Path):
    from loft.registry import get_version

    mv = get_version("bot:1", verify=False)
    weights = next(p for p in mv.path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    try:
        assert _run("registry", "promote", "bot:1", "--gate", str(home)) == 1  # IntegrityError
    finally:
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
