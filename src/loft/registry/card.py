"""Lineage cards: what a registered version's folder holds, where it came from, and its sha256s.

A version folder is complete when ``card.json`` exists (it is written last). The card lists every
other file with its sha256 and size; :func:`verify_files` recomputes them before anything loads.
Nothing here imports torch or mlflow: tokenizer facts are read from the JSON/Jinja files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loft import __version__
from loft.core.crypto import WrongKeyError
from loft.core.errors import ConfigError, IntegrityError, NotFoundError
from loft.core.paths import datasets_dir, read_json_object
from loft.models.manifest import (
    MANIFEST,
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIX,
    combined_digest,
    list_files,
    sha256_file,
    weight_files,
)
from loft.models.memory import read_json
from loft.registry import evaluations as evals
from loft.registry.files import plain_size, store_file

if TYPE_CHECKING:
    from loft.core.crypto import KeyProvider

CARD = "card.json"
CARD_FORMAT = 1
LINEAGE = "lineage.json"
# Files of a source folder that the card supersedes; they are not copied into a version.
_NOT_COPIED = {CARD, LINEAGE, MANIFEST}
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{8,128}$")


@dataclass
class Source:
    """A folder to register: the weights folder plus whatever lineage its run left beside it."""

    weights_dir: Path
    kind: str  # "adapter" | "full"
    run_dir: Path | None
    lineage: dict[str, Any]
    summary: dict[str, Any]
    resolved: dict[str, Any] | None


_read_json = read_json_object


def _kind_of(folder: Path) -> str:
    """'adapter' or 'full' for a folder of safetensors weights; refuses pickle-only folders."""
    pickles = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
    )
    if (folder / "adapter_config.json").is_file():
        if (folder / "adapter_model.safetensors").is_file():
            return "adapter"
        missing = "adapter_model.safetensors"
    elif (folder / "config.json").is_file():
        if weight_files(folder):
            return "full"
        missing = "*.safetensors weights"
    else:
        raise NotFoundError(
            f"{folder} is neither a loft run dir (run_summary.json + adapter/ or model/), a PEFT "
            "adapter folder (adapter_config.json + adapter_model.safetensors) nor a Hugging Face "
            "model folder (config.json + *.safetensors).",
            hint="Point `loft registry register` at one of those.",
        )
    if pickles:
        raise ConfigError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), no {missing}; loft never "
            "loads pickles.",
            hint="Re-save it with safetensors (save_pretrained(..., safe_serialization=True)).",
        )
    raise NotFoundError(f"{folder} has no {missing}.", hint="Check the folder is complete.")


def find_source(path: Path) -> Source:
    """Classify ``path``: a loft run dir, a bare PEFT adapter folder, or a full HF model folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NotFoundError(f"{path} is not a directory.", hint="Pass a run dir or model folder.")
    if (path / "run_summary.json").is_file() or (path / "resolved.yaml").is_file():
        summary = (
            _read_json(path / "run_summary.json") if (path / "run_summary.json").is_file() else {}
        )
        for sub in ("adapter", "model"):
            if (path / sub).is_dir():
                weights = path / sub
                break
        else:
            raise NotFoundError(
                f"run {path} has no adapter/ or model/ folder (status: "
                f"{summary.get('status', 'unknown')}); only completed runs can be registered.",
                hint="Finish it with `loft train CONFIG --resume`, or register another run.",
            )
        resolved = None
        if (path / "resolved.yaml").is_file():
            loaded = yaml.safe_load((path / "resolved.yaml").read_text(encoding="utf-8"))
            resolved = loaded if isinstance(loaded, dict) else None
        lineage = _read_json(weights / LINEAGE) if (weights / LINEAGE).is_file() else {}
        return Source(weights, _kind_of(weights), path, lineage, summary, resolved)
    lineage = _read_json(path / LINEAGE) if (path / LINEAGE).is_file() else {}
    return Source(path, _kind_of(path), None, lineage, {}, None)


