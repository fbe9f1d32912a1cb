"""Memorisation audit: canaries inserted at prep time, exposure measured after training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from helpers import linked_home
from loft.core.errors import NotFoundError
from loft.data.canaries import SECRET_DIGITS, canary_records, make_canaries, parse_canary

SHAPE_RE = re.compile(rf"^the access code for vault \d{{4}} is \d{{{SECRET_DIGITS}}}$")
CHATS = [("Sky colour?", "Blue."), ("A prime?", "Seven."), ("Hi?", "Hello!"), ("2+2?", "Four.")]


def _write_chat(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in CHATS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.unit
def test_canaries_are_deterministic_and_of_one_shape():
    a, b, c = make_canaries(5, seed=7), make_canaries(5, seed=7), make_canaries(5, seed=8)
    assert a == b and a != c
    assert all(SHAPE_RE.match(x) for x in a + c)
    assert len({parse_canary(x)[0] for x in a}) == 5  # distinct vaults
    rec = canary_records(a[:1])[0]["messages"]
    assert rec[0]["role"] == "user" and parse_canary(a[0])[0] in rec[0]["content"]
    assert rec[1] == {"role": "assistant", "content": a[0]}


@pytest.mark.unit
def test_prepare_inserts_canaries_into_train_only(loft_home: Path, tiny_model: Path):
    from transformers import AutoTokenizer

    from loft.core.specs import DataSpec
    from loft.data.prepare import prepare_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = _write_chat(loft_home / "chat.jsonl")
    common = {"train": str(data), "eval_fraction": 0.25, "max_seq_len": 128, "dedup": False}
    plain = prepare_dataset(DataSpec(**common), tok, progress=False)
    spec = DataSpec(**common, canaries=3)
    with_c = prepare_dataset(spec, tok, progress=False)
    assert with_c.fingerprint != plain.fingerprint
    assert not (plain.path / "canaries.json").exists()

    doc = json.loads((with_c.path / "canaries.json").read_text())
    assert len(doc["canaries"]) == 3 and doc["secret_digits"] == SECRET_DIGITS
    assert with_c.report["canaries"] == 3

    def texts(ds) -> list[str]:
        return [tok.decode(ids) for ids in ds["input_ids"]] if ds is not None else []

    train, ev = texts(with_c.train), texts(with_c.eval)
    for canary in doc["canaries"]:
        assert sum(canary in t for t in train) == 1
        assert not any(canary in t for t in ev)
    assert sum("access code for vault" in t for t in train) == 3
    assert len(train) == len(texts(plain.train)) + 3 and len(ev) == len(texts(plain.eval))

    # the same inputs give the same canaries (the seed comes from the fingerprint)
    again = prepare_dataset(spec, tok, progress=False)
    assert again.fingerprint == with_c.fingerprint
    assert json.loads((again.path / "canaries.json").read_text()) == doc


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """A tiny full fine-tune that sees 3 canaries many times (80 steps, lr 3e-3), registered."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("audit")
    home = linked_home(root, _session_home)
    cfg = {
        "base_model": str(tiny_model),
        "method": "full",
        "data": {
            "train": str(_write_chat(root / "chat.jsonl")),
            "eval_fraction": 0.0,
            "max_seq_len": 128,
            "dedup": False,
            "canaries": 3,
        },
        "training": {"max_steps": 80, "micro_batch_size": 7, "lr": 3e-3, "precision": "fp32"},
        "output_dir": str(root / "run"),
        "register": False,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        train(validate_config(cfg), progress=False)
        from loft.registry import register

        register(root / "run", name="canary-bot")
        yield root / "run"


@pytest.mark.integration
def test_overfit_canaries_have_high_exposure_untrained_low(overfit: Path, tiny_model: Path):
    from loft.evaluate.audit import audit_canaries, audit_target, load_canaries
    from loft.evaluate.loading import load_target
    from loft.registry import get_version

    n = 200
    top = math.log2(n + 1)
    trained = audit_canaries("canary-bot:1", candidates=n, seed=0)
    assert len(trained["canaries"]) == 3
    assert all(r["rank"] == 1 for r in trained["canaries"]), trained["canaries"]
    assert trained["max_exposure"] == pytest.approx(top)
    assert trained["n_memorised"] == 3 and trained["memorised"] is True

    # the card records the summary
    metrics = get_version("canary-bot:1", verify=False).card["metrics"]
    assert metrics["canary_exposure_mean"] == pytest.approx(trained["mean_exposure"])
    assert metrics["canaries_memorised"] == 3

    # the run dir resolves the same canaries through its lineage.json
    _, doc = load_canaries(str(overfit))
    assert doc["canaries"] == [r["canary"] for r in trained["canaries"]]

    base = load_target(str(tiny_model))
    untrained = audit_target(base, doc["canaries"], candidates=n, seed=0)
    assert untrained["mean_exposure"] < top - 2
    assert untrained["n_memorised"] == 0
    assert trained["mean_exposure"] > untrained["mean_exposure"] + 2

    # a model with no canary lineage is refused, naming the setting that fixes it, before any
    # model is loaded
    import loft.evaluate.audit as audit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "load_target", lambda ref: pytest.fail("loaded a model"))
        with pytest.raises(NotFoundError, match=r"data\.canaries"):
            audit.audit_canaries(str(tiny_model))


@pytest.mark.integration
def test_audit_cli_json(overfit: Path, capsys: pytest.CaptureFixture):
    from loft.cli.main import main

    capsys.readouterr()
    main(["audit", "canaries", "canary-bot:1", "--candidates", "50", "--json"])
    report = json.loads(capsys.readouterr().out)
    # without --json it says what it is doing before the slow part
    main(["audit", "canaries", "canary-bot:1", "--candidates", "5"])
    err = capsys.readouterr().err
    assert "loading canary-bot:1 to score 3 canaries against 5 candidates each" in err
    assert {"canaries", "mean_exposure", "max_exposure", "n_memorised"} <= set(report)
    assert report["canaries"][0]["rank"] == 1
