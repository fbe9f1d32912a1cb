"""Gated promotion and rollback through `loft registry promote` (exit 0 moved, 3 refused), with
gates that compare only numbers measured on the same records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import CHAT_ROWS, run_cli, trained_tiny_home

pytestmark = pytest.mark.unit

GATE = "gate:\n  - eval_loss <= champion + 0.02\n  - eval_loss <= 100\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """A LOFT_HOME with a tuned tiny LoRA run (bot:1, bot:3) and a barely trained one (bot:2),
    plus two held-out files; nothing evaluated yet."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("promotion")
    home, run_dir, data, cfg = trained_tiny_home(root, _session_home, tiny_model, repeat=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        good = {**cfg, "training": {**cfg["training"], "max_steps": 12, "lr": 5e-3}}
        bad = {**cfg, "output_dir": str(root / "bad"), "training": {**good["training"]}}
        bad["training"]["lr"] = 1e-9
        train(validate_config(good), progress=False)
        train(validate_config(bad), progress=False)
        from loft.registry import register

        for run in (run_dir, root / "bad", run_dir):
            register(run, name="bot")
        other = root / "other.jsonl"  # held-out records the champion was never scored on
        rows = [[{"role": "user", "content": f"{q} Again."}, {"role": "assistant", "content": a}]
                for q, a in CHAT_ROWS]  # fmt: skip
        other.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
        gate = root / "gate.yaml"
        gate.write_text(GATE)
        mp.setenv("COLUMNS", "200")
        yield {"gate": str(gate), "data": str(data), "other": str(other), "root": root}


_run = run_cli


def _eval(ref: str, data: str, *extra: str) -> None:
    assert _run("eval", ref, "--data", data, "--metrics", "eval_loss", "-q", *extra) == 0


def _entries(ref: str, path: str) -> list[dict]:
    from loft.registry import get_version

    card = get_version(ref, verify=False).card
    return [e for e in card["evaluations"] if e["on"].get("path") == str(Path(path).resolve())]


def test_promote_refuse_force_and_rollback(home: dict, capsys: pytest.CaptureFixture):
    from loft.registry import get_version, history

    gate, data = home["gate"], home["data"]
    _eval("bot:1", data)
    # no champion yet: the relative check passes, the absolute one holds
    assert _run("registry", "promote", "bot:1", "--to", "champion", "--gate", gate) == 0
    assert get_version("bot@champion", verify=False).version == 1

    # a barely trained version, scored on the same file: refused, the failing check named
    _eval("bot:2", data)
    capsys.readouterr()
    assert _run("registry", "promote", "bot:2", "--to", "champion", "--gate", gate) == 3
    text = "".join(capsys.readouterr())
    assert "eval_loss <= champion + 0.02" in text and "FAIL" in text
    assert get_version("bot@champion", verify=False).version == 1

    # the tuned weights again, scored on the same file: equal to the champion, so it passes
    _eval("bot:3", data)
    assert _run("registry", "promote", "bot:3", "--to", "champion", "--gate", gate) == 0
    assert get_version("bot@champion", verify=False).version == 3

    # --force moves past a failing gate and says so in the history
    assert _run("registry", "promote", "bot:2", "--gate", gate, "--force", "--json") == 0
    last = history("bot")[-1]
    assert last["to"] == 2 and last["forced"] is True
    assert any(not c["passed"] for c in last["gate"])
    assert {"who", "when", "from", "to", "why", "gate"} <= set(last)
    capsys.readouterr()
    assert _run("registry", "history", "bot") == 0
    out = capsys.readouterr().out
    assert "gate FAIL: eval_loss <= champion + 0.02" in out and "{'" not in out

    # rollback restores the previous champion in one command
    assert _run("registry", "rollback", "bot") == 0
    assert get_version("bot@champion", verify=False).version == 3


def test_champion_without_a_comparable_number_is_measured_on_the_candidates_file(home: dict):
    """bot:1 (tuned) holds @fresh and was scored on `data`; bot:3 (the same weights) is scored
    on `other` only. Promotion evaluates bot:1 on `other` and compares like with like."""
    from loft.registry import get_version, move_alias

    move_alias("bot", "fresh", 1, reason="test")
    _eval("bot:1", home["data"])
    _eval("bot:3", home["other"])
    assert _entries("bot:1", home["other"]) == []
    assert _run("registry", "promote", "bot:3", "--to", "fresh", "--gate", home["gate"]) == 0
    (measured,) = _entries("bot:1", home["other"])
    assert measured["source"] == "gate" and measured["on"]["records"] == 3
    (theirs,) = _entries("bot:3", home["other"])
    assert measured["basis"] == theirs["basis"]
    assert measured["value"] == pytest.approx(theirs["value"])  # same weights, same records
    assert get_version("bot@fresh", verify=False).version == 3


def test_numbers_on_different_records_are_never_compared(home: dict, capsys):
    """The candidate was scored on a file that is gone: no comparable champion number and no
    way to measure one, so the gate refuses and says why. A candidate scored on 2 records is
    compared with the champion re-scored on those 2 records, not with its whole-file number."""
    from loft.registry import get_version, move_alias

    move_alias("bot", "strict", 1, reason="test")
    gone = Path(home["root"]) / "gone.jsonl"  # records nobody else was scored on
    gone.write_text("".join(Path(home["other"]).read_text().splitlines(True)[:2]))
    _eval("bot:2", str(gone))
    gone.unlink()
    capsys.readouterr()
    code = _run("registry", "promote", "bot:2", "--to", "strict", "--gate", home["gate"])
    text = "".join(capsys.readouterr())
    assert code == 3 and get_version("bot@strict", verify=False).version == 1
    assert "not comparable" in text and "is gone" in text and "gone.jsonl" in text

    _eval("bot:3", home["data"], "--n", "2")
    before = len(_entries("bot:1", home["data"]))
    assert _run("registry", "promote", "bot:3", "--to", "strict", "--gate", home["gate"]) == 0
    new = _entries("bot:1", home["data"])[before:]
    assert [e["on"]["records"] for e in new] == [2]


def test_promote_needs_a_version_that_would_move(home: dict, capsys):
    from loft.registry import get_version, history

    moves = len(history("bot"))
    assert _run("registry", "promote", "bot", "--gate", home["gate"]) == 2
    assert "names no version" in capsys.readouterr().err
    holder = get_version("bot@champion", verify=False).version
    assert _run("registry", "promote", f"bot:{holder}", "--gate", home["gate"]) == 2
    assert "already holds @champion" in capsys.readouterr().err
    assert len(history("bot")) == moves  # no no-op move recorded


def test_tampered_candidate_is_never_promoted(home: dict):
    from loft.registry import get_version

    mv = get_version("bot:1", verify=False)
    weights = next(p for p in mv.path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    try:
        assert _run("registry", "promote", "bot:1", "--gate", home["gate"]) == 1  # IntegrityError
    finally:
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
