"""Shipped examples: the demo data is reproducible and valid, and every example config validates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loft.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TICKETS = EXAMPLES / "support_tickets"
KEYS = ["category", "priority", "product"]


def _generator():
    """The generator module itself (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "support_tickets_generate", TICKETS / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.integration
def test_generator_reproduces_committed_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(TICKETS / "generate.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (TICKETS / name).read_bytes(), name


@pytest.mark.unit
def test_generator_is_deterministic_per_seed() -> None:
    gen = _generator()
    assert gen.generate(50, 10, seed=3) == gen.generate(50, 10, seed=3)
    assert gen.generate(50, 10, seed=3) != gen.generate(50, 10, seed=4)


@pytest.mark.unit
def test_committed_split_sizes_and_disjoint() -> None:
    """No held-out ticket occurs in train, not even up to case and punctuation."""
    norm = _generator().normalized
    train, heldout = _read(TICKETS / "train.jsonl"), _read(TICKETS / "heldout.jsonl")
    assert (len(train), len(heldout)) == (1500, 200)
    train_text = {norm(r["messages"][1]["content"]) for r in train}
    held_text = {norm(r["messages"][1]["content"]) for r in heldout}
    assert len(train_text) == len(train) and len(held_text) == len(heldout)
    assert not train_text & held_text


@pytest.mark.unit
@pytest.mark.parametrize("name", ["train.jsonl", "heldout.jsonl"])
def test_every_record_is_valid_chat_with_allowed_labels(name: str) -> None:
    gen = _generator()
    allowed = {
        "category": set(gen.CATEGORIES),
        "priority": set(gen.PRIORITIES),
        "product": set(gen.PRODUCTS),
    }
    seen: dict[str, set[str]] = {k: set() for k in KEYS}
    for i, rec in enumerate(_read(TICKETS / name)):
        assert list(rec) == ["messages"], i
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["system", "user", "assistant"], i
        assert all(isinstance(m["content"], str) and m["content"] for m in rec["messages"]), i
        answer = rec["messages"][2]["content"]
        labels = json.loads(answer)
        assert list(labels) == KEYS, i  # always the same key order
        assert answer == json.dumps(labels, separators=(",", ":")), i  # compact, no spaces
        for k in KEYS:
            assert labels[k] in allowed[k], (i, k, labels[k])
            seen[k].add(labels[k])
    assert seen == allowed  # every label value occurs in each split


@pytest.mark.unit
def test_labels_are_grounded_in_the_ticket_text() -> None:
    """Each ticket carries its priority cue and names its product (an alias), before any typo."""
    gen = _generator()
    import random

    rng = random.Random(123)
    for _ in range(300):
        text, labels = gen.make_ticket(rng)
        low = text.lower()
        # one adjacent-letter swap may hit the cue or the alias; allow for it by letter multiset
        cue_ok = any(_close(c.lower(), low) for c in gen.CUES[labels["priority"]])
        alias_ok = any(_close(a.lower(), low) for a in gen.ALIASES[labels["product"]])
        assert cue_ok and alias_ok, (text, labels)


def _close(needle: str, haystack: str) -> bool:
    if needle in haystack:
        return True
    for i in range(len(haystack) - len(needle) + 1):
        window = haystack[i : i + len(needle)]
        diffs = [j for j in range(len(needle)) if window[j] != needle[j]]
        if len(diffs) == 2 and diffs[1] == diffs[0] + 1 and sorted(window) == sorted(needle):
            return True
    return False


# every shipped YAML is a training config, except lm-eval task definitions (tested in test_lmeval)
TRAIN_CONFIGS = sorted(p for p in EXAMPLES.rglob("*.yaml") if "lm_eval" not in p.parts)


@pytest.mark.unit
def test_every_shipped_yaml_is_accounted_for() -> None:
    lm_eval_tasks = sorted((EXAMPLES / "lm_eval").glob("*.yaml"))
    assert sorted(EXAMPLES.rglob("*.yaml")) == sorted(TRAIN_CONFIGS + lm_eval_tasks)
    assert len(TRAIN_CONFIGS) >= 4


@pytest.mark.unit
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert Path(cfg.data.train).is_file(), cfg.data.train
    assert cfg.base_model == "smollm2-135m-instruct"


@pytest.mark.unit
def test_support_ticket_configs_cover_every_method() -> None:
    methods = {load_config(p).method for p in TICKETS.glob("*.yaml")}
    assert methods == {"lora", "dora", "full", "qlora"}
