"""prepare: read → validate → dedup → PII → split → tokenize → save, cached by fingerprint.

Layout: ``LOFT_HOME/datasets/<fingerprint>/{train,eval}/`` (HF ``save_to_disk``), ``report.json``,
and ``MANIFEST.json`` written last — a directory without a manifest is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loft.core.errors import DataError, IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, atomic_write_json, datasets_dir, read_json_object
from loft.core.specs import DataSpec
from loft.data.canaries import CANARIES_FILE, canaries_doc, canary_records, make_canaries
from loft.data.clean import dedup, remove_overlap, scan_pii
from loft.data.formats import Record, canonical_json
from loft.data.readers import FileResult, read_file
from loft.data.template import IGNORE_INDEX, tokenize_record, tokenizer_fingerprint
from loft.data.validate import MAX_SHOWN, raise_for_problems

if TYPE_CHECKING:
    import datasets

PREP_VERSION = 1
PROGRESS_MIN = 1000
MANIFEST = "MANIFEST.json"
REPORT = "report.json"


@dataclass
class PreparedDataset:
    fingerprint: str
    path: Path
    report: dict[str, Any]
    train: datasets.Dataset  # columns input_ids, labels, length
    eval: datasets.Dataset | None


# ------------------------------------------------------------------------------------ reading


def _read_inputs(spec: DataSpec) -> tuple[FileResult, FileResult | None]:
    if spec.format == "preference":
        raise _preference_error(spec.train)
    train = read_file(spec.train, format=spec.format, column_map=spec.column_map)
    ev = read_file(spec.eval, format=spec.format, column_map=spec.column_map) if spec.eval else None
    for res in (train, ev):
        if res is not None and res.format == "preference":
            raise _preference_error(res.path)
    results = [r for r in (train, ev) if r is not None]
    problems = [p for r in results for p in r.problems]
    n_invalid = sum(r.n_invalid for r in results)
    n_records = sum(r.n_records for r in results)
    if problems and not spec.skip_invalid:
        what = " and ".join(r.path for r in results)
        raise_for_problems(problems, n_invalid, n_records, what)
    if not train.records:
        raise DataError(
            f"{train.path}: no valid records to train on ({train.n_records} read)",
            problems=problems,
            hint="Run `loft data validate FILE` to see every problem.",
        )
    return train, ev


def _preference_error(path: str) -> DataError:
    return DataError(
        f"{path}: preference data (prompt/chosen/rejected) is for preference training (DPO), "
        "which prepares its data separately; supervised fine-tuning needs chat, sharegpt, "
        "alpaca or completion records",
        hint="Use `loft data validate FILE` to check a preference file.",
    )


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------- fingerprint


def _settings(spec: DataSpec) -> dict[str, Any]:
    """The prep settings that change the output (packing happens later, at training)."""
    return {
        "format": spec.format,
        "column_map": dict(sorted(spec.column_map.items())),
        "max_seq_len": spec.max_seq_len,
        "train_on_inputs": spec.train_on_inputs,
        "eval_file": spec.eval is not None,
        "eval_fraction": None if spec.eval else spec.eval_fraction,
        "dedup": spec.dedup,
        "near_dup_threshold": spec.near_dup_threshold if spec.dedup else None,
        "pii": spec.pii,
        "skip_invalid": spec.skip_invalid,
        **({"canaries": spec.canaries} if spec.canaries else {}),
    }


def compute_fingerprint(
    spec: DataSpec, train: FileResult, ev: FileResult | None, tokenizer_fp: str
) -> str:
    h = hashlib.sha256()
    head = {"version": PREP_VERSION, "settings": _settings(spec), "tokenizer": tokenizer_fp}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, res in (("train", train), ("eval", ev)):
        if res is None:
            continue
        h.update(f"\0{name}:{len(res.records)}:{res.n_invalid}\0".encode())
        for r in res.records:
            h.update(canonical_json(r.data).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------- splitting


def _record_hash(r: Record) -> str:
    return hashlib.sha256(canonical_json(r.data).encode()).hexdigest()


def split_eval(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """Pick ``fraction`` of records by sorting on the sha256 of each normalised record, so the
    split does not depend on file order; at least one when fraction > 0 and n >= 2."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return records, []
    k = min(n - 1, max(1, round(n * fraction)))
    chosen = set(sorted(range(n), key=lambda i: (_record_hash(records[i]), i))[:k])
    train = [r for i, r in enumerate(records) if i not in chosen]
    return train, [r for i, r in enumerate(records) if i in chosen]


