"""prepare: read → validate → dedup → PII → split → tokenize → save, cached by fingerprint.

Layout: ``LOFT_HOME/datasets/<fingerprint>/{train,eval}/`` (HF ``save_to_disk``), ``report.json``,
and ``MANIFEST.json`` written last — a directory without a manifest is not a dataset.

The reading, cleaning, splitting, report and cache here are shared by the SFT rows built in this
module (``input_ids``, ``labels``) and the preference rows built in ``loft.data.preference``; the
report's ``layout`` says which: ``sft``, ``paired`` (dpo, orpo, simpo) or ``unpaired`` (kto).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loft.core.errors import DataError, IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, atomic_write_json, datasets_dir, read_json_object
from loft.core.specs import DataSpec
from loft.data.canaries import CANARIES_FILE, canaries_doc, canary_records, make_canaries
from loft.data.clean import dedup, remove_overlap, scan_pii
from loft.data.formats import Layout, Record, canonical_json, check_layout, layout_for
from loft.data.readers import FileResult, read_file
from loft.data.template import IGNORE_INDEX, tokenize_record, tokenizer_fingerprint
from loft.data.validate import MAX_SHOWN, raise_for_problems

if TYPE_CHECKING:
    import datasets

PREP_VERSION = 1
PREFERENCE_VERSION = 1  # of preference rows; in the fingerprint of paired and unpaired datasets
PROGRESS_MIN = 1000
MANIFEST = "MANIFEST.json"
REPORT = "report.json"


@dataclass
class PreparedDataset:
    fingerprint: str
    path: Path
    report: dict[str, Any]
    # sft: input_ids, labels, length; paired: prompt_ids, chosen_ids, rejected_ids, length;
    # unpaired: prompt_ids, completion_ids, label, length
    train: datasets.Dataset
    eval: datasets.Dataset | None

    @property
    def layout(self) -> Layout:
        return self.report.get("layout", "sft")


# ------------------------------------------------------------------------------------ reading


def _read(spec: DataSpec) -> tuple[FileResult, FileResult | None]:
    train = read_file(spec.train, format=spec.format, column_map=spec.column_map)
    ev = read_file(spec.eval, format=spec.format, column_map=spec.column_map) if spec.eval else None
    return train, ev


def _checked(
    spec: DataSpec, train: FileResult, ev: FileResult | None, layout: Layout
) -> tuple[FileResult, FileResult | None]:
    """The inputs, once their format suits ``layout`` and every problem is reported (or
    skipped with ``spec.skip_invalid``)."""
    for res in (train, ev):
        if res is not None:
            check_layout(res.path, res.format, layout)
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


def read_inputs(spec: DataSpec, layout: Layout = "sft") -> tuple[FileResult, FileResult | None]:
    if spec.format != "auto":
        check_layout(spec.train, spec.format, layout)
    return _checked(spec, *_read(spec), layout)


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------- fingerprint


def _settings(spec: DataSpec, layout: Layout = "sft") -> dict[str, Any]:
    """The prep settings that change the output (packing happens later, at training)."""
    settings = {
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
    if layout != "sft":  # no prompt training, no canaries; exact duplicates only
        del settings["train_on_inputs"]
        settings.pop("canaries", None)
        settings["near_dup_threshold"] = None
        settings["layout"] = layout
    return settings


def compute_fingerprint(
    spec: DataSpec,
    train: FileResult,
    ev: FileResult | None,
    tokenizer_fp: str,
    layout: Layout = "sft",
) -> str:
    h = hashlib.sha256()
    head: dict[str, Any] = {
        "version": PREP_VERSION,
        "settings": _settings(spec, layout),
        "tokenizer": tokenizer_fp,
    }
    if layout != "sft":
        head["preference"] = {
            "version": PREFERENCE_VERSION,
            "layout": layout,
            "format": train.format,
        }
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


def split_eval(
    records: list[Record], fraction: float, *, group: Callable[[Record], str] | None = None
) -> tuple[list[Record], list[Record]]:
    """Pick ``fraction`` of records by sorting on the sha256 of each normalised record, so the
    split does not depend on file order; at least one when fraction > 0 and n >= 2.

    With ``group`` (e.g. a record's prompt), records of one group go to the same side (sorted on
    the sha256 of the group's key), so an eval prompt is never also a training prompt."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return records, []
    k = min(n - 1, max(1, round(n * fraction)))
    if group is None:
        chosen = set(sorted(range(n), key=lambda i: (_record_hash(records[i]), i))[:k])
    else:
        keys = [hashlib.sha256(group(r).encode()).hexdigest() for r in records]
        sizes = Counter(keys)
        picked: set[str] = set()
        for key in sorted(sizes)[:-1]:  # the last group always stays in train
            if sum(sizes[g] for g in picked) >= k:
                break
            picked.add(key)
        chosen = {i for i, key in enumerate(keys) if key in picked}
    train = [r for i, r in enumerate(records) if i not in chosen]
    return train, [r for i, r in enumerate(records) if i in chosen]


# --------------------------------------------------------------------------------- tokenizing


@contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Any]:
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
    with progress_bar(len(records), label, progress) as tick:
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


