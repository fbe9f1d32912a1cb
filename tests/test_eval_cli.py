"""Evaluation on a tiny model: eval loss, target loading, evaluate_model with a baseline, a
pluggable scorer, the registry hook (a stand-in registry module), and the `loft eval` table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from loft.core.errors import ConfigError, NotFoundError

pytestmark = pytest.mark.unit

QA = [
    ("What colour is the sky?", "Blue."),
    ("Name a prime number.", "Seven is prime."),
    ("Say hello in French.", "Bonjour!"),
    ("What is 2 + 2?", "It is 4."),
    ("Capital of Italy?", "Rome."),
    ("Opposite of hot?", "Cold."),
]


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_records(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps(chat(q, a)) + "\n" for q, a in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """One tiny LoRA run for the whole module, in its own LOFT_HOME."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("eval_run")
    data = write_records(root / "train.jsonl", QA * 4)
    cfg = {
        "base_model": str(tiny_model),
        "method": "lora",
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": 128, "dedup": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 4, "micro_batch_size": 4, "lr": 5e-3, "precision": "fp32"},
        "tracking": {"experiment": "tests"},
        "output_dir": str(root / "run"),
    }
    with pytest.MonkeyPatch.context() as mp:
        (root / "home").mkdir()
        mp.setenv("LOFT_HOME", str(root / "home"))
        return train(validate_config(cfg), progress=False).run_dir


@pytest.fixture
def heldout(tmp_path: Path) -> Path:
    return write_records(tmp_path / "heldout.jsonl", QA[:4])


# ---------------------------------------------------------------- eval loss