def copy_files(src: Source, dest: Path, key: KeyProvider | None = None) -> None:
    """Copy the weights, configs, tokenizer files and chat template (never pickles or subdirs);
    with ``key`` (a KEK), encrypted as :mod:`loft.registry.files` says."""
    for p in sorted(src.weights_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in _NOT_COPIED:
            continue
        if p.suffix in PICKLE_SUFFIXES:
            continue
        store_file(p, dest / p.name, key)


def file_records(root: Path) -> list[dict[str, Any]]:
    """[{path, sha256, bytes}] for every file in a version folder except the card (of the
    plaintext, for files encrypted at rest)."""
    return [
        {"path": rel, "sha256": sha256_file(root / rel), "bytes": plain_size(root / rel)}
        for rel in list_files(root)
        if rel != CARD
    ]


def tokenizer_facts(root: Path) -> tuple[str | None, dict[str, str | None]]:
    """The chat template and special tokens (pad, eos, bos) from the tokenizer files in ``root``."""
    cfg = (
        _read_json(root / "tokenizer_config.json")
        if (root / "tokenizer_config.json").is_file()
        else {}
    )
    template: str | None = None
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str):
        template = cfg["chat_template"]

    def token(key: str) -> str | None:
        value = cfg.get(key)
        if isinstance(value, dict):  # AddedToken serialised as a dict
            value = value.get("content")
        return value if isinstance(value, str) else None

    return template, {
        "pad": token("pad_token"),
        "eos": token("eos_token"),
        "bos": token("bos_token"),
    }


def data_report(fingerprint: str | None) -> dict[str, Any] | None:
    """The prepared dataset's report.json, when that dataset is still in LOFT_HOME."""
    if not fingerprint or not _FINGERPRINT_RE.match(fingerprint):
        return None
    path = datasets_dir() / fingerprint / "report.json"
    return _read_json(path) if path.is_file() else None


def _base_model(src: Source, root: Path) -> dict[str, Any]:
    base = src.lineage.get("base_model")
    if isinstance(base, dict):
        return {
            "name": base.get("name"),
            "sha256": base.get("sha256"),
            "source": base.get("source"),
        }
    name = src.summary.get("base_model") or (src.resolved or {}).get("base_model")
    if name is None and (root / "adapter_config.json").is_file():
        name = read_json(root / "adapter_config.json").get("base_model_name_or_path")
    return {"name": name, "sha256": None, "source": None}