def length_summary(lengths: list[int]) -> dict[str, Any]:
    """records, tokens, mean, p50, p95 and max of row lengths (non-empty)."""
    lengths = sorted(lengths)

    def pct(q: float) -> int:
        return lengths[max(0, math.ceil(q * len(lengths)) - 1)]

    return {
        "records": len(lengths),
        "tokens": sum(lengths),
        "mean": round(sum(lengths) / len(lengths), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": lengths[-1],
    }


def length_stats(rows: dict[str, list]) -> dict[str, Any] | None:
    if not rows["length"]:
        return None
    stats = length_summary(rows["length"])
    trained = sum(sum(lab != IGNORE_INDEX for lab in labels) for labels in rows["labels"])
    return {**stats, "trained_tokens": trained}


def sft_features() -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )


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


@dataclass
class Cleaned:
    """Records after dedup, the eval split and the PII scan, with the report's counts."""

    train: list[Record]
    eval: list[Record]
    counts: dict[str, Any]
    removed: list[str]  # locations of the first few duplicates removed
    pii: dict[str, Any]


def clean_and_split(
    spec: DataSpec,
    train_res: FileResult,
    eval_res: FileResult | None,
    *,
    near_dups: bool = True,
    group: Callable[[Record], str] | None = None,
    progress: bool = True,
) -> Cleaned:
    """Dedup (exact, and near when ``near_dups``), drop eval records also in train, split off
    the eval share (whole ``group``s together) and scan for PII, as ``spec`` says."""
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
    near = near_dups and spec.dedup
    if spec.dedup:
        d_train = dedup(train_records, threshold=spec.near_dup_threshold, near=near)
        train_records, removed = d_train.kept, d_train.removed
        counts["exact_dups"], counts["near_dups"] = d_train.exact_dups, d_train.near_dups
    if eval_res is not None:
        if spec.dedup:
            d_eval = dedup(eval_records, threshold=spec.near_dup_threshold, near=near)
            eval_records = d_eval.kept
            counts["exact_dups"] += d_eval.exact_dups
            counts["near_dups"] += d_eval.near_dups
        eval_records, counts["eval_overlap"] = remove_overlap(eval_records, train_records)
    else:
        train_records, eval_records = split_eval(train_records, spec.eval_fraction, group=group)

    scanned, pii = scan_pii(train_records + eval_records, mode=spec.pii)
    train_records, eval_records = scanned[: len(train_records)], scanned[len(train_records) :]
    return Cleaned(train_records, eval_records, counts, removed, pii)