# --------------------------------------------------------------------------------- tokenizing


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Any]:
    if not enabled or total <= PROGRESS_MIN:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _tokenize(
    records: list[Record], tokenizer: Any, spec: DataSpec, label: str, progress: bool
) -> tuple[dict[str, list], int, int]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    truncated = empty = 0
    with _progress(len(records), label, progress) as tick:
        for r in records:
            out = tokenize_record(
                r.data,
                tokenizer,
                max_seq_len=spec.max_seq_len,
                train_on_inputs=spec.train_on_inputs,
            )
            tick()
            truncated += out["truncated"]
            if all(lab == IGNORE_INDEX for lab in out["labels"]):
                empty += 1
                continue
            rows["input_ids"].append(out["input_ids"])
            rows["labels"].append(out["labels"])
            rows["length"].append(len(out["input_ids"]))
    return rows, truncated, empty


def length_stats(rows: dict[str, list]) -> dict[str, Any] | None:
    lengths = sorted(rows["length"])
    if not lengths:
        return None

    def pct(q: float) -> int:
        return lengths[max(0, math.ceil(q * len(lengths)) - 1)]

    trained = sum(sum(lab != IGNORE_INDEX for lab in labels) for labels in rows["labels"])
    return {
        "records": len(lengths),
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "mean": round(sum(lengths) / len(lengths), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": lengths[-1],
    }


def _to_dataset(rows: dict[str, list]) -> datasets.Dataset:
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ------------------------------------------------------------------------------------ prepare


def prepare_dataset(spec: DataSpec, tokenizer: Any, *, progress: bool = True) -> PreparedDataset:
    """Validate, clean, split and tokenize ``spec.train`` (and ``spec.eval``); cached by
    fingerprint. Raises DataError listing every invalid record unless ``spec.skip_invalid``."""
    train_res, eval_res = _read_inputs(spec)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = compute_fingerprint(spec, train_res, eval_res, tok_fp)
    if (datasets_dir() / fp / MANIFEST).is_file():
        return load_prepared(fp)

    counts: dict[str, Any] = {
        "records": train_res.n_records + (eval_res.n_records if eval_res else 0),
        "invalid": train_res.n_invalid + (eval_res.n_invalid if eval_res else 0),
    }
    counts["dropped_invalid"] = counts["invalid"]  # only reachable with skip_invalid
    counts["valid"] = counts["records"] - counts["invalid"]
    if counts["dropped_invalid"] and progress:
        _say(
            f"skipped {counts['dropped_invalid']} invalid of {counts['records']} records "
            "(--skip-invalid); `loft data validate FILE` lists them"
        )

    train_records = train_res.records
    eval_records = eval_res.records if eval_res else []
    counts["exact_dups"] = counts["near_dups"] = counts["eval_overlap"] = 0
    removed: list[str] = []
    if spec.dedup:
        d_train = dedup(train_records, threshold=spec.near_dup_threshold)
        train_records, removed = d_train.kept, d_train.removed
        counts["exact_dups"], counts["near_dups"] = d_train.exact_dups, d_train.near_dups
    if eval_res is not None:
        if spec.dedup:
            d_eval = dedup(eval_records, threshold=spec.near_dup_threshold)
            eval_records = d_eval.kept
            counts["exact_dups"] += d_eval.exact_dups
            counts["near_dups"] += d_eval.near_dups
        eval_records, counts["eval_overlap"] = remove_overlap(eval_records, train_records)
    else:
        train_records, eval_records = split_eval(train_records, spec.eval_fraction)

    scanned, pii = scan_pii(train_records + eval_records, mode=spec.pii)
    train_records, eval_records = scanned[: len(train_records)], scanned[len(train_records) :]
    canaries: dict[str, Any] | None = None
    if spec.canaries:  # after dedup, split and PII, so they are all trained on and never dropped
        canaries = _canaries(spec.canaries, fp)
        train_records = train_records + [
            Record(file="<canaries>", line=i, format="chat", data=d)
            for i, d in enumerate(canary_records(canaries["canaries"]))
        ]

    train_rows, t_trunc, t_empty = _tokenize(
        train_records, tokenizer, spec, "tokenizing train", progress
    )
    eval_rows, e_trunc, e_empty = _tokenize(
        eval_records, tokenizer, spec, "tokenizing eval", progress
    )
    counts["truncated"] = t_trunc + e_trunc
    counts["empty_after_truncation"] = e_empty + t_empty
    counts["train_records"] = len(train_rows["length"])
    counts["eval_records"] = len(eval_rows["length"])
    if spec.canaries:
        counts["canaries"] = spec.canaries
    if not counts["train_records"]:
        raise DataError(
            f"{train_res.path}: no training rows left after cleaning and truncation "
            f"({t_empty} had no trained tokens within max_seq_len={spec.max_seq_len})",
            hint="Raise data.max_seq_len (--max-seq-len), or check the report of "
            "`loft data prepare FILE`.",
        )

    report = {
        "fingerprint": fp,
        "cached": False,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": train_res.format,
        "files": _files(train_res, eval_res),
        "settings": _settings(spec),
        "tokenizer": {"fingerprint": tok_fp, "name": str(getattr(tokenizer, "name_or_path", ""))},
        **counts,
        "dedup": {"enabled": spec.dedup, "removed_examples": removed},
        "pii": pii,
        "stats": {"train": length_stats(train_rows), "eval": length_stats(eval_rows)},
        "problems": [p for r in (train_res, eval_res) if r for p in r.problems][:MAX_SHOWN],
    }
    _save(fp, report, train_rows, eval_rows, canaries)
    prepared = load_prepared(fp)
    prepared.report["cached"] = False
    return prepared


def _files(train: FileResult, ev: FileResult | None) -> dict[str, Any]:
    out = {}
    for name, res in (("train", train), ("eval", ev)):
        if res is not None:
            out[name] = {
                "path": str(Path(res.path).resolve()),
                "sha256": _sha256_file(res.path),
                "format": res.format,
                "records": res.n_records,
                "invalid": res.n_invalid,
            }
    return out


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {msg}")


def _canaries(n: int, fp: str) -> dict[str, Any]:
    """``n`` canaries seeded by the fingerprint, so the same inputs give the same canaries."""
    seed = int(fp[:16], 16)
    return canaries_doc(make_canaries(n, seed), seed)


def _save(
    fp: str,
    report: dict[str, Any],
    train_rows: dict,
    eval_rows: dict,
    canaries: dict[str, Any] | None = None,
) -> None:
    final = datasets_dir() / fp
    try:
        with _quiet_datasets(), atomic_dir(final, overwrite=not (final / MANIFEST).exists()) as tmp:
            _to_dataset(train_rows).save_to_disk(str(tmp / "train"))
            if eval_rows["length"]:
                _to_dataset(eval_rows).save_to_disk(str(tmp / "eval"))
            atomic_write_json(tmp / REPORT, report)
            if canaries is not None:
                atomic_write_json(tmp / CANARIES_FILE, canaries)
            files = {
                str(p.relative_to(tmp)): {"sha256": _sha256_file(p), "size": p.stat().st_size}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "kind": "loft.prepared_dataset",
                "version": PREP_VERSION,
                "fingerprint": fp,
                "created_at": report["created_at"],
                "train_rows": report["train_records"],
                "eval_rows": report["eval_records"],
                "files": files,
            }
            atomic_write_json(tmp / MANIFEST, manifest)
    except FileExistsError:
        if not (final / MANIFEST).is_file():  # another process finished first; else a real error
            raise


# --------------------------------------------------------------------------------------- load


def resolve_fingerprint(ref: str) -> str:
    """A full fingerprint or a unique prefix of one (at least 6 characters)."""
    root = datasets_dir()
    if (root / ref / MANIFEST).is_file():
        return ref
    found = (
        sorted(
            p.name for p in root.iterdir() if p.name.startswith(ref) and (p / MANIFEST).is_file()
        )
        if len(ref) >= 6 and not ref.startswith(".")
        else []
    )
    if len(found) == 1:
        return found[0]
    have = sorted(p.name[:12] for p in root.iterdir() if (p / MANIFEST).is_file())
    if len(found) > 1:
        names = ", ".join(f[:12] for f in found)
        raise NotFoundError(f"dataset prefix {ref!r} is ambiguous: {names}")
    listing = ", ".join(have[:10]) if have else "none"
    raise NotFoundError(
        f"no prepared dataset {ref!r} in {root} (prepared: {listing})",
        hint="Prepare one with `loft data prepare FILE`.",
    )


def cached_report(spec: DataSpec, tokenizer_fp: str) -> tuple[str, Path, dict[str, Any]] | None:
    """(fingerprint, path, report) when ``spec`` with a tokenizer of fingerprint ``tokenizer_fp``
    is already prepared, reading only the inputs and report.json (no tokenizer, no Arrow)."""
    train_res, eval_res = _read_inputs(spec)
    fp = compute_fingerprint(spec, train_res, eval_res, tokenizer_fp)
    path = datasets_dir() / fp
    if not (path / MANIFEST).is_file():
        return None
    report = read_json_object(path / REPORT)
    if not report:
        return None
    return fp, path, {**report, "cached": True}


def load_prepared(fingerprint: str) -> PreparedDataset:
    """Open a prepared dataset (memory-mapped); the report says ``cached: true``."""
    import datasets

    fp = resolve_fingerprint(fingerprint)
    path = datasets_dir() / fp
    try:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
        with _quiet_datasets():
            train = datasets.load_from_disk(str(path / "train"))
            ev = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    except (OSError, ValueError) as e:
        raise IntegrityError(
            f"prepared dataset {path} is damaged ({e})",
            hint=f"Delete {path} and run `loft data prepare` again.",
        ) from None
    report["cached"] = True
    return PreparedDataset(fingerprint=fp, path=path, report=report, train=train, eval=ev)