def test_eval_loss_equals_loss_sum_by_hand(tiny_model):
    from loft.data import tokenize_conversation
    from loft.evaluate.loss_eval import eval_loss
    from loft.models import load_causal_lm, load_tokenizer, resolve_model
    from loft.train.loss import loss_sum

    info = resolve_model(str(tiny_model))
    model, tok = load_causal_lm(info).eval(), load_tokenizer(info)
    records = [chat(*QA[0]), chat(*QA[3])]
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            ex = tokenize_conversation(rec["messages"], tok, max_seq_len=1024)
            batch = {
                "input_ids": torch.tensor([ex["input_ids"]]),
                "labels": torch.tensor([ex["labels"]]),
            }
            loss, n = loss_sum(model, batch)
            total += float(loss)
            count += n
    expected = total / count
    for batch_size in (1, 2):  # packed or not, the token-weighted mean is the same
        out = eval_loss(model, tok, records, batch_size=batch_size)
        assert out["tokens"] == count
        assert out["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert out["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert not model.training


# ---------------------------------------------------------------- loading


def _logits(model, tok) -> torch.Tensor:
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_target_base_run_dir_and_adapter_folder(tiny_model, run_dir, tmp_path):
    from loft.evaluate.loading import load_target
    from loft.models import resolve_model

    base = load_target(str(tiny_model))
    assert base.kind == "base" and not base.model.training
    assert base.sha256 == resolve_model(str(tiny_model)).sha256

    from_run = load_target(str(run_dir))
    assert from_run.kind == "adapter"
    assert from_run.name == str(run_dir.resolve())
    assert from_run.path == (run_dir / "adapter").resolve()
    assert from_run.base_model == str(Path(tiny_model).resolve())
    assert not from_run.model.training
    assert not hasattr(from_run.model, "peft_config")  # merged into plain weights
    # the adapter's own tokenizer (saved beside it), not the base model's
    assert Path(from_run.tokenizer.name_or_path) == from_run.path
    assert not torch.allclose(
        _logits(base.model, base.tokenizer), _logits(from_run.model, base.tokenizer)
    )

    # a bare adapter folder copied elsewhere, with an edited chat template: that template is used
    folder = tmp_path / "copied_adapter"
    shutil.copytree(run_dir / "adapter", folder)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    marker = "{# edited template #}"
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(marker + jinja.read_text())
    else:
        tok_cfg["chat_template"] = marker + tok_cfg["chat_template"]
        cfg_path.write_text(json.dumps(tok_cfg))
    adapter = load_target(str(folder))
    assert adapter.kind == "adapter" and adapter.sha256 == from_run.sha256
    assert adapter.tokenizer.chat_template.startswith(marker)
    torch.testing.assert_close(
        _logits(adapter.model, base.tokenizer), _logits(from_run.model, base.tokenizer)
    )


def test_load_target_errors(tmp_path, monkeypatch):
    from loft.evaluate import loading

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(NotFoundError, match="not a run dir, adapter folder or model directory"):
        loading.load_target(str(empty))
    monkeypatch.setattr(loading, "registry_module", lambda: None)
    with pytest.raises(NotFoundError, match="looks like a registry reference"):
        loading.load_target("support@champion")
    with pytest.raises(NotFoundError):
        loading.load_target("no-such-model-anywhere")


# ---------------------------------------------------------------- evaluate_model


def test_evaluate_model_with_baseline_logs_to_mlflow(run_dir, tiny_model, heldout, loft_home):
    from loft.evaluate.run import evaluate_model
    from loft.tracking import mlflow_client

    report = evaluate_model(
        str(run_dir),
        heldout,
        metrics=["eval_loss", "perplexity", "exact_match", "json_exact_match", "rouge_l"],
        baseline=str(tiny_model),
        max_new_tokens=4,
        progress=False,
    )
    assert report.n == 4
    names = ["eval_loss", "perplexity", "exact_match", "json_exact_match", "rouge_l"]
    assert [r["metric"] for r in report.rows] == names
    assert report.baseline is not None and set(report.baseline) == set(names)
    for row in report.rows:
        assert row["candidate"] == report.candidate[row["metric"]]
        assert row["delta"] == pytest.approx(row["candidate"] - row["baseline"])
    assert report.candidate["eval_loss"] != report.baseline["eval_loss"]
    # training on these exact answers lowered their loss
    assert report.candidate["eval_loss"] < report.baseline["eval_loss"]
    assert len(report.samples) == 3
    assert json.loads(json.dumps(report.to_dict()))["baseline_ref"] == report.baseline_ref

    run = mlflow_client().get_run(report.mlflow_run_id)
    assert run.data.metrics["eval_loss"] == pytest.approx(report.candidate["eval_loss"])
    assert run.data.metrics["baseline/rouge_l"] == pytest.approx(report.baseline["rouge_l"])
    assert run.data.params["n"] == "4" and run.data.params["ref"] == report.ref
    exp = mlflow_client().get_experiment(run.info.experiment_id)
    assert exp.name == "eval"


def test_pluggable_scorer_and_bad_names(tiny_model, heldout, tmp_path, monkeypatch, loft_home):
    from loft.evaluate.run import evaluate_model

    (tmp_path / "my_scorers.py").write_text(
        "def length_ratio(pred, ref):\n    return min(len(pred), len(ref)) / max(len(ref), 1)\n\n"
        "def half(pred, ref):\n    return 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    report = evaluate_model(
        str(tiny_model),
        heldout,
        metrics=["my_scorers:length_ratio"],
        scorer="my_scorers:half",
        max_new_tokens=3,
        n=3,  # every record is among the report's (up to 3) samples
        progress=False,
    )
    assert report.candidate["half"] == 0.5
    by_hand = [min(len(s["pred"]), len(s["ref"])) / max(len(s["ref"]), 1) for s in report.samples]
    assert len(by_hand) == report.n == 3
    assert report.candidate["length_ratio"] == pytest.approx(sum(by_hand) / 3)
    assert report.baseline is None and report.rows[0]["delta"] is None

    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        evaluate_model(str(tiny_model), heldout, scorer="no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        evaluate_model(str(tiny_model), heldout, scorer="my_scorers:nope")
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate_model(str(tiny_model), heldout, metrics=["bleu"])


def test_registry_reference_is_verified_and_gets_its_evaluation(run_dir, heldout, loft_home):
    from loft import registry
    from loft.core.errors import IntegrityError
    from loft.evaluate.run import evaluate_model, read_eval_records
    from loft.registry.evaluations import records_fingerprint

    mv = registry.register(run_dir, name="support")
    registry.move_alias("support", "champion", mv.version, reason="test")
    report = evaluate_model(
        "support@champion", heldout, metrics=["eval_loss", "exact_match"], n=3,
        max_new_tokens=4, progress=False,
    )  # fmt: skip
    assert report.ref == "support:1"
    entries = registry.get_version("support:1").card["evaluations"][-2:]
    fp = records_fingerprint(read_eval_records(heldout, 3))
    assert [(e["metric"], e["value"]) for e in entries] == [
        ("eval_loss", report.candidate["eval_loss"]),
        ("exact_match", report.candidate["exact_match"]),
    ]
    loss, match = (e["on"] for e in entries)
    assert loss == {"kind": "data", "path": str(heldout.resolve()), "fingerprint": fp,
                    "records": 3, "settings": {}}  # fmt: skip
    assert match == {**loss, "settings": {"max_new_tokens": 4}}  # generation depends on it
    assert entries[0]["mlflow_run_id"] == report.mlflow_run_id
    weights = mv.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # truncated: every load verifies first
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        evaluate_model("support:1", heldout, metrics=["eval_loss"], progress=False)


# ---------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    from loft.cli.eval import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


def test_cli_eval_prints_table_and_json(run_dir, tiny_model, heldout, loft_home):
    runner = CliRunner()
    env = {"COLUMNS": "200", "LOFT_HOME": os.environ["LOFT_HOME"]}
    args = ["eval", str(run_dir), "--data", str(heldout), "--baseline", str(tiny_model)]
    args += ["--metrics", "eval_loss,rouge_l", "--max-new-tokens", "3", "--n", "2", "-q"]
    res = runner.invoke(_app(), args, env=env)
    assert res.exit_code == 0, res.output
    for word in ("metric", "candidate", "baseline", "delta", "eval_loss", "rouge_l", "2 records"):
        assert word in res.output

    res = runner.invoke(_app(), [*args, "--json"], env=env)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["n"] == 2 and [r["metric"] for r in doc["rows"]] == ["eval_loss", "rouge_l"]


def test_cli_eval_help():
    res = CliRunner().invoke(_app(), ["eval", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "--baseline" in res.output and "--scorer" in res.output


def test_real_registry_version_round_trip(run_dir, heldout, loft_home):
    """Eval a registered version by name:version: metrics land on it, and a flipped byte in its
    adapter makes the evaluation refuse to load it."""
    from loft import registry
    from loft.core.errors import IntegrityError
    from loft.evaluate.run import evaluate_model

    mv = registry.register(run_dir, name="evaltest")
    ref = f"evaltest:{mv.version}"
    report = evaluate_model(ref, heldout, metrics=["eval_loss"], progress=False)
    assert report.ref == ref
    stored = registry.get_version(ref, verify=True)
    assert stored.card["metrics"]["eval_loss"] == pytest.approx(report.candidate["eval_loss"])

    weights = Path(stored.path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        evaluate_model(ref, heldout, metrics=["eval_loss"], progress=False)