def build_report(
    fp: str,
    spec: DataSpec,
    layout: Layout,
    inputs: tuple[FileResult, FileResult | None],
    tokenizer: Any,
    tokenizer_fp: str,
    cleaned: Cleaned,
    counts: dict[str, Any],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """report.json: what was read, removed, dropped and kept, and the rows' token counts."""
    train_res, eval_res = inputs
    return {
        "fingerprint": fp,
        "cached": False,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": train_res.format,
        "layout": layout,
        "files": _files(train_res, eval_res),
        "settings": _settings(spec, layout),
        "tokenizer": {
            "fingerprint": tokenizer_fp,
            "name": str(getattr(tokenizer, "name_or_path", "")),
        },
        **counts,
        "dedup": {"enabled": spec.dedup, "removed_examples": cleaned.removed},
        "pii": cleaned.pii,
        "stats": stats,
        "problems": [p for r in (train_res, eval_res) if r for p in r.problems][:MAX_SHOWN],
    }


def no_rows_error(path: str, why: str) -> DataError:
    return DataError(
        f"{path}: no training rows left after cleaning and truncation ({why})",
        hint="Raise data.max_seq_len (--max-seq-len), or check the report of "
        "`loft data prepare FILE`.",
    )


def prepare_dataset(spec: DataSpec, tokenizer: Any, *, progress: bool = True) -> PreparedDataset:
    """Validate, clean, split and tokenize ``spec.train`` (and ``spec.eval``); cached by
    fingerprint. Raises DataError listing every invalid record unless ``spec.skip_invalid``,
    and for preference data (see :func:`loft.data.prepare_preference_dataset`)."""
    return prepare_sft_inputs(spec, tokenizer, read_inputs(spec, "sft"), progress)


def prepare_for(
    spec: DataSpec, tokenizer: Any, *, objective: str = "auto", progress: bool = True
) -> PreparedDataset:
    """Prepare ``spec`` for ``objective`` (sft, dpo, kto, orpo, simpo, or auto: what the file
    holds); the inputs are read once."""
    from loft.data.preference import prepare_preference_inputs

    train, ev = _read(spec)
    layout = layout_for(objective, train.format)
    inputs = _checked(spec, train, ev, layout)
    if layout == "sft":
        return prepare_sft_inputs(spec, tokenizer, inputs, progress)
    return prepare_preference_inputs(
        spec, tokenizer, inputs, paired=layout == "paired", progress=progress
    )


def prepare_sft_inputs(
    spec: DataSpec,
    tokenizer: Any,
    inputs: tuple[FileResult, FileResult | None],
    progress: bool,
) -> PreparedDataset:
    train_res, eval_res = inputs
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = compute_fingerprint(spec, train_res, eval_res, tok_fp)
    if (datasets_dir() / fp / MANIFEST).is_file():
        return load_prepared(fp)

    cleaned = clean_and_split(spec, train_res, eval_res, progress=progress)
    counts = cleaned.counts
    train_records = cleaned.train
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
        cleaned.eval, tokenizer, spec, "tokenizing eval", progress
    )
    counts["truncated"] = t_trunc + e_trunc
    counts["empty_after_truncation"] = e_empty + t_empty
    counts["train_records"] = len(train_rows["length"])
    counts["eval_records"] = len(eval_rows["length"])
    if spec.canaries:
        counts["canaries"] = spec.canaries
    if not counts["train_records"]:
        raise no_rows_error(
            train_res.path,
            f"{t_empty} had no trained tokens within max_seq_len={spec.max_seq_len}",
        )

    stats = {"train": length_stats(train_rows), "eval": length_stats(eval_rows)}
    report = build_report(fp, spec, "sft", inputs, tokenizer, tok_fp, cleaned, counts, stats)
    save_prepared(fp, report, sft_features(), train_rows, eval_rows, canaries)
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


def save_prepared(
    fp: str,
    report: dict[str, Any],
    features: datasets.Features,
    train_rows: dict[str, list],
    eval_rows: dict[str, list],
    canaries: dict[str, Any] | None = None,
) -> None:
    """Write the rows (Arrow, ``features``), the report and the manifest (last) under
    ``LOFT_HOME/datasets/<fp>``; a concurrent writer that finished first wins."""
    import datasets

    final = datasets_dir() / fp
    try:
        with _quiet_datasets(), atomic_dir(final, overwrite=not (final / MANIFEST).exists()) as tmp:
            datasets.Dataset.from_dict(train_rows, features=features).save_to_disk(
                str(tmp / "train")
            )
            if eval_rows["length"]:
                datasets.Dataset.from_dict(eval_rows, features=features).save_to_disk(
                    str(tmp / "eval")
                )
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
                "layout": report["layout"],
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


def cached_report(
    spec: DataSpec, tokenizer_fp: str, *, objective: str = "sft"
) -> tuple[str, Path, dict[str, Any]] | None:
    """(fingerprint, path, report) when ``spec`` for ``objective`` (see :func:`prepare_for`)
    with a tokenizer of fingerprint ``tokenizer_fp`` is already prepared, reading only the
    inputs and report.json (no tokenizer, no Arrow)."""
    train, ev = _read(spec)
    layout = layout_for(objective, train.format)
    train_res, eval_res = _checked(spec, train, ev, layout)
    fp = compute_fingerprint(spec, train_res, eval_res, tokenizer_fp, layout)
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
