"""The dataset catalog: named, versioned datasets under ``LOFT_HOME/catalog/<name>/<version>/``.

A version is a folder holding

- ``data.jsonl``: one canonical record per line (``formats.canonical_json``: sorted keys);
- ``data.idx``: the byte offset of every line as little-endian uint64, plus the file's size, so
  ``read_records(ref, offset, limit)`` reads two small ranges at any offset;
- ``version.json``: name, version, records, sha256 of ``data.jsonl``, layout, source, parents,
  created_by, created_at. Written last: a folder without it is not a version;
- ``report.json`` (later, once): stats, PII findings, duplicates and the fingerprint.

The folder is built under a hidden temp name and renamed into place (complete or invisible).
Version numbers count from 1 per name; ``add_version`` holds ``catalog/<name>/.lock`` while it
picks the next number, so concurrent writers never share one. Records are validated with the
same readers as ``loft data validate`` (every problem ``FILE:LINE: field: reason``) and nothing
is stored when any record is invalid. Every version goes into the audit trail with its actor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core import audit
from loft.core.errors import ConfigError, DataError, NotFoundError
from loft.core.paths import atomic_dir, atomic_write_json, file_lock, loft_home, read_json_object
from loft.data.formats import Record, canonical_json, record_text
from loft.data.readers import read_file
from loft.data.validate import problems_message

VERSION_FILE = "version.json"
DATA_FILE = "data.jsonl"
INDEX_FILE = "data.idx"
REPORT_FILE = "report.json"
LAYOUTS = ("sft", "preference", "kto")
SOURCE_KINDS = ("upload", "labelling", "comparison", "served", "derived")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
_REF_RE = re.compile(r"^(?P<name>[^:]+)(?::(?P<version>[1-9][0-9]{0,8}))?$")
_REF_HINT = "A dataset reference is NAME (the latest version) or NAME:VERSION (e.g. support:3)."
_IDX = 8  # bytes per offset
REPORT_SCHEMA = 1


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    path: Path  # data.jsonl
    records: int
    sha256: str
    layout: str  # sft | preference | kto
    source: dict[str, Any]
    parents: tuple[str, ...]
    created_by: str | None
    created_at: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["parents"] = list(self.parents)
        d["ref"] = self.ref
        return d


# ------------------------------------------------------------------------------------ names


def catalog_dir() -> Path:
    p = loft_home() / "catalog"
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_name(name: str) -> str:
    """``name`` if it is a valid dataset name, else ConfigError naming it."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, with no path separators and no '..'.",
            hint="Use a plain name such as support-chats.",
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name:3"`` -> (name, 3); ``"name"`` -> (name, None). ConfigError when malformed."""
    m = _REF_RE.match(ref) if isinstance(ref, str) else None
    if m is None:
        raise ConfigError(f"invalid dataset reference {ref!r}", hint=_REF_HINT)
    version = m.group("version")
    return check_name(m.group("name")), int(version) if version else None


def _version_numbers(name: str) -> list[int]:
    """Complete versions of ``name``, ascending (folders with a version.json)."""
    folder = catalog_dir() / name
    if not folder.is_dir():
        return []
    out = [
        int(e.name)
        for e in os.scandir(folder)
        if e.name.isdigit() and os.path.isfile(os.path.join(e.path, VERSION_FILE))
    ]
    return sorted(out)


def _dataset_names() -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(catalog_dir())
        if e.is_dir() and not e.name.startswith(".") and NAME_RE.match(e.name)
    )


def _not_found(name: str, version: int | None = None) -> NotFoundError:
    versions = _version_numbers(name)
    if not versions:
        names = _dataset_names()
        shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
        return NotFoundError(
            f"no dataset named {name!r} in the catalog"
            + (f" (datasets: {shown})" if names else " (the catalog is empty)"),
            hint="Upload one on the portal's Datasets page (or POST /api/datasets/NAME).",
        )
    return NotFoundError(
        f"dataset {name!r} has no version {version} (versions: 1-{versions[-1]})"
        if versions == list(range(1, versions[-1] + 1))
        else f"dataset {name!r} has no version {version} (versions: "
        + ", ".join(map(str, versions))
        + ")",
        hint=f"Use {name}:{versions[-1]} for the latest, or {name} alone.",
    )


