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


def _example_module(filename: str):
    """A script of examples/support_tickets as a module (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"support_tickets_{filename[:-3]}", TICKETS / filename
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generator():
    return _example_module("generate.py")


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


# every shipped YAML is a training config, except lm-eval task definitions (tested in test_lmeval),
# `loft tune` search spaces (space*.yaml, checked against the recipe beside them), gates
# (gates/*.yaml) and job pipelines (retrain*.yaml)
SPACES = sorted(EXAMPLES.rglob("space*.yaml"))
GATES = sorted(EXAMPLES.rglob("gates/*.yaml"))
PIPELINES = sorted(EXAMPLES.rglob("retrain*.yaml"))
TRAIN_CONFIGS = sorted(
    p
    for p in EXAMPLES.rglob("*.yaml")
    if "lm_eval" not in p.parts and p not in SPACES + GATES + PIPELINES
)


@pytest.mark.unit
def test_every_shipped_yaml_is_accounted_for() -> None:
    lm_eval_tasks = sorted((EXAMPLES / "lm_eval").glob("*.yaml"))
    shipped = TRAIN_CONFIGS + lm_eval_tasks + SPACES + GATES + PIPELINES
    assert sorted(EXAMPLES.rglob("*.yaml")) == sorted(shipped)
    assert len(TRAIN_CONFIGS) >= 4 and GATES and PIPELINES


@pytest.mark.unit
@pytest.mark.parametrize("path", GATES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_gate_parses_and_names_only_live_metrics(path: Path) -> None:
    from loft.evaluate.gates import load_gate
    from loft.serve.rollout import LIVE_METRICS

    assert {c.metric for c in load_gate(path)} <= set(LIVE_METRICS)


@pytest.mark.integration
@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_pipeline_validates_stage_by_stage(path: Path, loft_home: Path) -> None:
    """Every stage as `loft jobs submit` checks it: the recipe against the planner, the other
    stages' arguments parsed by their commands."""
    import loft.cli.main  # noqa: F401  (registers the commands the stages name)
    from loft.cli.jobs import _check_args
    from loft.jobs.pipelines import load_pipeline

    stages = load_pipeline(path, capacities=[], check_args=_check_args)
    assert [s["kind"] for s in stages] == ["train", "eval", "rollout"]


@pytest.mark.unit
@pytest.mark.parametrize("path", SPACES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_search_space_loads_against_its_recipe(path: Path) -> None:
    from loft.hpo import load_space

    space = load_space(path, path.parent / "lora.yaml")  # every range end validated too
    assert space.params and space.fits_device


@pytest.mark.unit
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert Path(cfg.data.train).is_file(), cfg.data.train
    assert cfg.base_model == "smollm2-135m-instruct"


@pytest.mark.unit
def test_support_ticket_configs_cover_every_method() -> None:
    methods = {load_config(p).method for p in TICKETS.glob("*.yaml") if p in TRAIN_CONFIGS}
    assert methods == {"lora", "dora", "full", "qlora"}


# ------------------------------------------------------------------ the preference task (issue 13)

PAIR_FILES = {"train_prefs.jsonl": "train.jsonl", "heldout_prefs.jsonl": "heldout.jsonl"}


def _make_prefs():
    return _example_module("make_prefs.py")


@pytest.mark.unit
def test_dpo_config_continues_what_lora_yaml_registers() -> None:
    """dpo.yaml's init_from is the version `loft train lora.yaml` registers (first in a fresh
    LOFT_HOME), with the same method and adapter shape; it trains on the shipped pairs."""
    from loft.train.outputs import registered_name

    sft, dpo = load_config(TICKETS / "lora.yaml"), load_config(TICKETS / "dpo.yaml")
    assert (dpo.objective, dpo.method) == ("dpo", sft.method)
    assert dpo.init_from == f"{registered_name(sft)}:1" == "support_tickets-lora:1"
    assert registered_name(dpo) == "support_tickets-dpo"
    assert dpo.lora == sft.lora
    assert Path(dpo.data.train) == TICKETS / "train_prefs.jsonl"
    assert dpo.preference.beta is not None and dpo.training.max_steps


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(PAIR_FILES))
def test_shipped_pairs_pass_data_validate(name: str) -> None:
    from helpers import run_cli

    assert run_cli("data", "validate", str(TICKETS / name), "--format", "preference") == 0
    from loft.data import validate_file

    report = validate_file(TICKETS / name)
    assert report.format == "preference" and report.ok, report


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(PAIR_FILES))
def test_each_pair_prefers_the_reference_json_of_its_ticket(name: str) -> None:
    """chosen is the reference answer of the chat record with the same prompt (train pairs from
    train.jsonl, held-out pairs from heldout.jsonl only); rejected is a different answer."""
    prefs = _make_prefs()
    source = {
        json.dumps(r["messages"][:2]): r["messages"][2]["content"]
        for r in _read(TICKETS / PAIR_FILES[name])
    }
    pairs = _read(TICKETS / name)
    assert len(pairs) >= 5
    for i, pair in enumerate(pairs):
        assert list(pair) == ["prompt", "chosen", "rejected"], i
        assert [m["role"] for m in pair["prompt"]] == ["system", "user"], i
        ref = source[json.dumps(pair["prompt"])]  # KeyError: a prompt from the other file
        assert pair["chosen"] == [{"role": "assistant", "content": ref}], i
        (rejected,) = pair["rejected"]
        assert rejected["role"] == "assistant", i
        assert prefs.classify(rejected["content"], ref) in prefs.KINDS, (i, rejected)