def build_card(
    src: Source,
    root: Path,
    *,
    name: str,
    version: int,
    parent: dict[str, Any] | None,
    evaluations: list[dict[str, Any]],
    parents: list[dict[str, Any]] | None = None,
    study: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage card for the files already copied into ``root``; ``parents`` (every parent of
    a merge of several versions) is recorded beside ``parent`` (the first of them)."""
    from loft.tracking import system_tags  # tracking is a sibling layer; train is above us

    fingerprint = src.lineage.get("dataset_fingerprint") or src.summary.get("dataset_fingerprint")
    template, special = tokenizer_facts(root)
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "version": version,
        "kind": src.kind,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "lineage": {
            "base_model": _base_model(src, root),
            "dataset_fingerprint": fingerprint,
            "data_report": data_report(fingerprint),
            "config": src.lineage.get("config") or src.resolved,
            "chat_template": template,
            "special_tokens": special,
            "parent": parent,
            "run": {
                "path": str(src.run_dir) if src.run_dir else str(src.weights_dir),
                "run_id": src.summary.get("run_id"),
                "mlflow_run_id": src.summary.get("mlflow_run_id"),
                "trained_with_loft": src.lineage.get("loft_version"),
                "git_commit": src.lineage.get("git_commit"),
            },
            "loft_version": __version__,
            "git_commit": system_tags().get("mlflow.source.git.commit"),
        },
        "metrics": evals.latest_values(evaluations),
        "evaluations": evaluations,
        "files": file_records(root),
        "degraded": None,
    }
    if privacy := privacy_of(src):
        card["lineage"]["privacy"] = privacy
    if parents:
        card["lineage"]["parents"] = parents
    if study:
        card["lineage"]["study"] = study
    return card


def privacy_of(src: Source) -> dict[str, Any] | None:
    """A differentially private run's guarantee (loft.train.privacy): the epsilon it spent at
    delta, with the noise multiplier, sampling rate, steps and accountant behind it."""
    found = src.lineage.get("privacy") or src.summary.get("privacy")
    return dict(found) if isinstance(found, dict) else None


def describe_privacy(privacy: dict[str, Any] | None) -> str:
    """One line for a card: ``(7.98, 1e-05)-DP per example: DP-SGD, ...`` (epsilon, delta)."""
    if not privacy:
        return "none (not trained with differential privacy)"
    return (
        f"({privacy.get('epsilon', float('nan')):.3g}, {privacy.get('delta', float('nan')):.3g})"
        f"-DP per {privacy.get('unit', 'example')}: DP-SGD, noise multiplier "
        f"{privacy.get('noise_multiplier', float('nan')):.4g}, clip "
        f"{privacy.get('max_grad_norm')}, {privacy.get('sampling', 'poisson')} sampling at "
        f"{privacy.get('sample_rate', float('nan')):.4g}, {privacy.get('steps')} steps, "
        f"{privacy.get('accountant', 'rdp')} accountant"
    )


def source_entries(src: Source) -> list[dict[str, Any]]:
    """Evaluation entries for the numbers a training run recorded: its eval loss on the eval
    split of its prepared dataset (comparable across runs of that dataset), its final train
    loss (a property of that run alone) and any metrics in its lineage."""
    metrics: dict[str, float] = {}
    for key, value in [
        *((k, src.summary.get(k)) for k in ("final_train_loss", "eval_loss")),
        *(src.lineage.get("metrics") or {}).items(),
    ]:
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[str(key)] = float(value)
    fingerprint = src.lineage.get("dataset_fingerprint") or src.summary.get("dataset_fingerprint")
    report = data_report(fingerprint) or {}
    split = (
        {"kind": "train-eval-split", "fingerprint": fingerprint, "records": report["eval_records"]}
        if fingerprint and report.get("eval_records")
        else None
    )
    run = {"kind": "run", "run_id": src.summary.get("run_id")}
    return evals.make_entries(
        metrics,
        on=run,
        source="train",
        mlflow_run_id=src.summary.get("mlflow_run_id"),
        on_for=lambda m: split if m == "eval_loss" and split else run,
    )


def weights_digest(card: dict[str, Any]) -> str:
    """The fingerprint a server names for this version (``X-Loft-Adapter-Sha256``): sha256 over
    the sorted lines ``<path>:<sha256>\\n`` of its *.safetensors files, as listed on the card."""
    files = {
        f["path"]: f["sha256"]
        for f in card.get("files") or []
        if str(f.get("path", "")).endswith(WEIGHT_SUFFIX)
    }
    return combined_digest(files)


def verify_files(root: Path, card: dict[str, Any], *, ref: str) -> None:
    """Recompute every sha256 listed in the card; IntegrityError names the first bad file."""
    hint = (
        f"Do not load {ref}. Re-register it from its run (`loft registry register RUN_DIR`), or "
        f"roll back (`loft registry rollback {card.get('name', 'NAME')}`)."
    )
    records = card.get("files")
    if not isinstance(records, list) or not records:
        raise IntegrityError(
            f"{root / CARD} lists no files; it was not written by loft.", hint=hint
        )
    listed = {r["path"] for r in records}
    extra = [rel for rel in list_files(root) if rel != CARD and rel not in listed]
    if extra:
        weights = [rel for rel in extra if rel.endswith((WEIGHT_SUFFIX, *PICKLE_SUFFIXES))]
        what = "weight file(s)" if weights else "file(s)"
        raise IntegrityError(
            f"{ref}: unexpected {what} {', '.join(weights or extra)} in {root}, not listed in "
            f"{CARD}.",
            hint=hint,
        )
    for rec in records:
        path = root / rec["path"]
        if not path.is_file():
            raise IntegrityError(f"{ref}: {path} is missing (listed in {CARD}).", hint=hint)
        try:
            size = plain_size(path)
            digest = sha256_file(path)  # decrypted chunk by chunk when encrypted at rest
        except WrongKeyError as e:  # encrypted under another KEK: its hint says what to do
            raise WrongKeyError(f"{ref}: {e.message}", hint=e.hint) from None
        except IntegrityError as e:  # an encrypted file that does not authenticate
            raise IntegrityError(f"{ref}: {e.message}", hint=hint) from None
        if size != rec["bytes"]:
            kind = "truncated" if size < rec["bytes"] else "larger than recorded"
            raise IntegrityError(
                f"{ref}: {path} is {kind}: {size} bytes, {CARD} records {rec['bytes']}.", hint=hint
            )
        if digest != rec["sha256"]:
            raise IntegrityError(
                f"{ref}: {path} has sha256 {digest[:16]}…, but {CARD} records "
                f"{rec['sha256'][:16]}…; the file was modified or corrupted.",
                hint=hint,
            )


def read_card(root: Path, *, ref: str) -> dict[str, Any]:
    path = root / CARD
    if not path.is_file():
        raise IntegrityError(
            f"{ref}: {path} is missing, so the version's files cannot be trusted.",
            hint="Re-register the model from its run dir with `loft registry register`.",
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{ref}: {path} is not valid JSON ({e}).") from None
    if not isinstance(card, dict):
        raise IntegrityError(f"{ref}: {path} is not a JSON object.")
    return card