def _load(name: str, version: int) -> DatasetVersion:
    folder = catalog_dir() / name / str(version)
    doc = read_json_object(folder / VERSION_FILE)
    if not doc:
        raise _not_found(name, version)
    return DatasetVersion(
        name=doc["name"],
        version=int(doc["version"]),
        path=folder / DATA_FILE,
        records=int(doc["records"]),
        sha256=doc["sha256"],
        layout=doc["layout"],
        source=dict(doc.get("source") or {}),
        parents=tuple(doc.get("parents") or ()),
        created_by=doc.get("created_by"),
        created_at=doc["created_at"],
    )


def get_version(ref: str) -> DatasetVersion:
    """``"name:3"``, or ``"name"`` for the latest version; NotFoundError when absent."""
    name, version = parse_ref(ref)
    if version is None:
        versions = _version_numbers(name)
        if not versions:
            raise _not_found(name)
        version = versions[-1]
    return _load(name, version)


def list_datasets(limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """A page of datasets by name: name, latest, versions, records, layout, updated; and the
    number of datasets in all. Reads only the page's latest version.json files."""
    names = [n for n in _dataset_names() if _version_numbers(n)]
    rows = []
    for name in names[offset : offset + limit]:
        versions = _version_numbers(name)
        latest = _load(name, versions[-1])
        rows.append(
            {
                "name": name,
                "latest": latest.version,
                "versions": len(versions),
                "records": latest.records,
                "layout": latest.layout,
                "updated": latest.created_at,
                "created_by": latest.created_by,
            }
        )
    return rows, len(names)


def list_versions(name: str, limit: int, offset: int) -> tuple[list[DatasetVersion], int]:
    """A page of ``name``'s versions, newest first, and how many there are; NotFoundError when
    the dataset does not exist."""
    versions = _version_numbers(check_name(name))
    if not versions:
        raise _not_found(name)
    page = list(reversed(versions))[offset : offset + limit]
    return [_load(name, v) for v in page], len(versions)


# ------------------------------------------------------------------------------------ adding


def _layout(fmt: str | None) -> str:
    return fmt if fmt in ("preference", "kto") else "sft"


def _check_source(source: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
        raise ConfigError(
            f"a dataset version's source must be a dict with a 'kind' in "
            f"{', '.join(SOURCE_KINDS)}; got {source!r}",
            hint='For example {"kind": "upload", "filename": "chats.jsonl"}.',
        )
    return json.loads(json.dumps(source, default=str))


def _check_parents(parents: Sequence[str]) -> list[str]:
    """Each parent must be an existing dataset version; returned as ``name:N``."""
    if isinstance(parents, str):
        raise ConfigError("parents must be a list of dataset references, not one string")
    return [get_version(p).ref for p in parents]


def _validated(file: Path, display: str) -> list[Record]:
    """Every record of ``file`` in canonical form; DataError naming ``display``:LINE for each
    problem (the uploaded file's own name, not where it was saved)."""
    real = str(file)

    def shown(text: str) -> str:
        return display + text[len(real) :] if text.startswith(real) else text

    try:
        res = read_file(file)
    except DataError as e:  # the whole file is unreadable (UTF-16, wrong type, not an array)
        raise DataError(shown(e.message), problems=[shown(e.message)], hint=e.hint) from None

    problems = [shown(p) for p in res.problems]
    if problems:
        raise DataError(
            problems_message(problems, res.n_invalid, res.n_records, display),
            problems=problems,
            hint="Fix the records above and upload the file again; nothing was stored.",
        )
    return res.records


def _records_file(records: Iterable[dict[str, Any]], folder: Path, display: str) -> Path:
    """Canonical dicts written as JSONL, so they are validated by the same reader as files."""
    path = folder / (Path(display).stem + ".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            if not isinstance(r, dict):
                raise DataError(f"{display}: records must be dicts, got {type(r).__name__}")
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _write_data(records: list[Record], folder: Path) -> str:
    """data.jsonl and data.idx; returns data.jsonl's sha256."""
    h = hashlib.sha256()
    offsets = bytearray()
    pos = 0
    with open(folder / DATA_FILE, "wb") as f:
        for r in records:
            line = (canonical_json(r.data) + "\n").encode("utf-8")
            offsets += pos.to_bytes(_IDX, "little")
            f.write(line)
            h.update(line)
            pos += len(line)
    offsets += pos.to_bytes(_IDX, "little")
    (folder / INDEX_FILE).write_bytes(bytes(offsets))
    return h.hexdigest()


def add_version(
    name: str,
    records: Iterable[dict[str, Any]] | None = None,
    *,
    file: Path | None = None,
    source: dict[str, Any],
    parents: Sequence[str] = (),
    created_by: str | None = None,
    filename: str | None = None,
    context: dict[str, Any] | None = None,
) -> DatasetVersion:
    """Store a new version of ``name`` (1, 2, ...) from exactly one of ``records`` (canonical
    dicts) or ``file`` (any format loft.data reads: .jsonl, .json, .csv, .parquet).

    Every record is validated first; any problem raises DataError listing each as
    ``FILE:LINE: field: reason`` (FILE is ``filename`` when given, e.g. an upload's own name) and
    nothing is stored. Audited as ``dataset.version`` on ``name:version`` by ``created_by``, with
    ``context`` (e.g. the portal's ``{"via", "ip"}``) added to the entry's details."""
    check_name(name)
    if (records is None) == (file is None):
        raise ConfigError("add_version takes exactly one of records or file")
    source = _check_source(source)
    parent_refs = _check_parents(parents)
    with tempfile.TemporaryDirectory(prefix=".add-", dir=catalog_dir()) as tmp:
        if file is not None:
            file = Path(file)
            display = filename or str(file)
            valid = _validated(file, display)
        else:
            display = filename or f"{name}.jsonl"
            valid = _validated(_records_file(records or [], Path(tmp), display), display)
        layouts = {_layout(r.format) for r in valid}
        layout = layouts.pop()  # read_file leaves one format: the rest are problems
        version = _store(name, valid, layout, source, parent_refs, created_by)
    details = {"records": version.records, "sha256": version.sha256, "layout": layout}
    details |= {"source": source, "parents": parent_refs, **(context or {})}
    audit.append(audit.who(created_by), "dataset.version", version.ref, details)
    return version


def _store(
    name: str,
    valid: list[Record],
    layout: str,
    source: dict[str, Any],
    parents: list[str],
    created_by: str | None,
) -> DatasetVersion:
    root = catalog_dir() / name
    with file_lock(root / ".lock"):
        existing = _version_numbers(name)
        version = (existing[-1] if existing else 0) + 1
        final = root / str(version)
        if final.exists():  # a folder left without version.json: never a version, replace it
            shutil.rmtree(final)
        with atomic_dir(final) as tmp:
            sha = _write_data(valid, tmp)
            doc = {
                "name": name,
                "version": version,
                "records": len(valid),
                "sha256": sha,
                "layout": layout,
                "source": source,
                "parents": parents,
                "created_by": created_by,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            atomic_write_json(tmp / VERSION_FILE, doc)
    return _load(name, version)


# ----------------------------------------------------------------------------------- reading


def read_records(ref: str, offset: int, limit: int) -> list[dict[str, Any]]:
    """Records ``offset .. offset+limit-1`` (0-based) of a version; two seeks at any offset."""
    v = get_version(ref)
    offset = max(0, int(offset))
    end = min(v.records, offset + max(0, int(limit)))
    if offset >= end:
        return []
    folder = v.path.parent
    with open(folder / INDEX_FILE, "rb") as f:
        f.seek(offset * _IDX)
        raw = f.read((end - offset + 1) * _IDX)
    marks = [int.from_bytes(raw[i : i + _IDX], "little") for i in range(0, len(raw), _IDX)]
    with open(v.path, "rb") as f:
        f.seek(marks[0])
        blob = f.read(marks[-1] - marks[0])
    return [json.loads(line) for line in blob.decode("utf-8").splitlines()]


def _all_records(v: DatasetVersion) -> list[Record]:
    out = []
    with open(v.path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            out.append(Record(DATA_FILE, i, v.layout, json.loads(line)))
    return out


# ------------------------------------------------------------------------------------ report


def _summary(values: list[int]) -> dict[str, Any] | None:
    if not values:
        return None
    s = sorted(values)

    def pct(q: float) -> int:
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {
        "min": s[0],
        "mean": round(sum(s) / len(s), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": s[-1],
        "total": sum(s),
    }


def _turns(data: dict[str, Any]) -> int:
    if "text" in data:
        return 1
    return sum(len(data.get(k, [])) for k in ("messages", "prompt", "chosen", "completion"))


def _tokenizer_file() -> Path | None:
    """The default model's tokenizer.json where it is already converted (never converts)."""
    from loft.core.paths import models_dir

    for sub in ("smollm2-135m-instruct", ".tokenizers/smollm2"):
        path = models_dir() / sub / "tokenizer.json"
        if path.is_file():
            return path
    return None


def _token_lengths(texts: list[str]) -> dict[str, Any]:
    path = _tokenizer_file()
    if path is None:
        return {
            "tokenizer": None,
            "note": "token lengths omitted: the default model (smollm2-135m-instruct) is not "
            "converted yet; run `loft models show smollm2-135m-instruct` or train once",
        }
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    return {
        "tokenizer": "smollm2-135m-instruct",
        "note": "tokens of the record's text (message contents, without the chat template)",
        **(_summary(lengths) or {}),
    }


def _compute_report(v: DatasetVersion) -> dict[str, Any]:
    from loft.core.specs import DataSpec
    from loft.data.clean import dedup, scan_pii

    records = _all_records(v)
    texts = [record_text(r.data) for r in records]
    stats: dict[str, Any] = {
        "records": v.records,
        "layout": v.layout,
        "turns": _summary([_turns(r.data) for r in records]),
        "chars": _summary([len(t) for t in texts]),
        "tokens": _token_lengths(texts),
    }
    if v.layout == "kto":
        desirable = sum(1 for r in records if r.data.get("label"))
        stats |= {"desirable": desirable, "undesirable": v.records - desirable}
    if v.layout == "sft":
        roles = Counter(m["role"] for r in records for m in r.data.get("messages", []))
        stats["roles"] = dict(sorted(roles.items()))
    _, pii = scan_pii(records, mode="report")
    near = v.layout == "sft"  # several pairs per prompt are the norm for preference data
    threshold = DataSpec.model_fields["near_dup_threshold"].default
    dups = dedup(records, threshold=threshold, near=near)
    return {
        "schema": REPORT_SCHEMA,
        "ref": v.ref,
        "fingerprint": {"sha256": v.sha256, "of": DATA_FILE},
        "stats": stats,
        "pii": pii,
        "duplicates": {
            "exact": dups.exact_dups,
            "near": dups.near_dups if near else None,
            "near_threshold": threshold if near else None,
            "near_note": None if near else "not checked: preference rows share prompts",
            "examples": dups.removed,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def cached_report(ref: str) -> dict[str, Any] | None:
    """The version's report if it has been computed, else None (never computes: a 100k-record
    version takes a minute or more, mostly near-duplicate detection)."""
    v = get_version(ref)
    doc = read_json_object(v.path.parent / REPORT_FILE)
    return doc if doc.get("schema") == REPORT_SCHEMA else None


def report(ref: str) -> dict[str, Any]:
    """Stats (records, turns, character and token lengths), PII findings, exact and near
    duplicates, fingerprint. Computed once per version and cached as report.json beside it."""
    v = get_version(ref)
    path = v.path.parent / REPORT_FILE
    doc = read_json_object(path)
    if doc.get("schema") == REPORT_SCHEMA:
        return doc
    with file_lock(catalog_dir() / v.name / ".report.lock"):
        doc = read_json_object(path)
        if doc.get("schema") != REPORT_SCHEMA:
            doc = _compute_report(v)
            atomic_write_json(path, doc)
    return doc