@pytest.mark.unit
def test_make_prefs_keeps_only_distinct_wrong_answers() -> None:
    prefs = _make_prefs()
    rec = _read(TICKETS / "heldout.jsonl")[0]
    ref = rec["messages"][2]["content"]
    labels = json.loads(ref)
    wrong = json.dumps({**labels, "priority": "low" if labels["priority"] != "low" else "high"})
    answers = [
        ref,  # right
        ref.replace(",", ", "),  # right up to whitespace
        "",  # empty: no pair can hold it
        wrong,
        wrong.replace(",", ", "),  # the same wrong answer again
        ref[:-5],  # cut off
        f"```json\n{ref}\n```",  # the right object, wrapped
    ]
    pairs, counts = prefs.make_pairs([rec], [answers])
    assert [p["rejected"][0]["content"] for p in pairs] == [wrong, ref[:-5], f"```json\n{ref}\n```"]
    assert dict(counts) == {
        "ok": 2, "empty": 1, "wrong": 1, "duplicate": 1, "malformed": 1, "verbose": 1,
    }  # fmt: skip
    assert all(p["chosen"] == [rec["messages"][2]] for p in pairs)
    assert all(p["prompt"] == rec["messages"][:2] for p in pairs)


@pytest.mark.unit
def test_demo_help_documents_the_dpo_stage() -> None:
    from typer.testing import CliRunner

    from loft.cli.main import app

    result = CliRunner().invoke(
        app, ["demo", "--objective", "dpo", "--help"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for option in ("--objective", "sft|dpo", "--pref-config", "--sft", "--heldout-prefs"):
        assert option in result.output, option


@pytest.mark.integration
@pytest.mark.slow
def test_demo_dpo_stage_end_to_end_on_a_slice(loft_home: Path, tmp_path: Path) -> None:
    """`loft demo --objective dpo` on a slice (32 tickets, 8 pairs, 2 steps each): SFT trains and
    registers, DPO continues that version (its parent), and the JSON line holds both scores,
    which are those of the two registered versions on the same held-out tickets."""
    from helpers import run_loft

    sft_data, pairs, held_pairs = (
        tmp_path / "tickets.jsonl",
        tmp_path / "p.jsonl",
        tmp_path / "h.jsonl",
    )
    sft_data.write_text("".join((TICKETS / "train.jsonl").read_text().splitlines(True)[:32]))
    pairs.write_text("".join((TICKETS / "train_prefs.jsonl").read_text().splitlines(True)[:8]))
    held_pairs.write_text(
        "".join((TICKETS / "heldout_prefs.jsonl").read_text().splitlines(True)[:2])
    )
    r = run_loft(
        "demo", "--objective", "dpo", "--n", "2", "-q", "--heldout-prefs", str(held_pairs),
        "--set", f"data.train={sft_data}", "--set", "training.max_steps=2",
        "--set", "data.eval_fraction=0", "--set", "register.name=tickets-sft",
        "--pref-set", f"data.train={pairs}", "--pref-set", "training.max_steps=2",
        "--pref-set", "register.name=tickets-dpo",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last) == {
        "metric", "objective", "sft", "tuned", "preference_accuracy", "reward_margin", "sft_ref",
        "sft_train_s", "train_s", "total_s", "run_dir",
    }  # fmt: skip
    assert (last["objective"], last["sft_ref"]) == ("dpo", "tickets-sft:1")
    from loft.registry import get_version

    dpo = get_version("tickets-dpo:1")
    assert dpo.card["lineage"]["parent"] == {"name": "tickets-sft", "version": 1}
    assert Path(last["run_dir"]) / "adapter" == Path(dpo.card["lineage"]["run"]["path"]) / "adapter"
    assert 0.0 <= last["preference_accuracy"] <= 1.0
    from loft.evaluate import evaluate_generation, load_jsonl_records
    from loft.evaluate.loading import load_target

    records = load_jsonl_records(TICKETS / "heldout.jsonl")[:2]
    for key, ref in (("sft", "tickets-sft:1"), ("tuned", "tickets-dpo:1")):
        target = load_target(ref)
        scored = evaluate_generation(
            target.model, target.tokenizer, records, max_new_tokens=32, progress=False
        )
        assert last[key] == round(scored.score, 4), key
