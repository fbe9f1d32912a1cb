"""lm-evaluation-harness regression: the shipped custom task, offline checks, registry, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loft.core.errors import NotFoundError
from loft.evaluate import lmeval

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
TASK = "loft_tickets_mc"


@pytest.mark.unit
def test_shipped_task_data_is_balanced_and_labelled():
    cfg = yaml.safe_load((EXAMPLES / f"{TASK}.yaml").read_text())
    rows = [json.loads(line) for line in (EXAMPLES / f"{TASK}.jsonl").read_text().splitlines()]
    choices = cfg["doc_to_choice"]
    assert cfg["dataset_path"] == "json" and len(rows) == 30
    assert sorted({r["label"] for r in rows}) == list(range(len(choices)))
    assert all(sum(r["label"] == i for r in rows) == 6 for i in range(len(choices)))


@pytest.mark.unit
def test_resolved_include_makes_data_files_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval would resolve a relative path against this
    with lmeval.resolved_include(EXAMPLES) as include:
        assert include is not None
        cfg = yaml.safe_load((include / f"{TASK}.yaml").read_text())
        test_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert test_file.is_absolute() and test_file.is_file()
    assert not include.exists()  # the temp copy is cleaned up


def _scored_by_hand(model_ref: str, n: int) -> dict[str, float]:
    """acc and acc_norm of the first ``n`` docs computed here, without lm-eval: the choice with
    the highest log-likelihood after the prompt (acc_norm: per character of the choice)."""
    import jinja2
    import torch

    from loft.models import load_causal_lm, load_tokenizer, resolve_model

    info = resolve_model(model_ref)
    tok, model = load_tokenizer(info), load_causal_lm(info).eval()
    cfg = yaml.safe_load((EXAMPLES / f"{TASK}.yaml").read_text())
    prompt = jinja2.Template(cfg["doc_to_text"])
    choices = cfg["doc_to_choice"]
    docs = [json.loads(x) for x in (EXAMPLES / f"{TASK}.jsonl").read_text().splitlines()[:n]]
    hits = {"acc": 0, "acc_norm": 0}
    for doc in docs:
        ctx = prompt.render(**doc)
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        lls = []
        for choice in choices:  # lm-eval's target delimiter is one space
            ids = tok(ctx + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx_ids), len(ids))))
        best = max(range(len(choices)), key=lambda i: lls[i])
        best_norm = max(range(len(choices)), key=lambda i: lls[i] / len(choices[i]))
        hits["acc"] += best == doc["label"]
        hits["acc_norm"] += best_norm == doc["label"]
    return {f"{TASK}/{k}": v / len(docs) for k, v in hits.items()}


@pytest.mark.unit
def test_custom_task_runs_on_tiny_model(tiny_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # works from any working directory
    out = lmeval.run_lm_eval(str(tiny_model), [TASK], include_path=EXAMPLES, limit=5)
    assert out == pytest.approx(_scored_by_hand(str(tiny_model), 5))


@pytest.mark.unit
def test_unknown_task_refused_before_loading(monkeypatch):
    def boom(ref):  # pragma: no cover - must not be reached
        raise AssertionError("model loaded before the task check")

    monkeypatch.setattr(lmeval, "load_target", boom)
    with pytest.raises(NotFoundError, match="no_such_task_xyz"):
        lmeval.run_lm_eval("whatever", ["no_such_task_xyz"], include_path=EXAMPLES)


@pytest.mark.unit
def test_standard_task_without_cached_data_names_dataset_and_fix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(lmeval, "_hf_caches", lambda: (tmp_path / "ds", tmp_path / "hub"))
    monkeypatch.setattr(lmeval, "load_target", lambda ref: pytest.fail("model loaded"))
    with pytest.raises(NotFoundError) as err:
        lmeval.run_lm_eval("whatever", ["hellaswag"], include_path=EXAMPLES)
    msg = str(err.value)
    assert "Rowan/hellaswag" in msg and "hellaswag" in msg
    assert "datasets.load_dataset('Rowan/hellaswag')" in msg and "--lm-eval-include" in msg


@pytest.mark.unit
@pytest.mark.parametrize("cache", ["hub", "prepared"])
def test_standard_task_passes_the_check_only_with_data_in_the_cache(
    tmp_path: Path, monkeypatch, cache: str
):
    """An empty cache folder (an interrupted download) is refused; the same folder with the
    dataset's files in it (a hub snapshot, or datasets' prepared Arrow files) passes."""
    monkeypatch.setattr(lmeval, "_hf_caches", lambda: (tmp_path / "ds", tmp_path / "hub"))
    if cache == "hub":
        folder = tmp_path / "hub" / "datasets--allenai--ai2_arc"
        data = folder / "snapshots" / "0123abc" / "ARC-Easy" / "test-00000-of-00001.parquet"
    else:
        folder = tmp_path / "ds" / "allenai___ai2_arc"
        data = folder / "ARC-Easy" / "0.0.0" / "210d026f" / "ai2_arc-test.arrow"
    data.parent.mkdir(parents=True)
    with pytest.raises(NotFoundError, match="allenai/ai2_arc"):
        lmeval.check_tasks_available(["arc_easy"], EXAMPLES)
    data.write_bytes(b"PAR1")
    assert lmeval.check_tasks_available(["arc_easy"], EXAMPLES) is None


@pytest.mark.unit
def test_missing_custom_data_file_refused(tmp_path: Path):
    (tmp_path / "t.yaml").write_text(
        (EXAMPLES / f"{TASK}.yaml").read_text().replace(f"{TASK}.jsonl", "gone.jsonl")
    )
    with pytest.raises(NotFoundError, match="gone.jsonl"):
        lmeval.check_tasks_available([TASK], tmp_path)


@pytest.mark.unit
def test_regression_records_results_on_registry_version(loft_home: Path, tiny_model: Path):
    import loft.registry

    mv = loft.registry.register(tiny_model, name="lmeval-bot")
    rows = lmeval.regression(
        f"{mv.name}:{mv.version}", str(tiny_model), [TASK], include_path=EXAMPLES, limit=5
    )
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {f"{TASK}/acc", f"{TASK}/acc_norm"}
    # same weights on both sides: the delta is exactly zero
    assert all(r["delta"] == 0.0 for r in rows)
    card = loft.registry.get_version(f"{mv.name}:{mv.version}").card
    assert card["metrics"][f"{TASK}/acc"] == by_metric[f"{TASK}/acc"]["candidate"]
    assert TASK not in card["metrics"]  # a task name is not a metric
    entries = {e["metric"]: e for e in card["evaluations"]}
    assert entries[f"{TASK}/acc"]["on"] == {"kind": "lm-eval", "task": TASK, "limit": 5}
    assert entries[f"{TASK}/acc"]["source"] == "lm-eval" and entries[f"{TASK}/acc"]["basis"]


@pytest.mark.unit
def test_cli_eval_shows_lm_eval_row(loft_home: Path, tiny_model: Path, tmp_path: Path):
    from loft.cli.main import app

    data = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
    data.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(3)) + "\n")
    args = ["eval", str(tiny_model), "--data", str(data), "--metrics", "eval_loss"]
    args += ["--lm-eval", TASK, "--lm-eval-include", str(EXAMPLES), "--lm-eval-limit", "3"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    metrics = {r["metric"] for r in report["rows"]}
    assert {"eval_loss", f"{TASK}/acc"} <= metrics
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert f"{TASK}/acc" in table.output


@pytest.mark.integration
@pytest.mark.slow
def test_custom_task_on_smollm2(smollm2):
    out = lmeval.run_lm_eval("smollm2-135m-instruct", [TASK], include_path=EXAMPLES, limit=20)
    assert out == pytest.approx(_scored_by_hand("smollm2-135m-instruct", 20))


@pytest.mark.integration
def test_lm_eval_output_is_quiet_outside_a_checkout(tiny_model: Path, tmp_path: Path):
    """lm-eval as loft runs it prints none of its own chatter: no warnings, no bars under -q, no
    `fatal: not a git repository` from its `git describe` when run outside a git checkout."""
    from helpers import run_loft

    data = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
    data.write_text(json.dumps({"messages": msgs}) + "\n")
    args = ["eval", str(tiny_model), "--data", str(data), "--metrics", "eval_loss", "-q"]
    args += ["--lm-eval", TASK, "--lm-eval-include", str(EXAMPLES), "--lm-eval-limit", "2"]
    r = run_loft(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{TASK}/acc" in r.stdout
    for noise in ("fatal:", "it/s]", "Warning", "WARNING", "`pretrained` model kwarg"):
        assert noise not in r.stderr, r.stderr
