"""Model registry on a tiny LoRA run: register, browse, integrity, aliases, history, rollback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import linked_home
from loft.core.errors import ConfigError, IntegrityError, NotFoundError

pytestmark = pytest.mark.unit

COMMANDS = ("register", "list", "show", "diff", "verify", "history", "rollback", "alias")
VERSION_KEYS = {
    "name",
    "version",
    "aliases",
    "kind",
    "path",
    "created",
    "lineage",
    "metrics",
    "evaluations",
    "weights_digest",
    "files",
    "bytes",
    "degraded",
}


def _write_chat(path: Path) -> Path:
    rows = [("What colour is the sky?", "Blue."), ("Name a prime.", "Seven."), ("Hi?", "Hello!")]
    with path.open("w") as f:
        for i in range(8):
            q, a = rows[i % len(rows)]
            msg = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msg}) + "\n")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """A LOFT_HOME for this module (models/ linked to the session's) holding one tiny LoRA run."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("registry")
    home = linked_home(root, _session_home)
    cfg = {
        "base_model": str(tiny_model),
        "method": "lora",
        "data": {
            "train": str(_write_chat(root / "chat.jsonl")),
            "eval_fraction": 0.25,
            "max_seq_len": 128,
            "dedup": False,
        },
        "lora": {"r": 2, "alpha": 4},
        "training": {"max_steps": 2, "micro_batch_size": 4, "eval_every": 2, "precision": "fp32"},
        "tracking": {"experiment": "registry-tests"},
        "output_dir": str(root / "tiny-run"),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        train(validate_config(cfg), progress=False)
        yield home, root / "tiny-run"


@pytest.fixture
def run_dir(home) -> Path:
    return home[1]


@pytest.fixture
def registry(home, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOFT_HOME", str(home[0]))
    import loft.registry

    return loft.registry


def _cli(*args: str):
    from loft.cli.registry import app

    return CliRunner().invoke(app, list(args), catch_exceptions=True)


# ----------------------------------------------------------------------------- register


def test_register_run_dir_writes_complete_lineage_card(registry, run_dir: Path):
    from loft.models import resolve_model
    from loft.models.manifest import sha256_file
    from loft.registry.store import client

    summary = json.loads((run_dir / "run_summary.json").read_text())
    mv = registry.register(run_dir, name="card-bot", metrics={"exact_match": 0.25})
    assert (mv.name, mv.version, mv.card["kind"]) == ("card-bot", 1, "adapter")
    assert mv.path == Path(registry.get_version("card-bot:1").path)
    on_disk = sorted(p.name for p in mv.path.iterdir())
    for required in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "card.json",
    ):
        assert required in on_disk
    assert "lineage.json" not in on_disk  # superseded by the card
    # every file but the card is recorded with its true sha256 and size
    records = {f["path"]: f for f in mv.card["files"]}
    assert set(records) == set(on_disk) - {"card.json"}
    for rel, rec in records.items():
        assert rec["sha256"] == sha256_file(mv.path / rel)
        assert rec["bytes"] == (mv.path / rel).stat().st_size

    lin = mv.to_dict()["lineage"]
    assert lin["base_model"] == summary["base_model"]
    assert lin["base_model_sha256"] == resolve_model(summary["base_model"]).sha256
    assert lin["dataset_fingerprint"] == summary["dataset_fingerprint"]
    assert lin["data_report"]["fingerprint"] == summary["dataset_fingerprint"]
    assert lin["config"]["lora"]["r"] == 2
    assert "<|im_start|>" in lin["chat_template"]
    assert lin["special_tokens"]["eos"] == "<|im_end|>"
    assert lin["special_tokens"]["pad"]
    assert lin["loft_version"]
    assert mv.card["metrics"]["exact_match"] == 0.25
    assert mv.card["metrics"]["eval_loss"] == pytest.approx(summary["eval_loss"])
    # each number says what it was measured on: the run's eval loss on its dataset's eval split
    # (comparable with other runs of that dataset), the declared one on nothing known
    entries = {e["metric"]: e for e in mv.to_dict()["evaluations"]}
    assert entries["eval_loss"]["on"] == {
        "kind": "train-eval-split",
        "fingerprint": summary["dataset_fingerprint"],
        "records": lin["data_report"]["eval_records"],
    }
    assert entries["eval_loss"]["basis"] and entries["eval_loss"]["source"] == "train"
    assert entries["final_train_loss"]["basis"] is None  # a property of that run alone
    assert (
        entries["exact_match"]["basis"] is None and entries["exact_match"]["source"] == "declared"
    )
    # the digest a server names for it: sha256 of "path:sha256\n" over its weight files
    line = f"adapter_model.safetensors:{records['adapter_model.safetensors']['sha256']}\n"
    assert mv.to_dict()["weights_digest"] == hashlib.sha256(line.encode()).hexdigest()
    shown = _cli("show", "card-bot:1")
    assert (
        mv.to_dict()["weights_digest"] in shown.output and "X-Loft-Adapter-Sha256" in shown.output
    )
    # the MLflow version points at the folder (the bucket, with an object store: the team run of
    # this suite in test_team.py) and is linked to the training run
    from loft.registry import objects

    mlv = client().get_model_version("card-bot", "1")
    assert mlv.run_id == summary["mlflow_run_id"]
    store = objects.remote()
    assert mlv.source == (store.uri("card-bot", 1) if store else mv.path.as_uri())
    assert mlv.tags["loft.metric.exact_match"] == "0.25"


def test_register_bare_adapter_and_default_name(registry, run_dir: Path, tmp_path: Path):
    bare = tmp_path / "my adapter!"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run_dir / "adapter" / name, bare / name)
    (bare / "training_args.bin").write_bytes(b"pickle")  # never copied
    mv = registry.register(bare)
    assert mv.name == "my-adapter"
    assert sorted(p.name for p in mv.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "card.json",
    ]
    lin = mv.to_dict()["lineage"]
    adapter_cfg = json.loads((bare / "adapter_config.json").read_text())
    assert lin["base_model"] == adapter_cfg["base_model_name_or_path"]
    assert lin["base_model_sha256"] is None
    assert lin["dataset_fingerprint"] is None
    assert lin["chat_template"] is None
    assert lin["config"] is None

    default = registry.register(run_dir)
    assert default.name == "tiny-run"


def test_register_refuses_pickle_only_and_bad_paths(registry, tmp_path: Path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ConfigError, match="pickle"):
        registry.register(folder, name="pickled")
    with pytest.raises(NotFoundError):
        registry.register(tmp_path / "nowhere", name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="neither"):
        registry.register(tmp_path / "empty", name="x")


@pytest.mark.parametrize("bad", ["a/b", "..", "../evil", "a..b", "/abs", ".hidden", "x" * 65])
def test_names_that_could_escape_are_rejected(registry, run_dir: Path, home, bad: str):
    with pytest.raises(ConfigError):
        registry.register(run_dir, name=bad)
    with pytest.raises(ConfigError):
        registry.get_version(bad)
    assert not (home[0].parent / "evil").exists()


@pytest.mark.parametrize(
    "ref", ["a:0", "a:-1", "a:1.5", "a:", "a@", "a@latest", "a@v3", "a@x/y", "a@b:1", ""]
)
def test_refs_are_parsed_strictly(registry, ref: str):
    with pytest.raises(ConfigError):
        registry.parse_ref(ref)


def test_parse_ref_forms(registry):
    assert registry.parse_ref("bot") == ("bot", None, None)
    assert registry.parse_ref("bot@champion") == ("bot", "champion", None)
    assert registry.parse_ref("bot:12") == ("bot", None, 12)


# ----------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra"])
def test_tampered_version_is_refused_naming_the_file(registry, run_dir: Path, damage: str):
    mv = registry.register(run_dir, name=f"tamper-{damage}")
    ref = f"{mv.name}:{mv.version}"
    registry.verify(ref)  # intact
    weights = mv.path / "adapter_model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        culprit = "adapter_model.safetensors"
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
        culprit = "adapter_model.safetensors"
    elif damage == "delete":
        (mv.path / "tokenizer_config.json").unlink()
        culprit = "tokenizer_config.json"
    else:
        (mv.path / "model-extra.safetensors").write_bytes(b"0" * 16)
        culprit = "model-extra.safetensors"
    with pytest.raises(IntegrityError, match=culprit.replace(".", r"\.")):
        registry.verify(ref)
    with pytest.raises(IntegrityError, match=culprit.replace(".", r"\.")):
        registry.get_version(ref)
    assert registry.get_version(ref, verify=False).version == mv.version
    result = _cli("verify", ref)
    assert isinstance(result.exception, IntegrityError)


# ----------------------------------------------------------------------------- aliases


def test_alias_moves_history_and_rollback(registry, run_dir: Path):
    for _ in range(3):
        registry.register(run_dir, name="alias-bot")
    assert registry.get_version("alias-bot").version == 3  # no champion yet: latest
    with pytest.raises(NotFoundError, match="no previous"):
        registry.rollback("alias-bot")

    first = registry.move_alias("alias-bot", "champion", 1, reason="first release", actor="ana")
    assert (first["from"], first["to"], first["who"]) == (None, 1, "ana")
    registry.move_alias(
        "alias-bot", "champion", 2, reason="better", gate=[{"check": "x >= 1", "passed": True}]
    )
    registry.move_alias("alias-bot", "champion", 3, reason="forced", forced=True)
    registry.move_alias("alias-bot", "candidate", 1)
    assert registry.get_version("alias-bot").version == 3
    assert registry.get_version("alias-bot@candidate").version == 1
    assert sorted(registry.get_version("alias-bot:1").aliases) == ["candidate"]

    hist = registry.history("alias-bot")
    assert [(h["alias"], h["from"], h["to"]) for h in hist] == [
        ("champion", None, 1),
        ("champion", 1, 2),
        ("champion", 2, 3),
        ("candidate", None, 1),
    ]
    assert hist[1]["gate"] == [{"check": "x >= 1", "passed": True}]
    assert hist[2]["forced"] is True and hist[2]["why"] == "forced"
    assert all(h["who"] and h["when"] for h in hist)

    back = registry.rollback("alias-bot", reason="regression")
    assert (back["from"], back["to"], back["rollback"]) == (3, 2, True)
    assert registry.get_version("alias-bot@champion").version == 2
    registry.rollback("alias-bot")  # walks further back, not a toggle
    assert registry.get_version("alias-bot@champion").version == 1
    with pytest.raises(NotFoundError):
        registry.rollback("alias-bot")

    models = {m["name"]: m for m in registry.list_models()}
    assert models["alias-bot"] == {
        "name": "alias-bot",
        "latest": 3,
        "aliases": {"candidate": 1, "champion": 1},
        "n_versions": 3,
    }
    with pytest.raises(NotFoundError):
        registry.move_alias("alias-bot", "champion", 9)
    with pytest.raises(NotFoundError):
        registry.get_version("alias-bot@nosuch")
    with pytest.raises(NotFoundError):
        registry.history("never-registered")


def test_diff_record_metrics_and_degraded(registry, run_dir: Path, tmp_path: Path):
    from loft.registry.store import client

    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    lineage_path = other / "adapter" / "lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["config"]["training"]["lr"] = 5e-4
    lineage_path.write_text(json.dumps(lineage))
    a = registry.register(run_dir, name="diff-bot", metrics={"exact_match": 0.5})
    b = registry.register(
        other, name="diff-bot", metrics={"exact_match": 0.75}, parent="diff-bot:1"
    )
    assert b.to_dict()["lineage"]["parent"] == {"name": "diff-bot", "version": 1}

    d = registry.diff("diff-bot:1", "diff-bot:2")
    assert d["config"] == {
        "training.lr": {"a": a.card["lineage"]["config"]["training"]["lr"], "b": 5e-4}
    }
    assert d["data"]["fingerprint"]["same"] is True
    assert d["metrics"]["exact_match"] == {"a": 0.5, "b": 0.75, "delta": 0.25}

    from loft.registry.evaluations import make_entries

    on = {"kind": "data", "path": "/x.jsonl", "fingerprint": "ab" * 32, "records": 3}
    before = len(registry.get_version("diff-bot:1").card["evaluations"])
    registry.record_evaluation(
        "diff-bot:1", make_entries({"exact_match": 0.9, "rouge_l": 0.4}, on=on, source="eval")
    )
    again = registry.get_version("diff-bot:1")  # card rewrite keeps the version intact
    assert len(again.card["evaluations"]) == before + 2  # appended, nothing overwritten
    assert again.card["metrics"]["exact_match"] == 0.9  # the newest value of each metric
    assert again.card["metrics"]["rouge_l"] == 0.4
    assert "eval_loss" in again.card["metrics"]
    tags = client().get_model_version("diff-bot", "1").tags
    assert tags["loft.metric.rouge_l"] == "0.4"
    with pytest.raises(ConfigError):
        registry.record_evaluation("diff-bot:1", make_entries({"bad": "high"}, on=on, source="x"))

    registry.mark_degraded("diff-bot:2", "exact_match fell below 0.7")
    assert registry.get_version("diff-bot:2").card["degraded"]["reason"].startswith("exact_match")
    assert client().get_model_version("diff-bot", "2").tags["loft.degraded"].startswith("exact")


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_help(command: str):
    result = _cli(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_cli_json_round_trip(registry, run_dir: Path):
    reg = _cli("register", str(run_dir), "--name", "cli-bot", "--json")
    assert reg.exit_code == 0, reg.output
    registered = json.loads(reg.output)
    assert set(registered) == VERSION_KEYS
    assert {"path", "sha256", "bytes"} == set(registered["files"][0])
    assert registered["lineage"]["base_model"] and registered["lineage"]["dataset_fingerprint"]

    assert _cli("alias", "cli-bot:1", "--to", "champion", "--reason", "ship").exit_code == 0
    shown = json.loads(_cli("show", "cli-bot@champion", "--json").output)
    assert shown == {**registered, "aliases": ["champion"]}

    listed = {m["name"]: m for m in json.loads(_cli("list", "--json").output)}
    assert listed["cli-bot"] == {
        "name": "cli-bot",
        "latest": 1,
        "aliases": {"champion": 1},
        "n_versions": 1,
    }
    hist = json.loads(_cli("history", "cli-bot", "--json").output)
    assert [(h["from"], h["to"], h["why"]) for h in hist] == [(None, 1, "ship")]
    verified = _cli("verify", "cli-bot:1")
    assert verified.exit_code == 0 and "OK  adapter_model.safetensors" in verified.output
    diffed = json.loads(_cli("diff", "cli-bot:1", "cli-bot@champion", "--json").output)
    assert diffed["config"] == {}
    for text_cmd in (("list",), ("show", "cli-bot:1"), ("diff", "cli-bot:1", "cli-bot:1")):
        out = _cli(*text_cmd)
        assert out.exit_code == 0 and "cli-bot" in out.output
    assert isinstance(_cli("rollback", "cli-bot").exception, NotFoundError)
