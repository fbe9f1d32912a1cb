"""Read JSONL / JSON array / CSV / Parquet files into canonical records, keeping line numbers.

Every problem is one string ``FILE:LINE: field: reason`` (Parquet: ``FILE:row N: ...``, N 0-based).
Record-level problems (invalid JSON, bad UTF-8, unknown or mixed format) use the field ``record``.
"""

from __future__ import annotations

import bisect
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import DataError, NotFoundError
from loft.data.formats import (
    FORMATS,
    Record,
    apply_column_map,
    detect_format,
    to_canonical,
    unknown_format_reason,
)
from loft.data.validate import ValidationReport, mixed_format_problems

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"


@dataclass
class RawRecord:
    loc: str
    line: int
    obj: Any


@dataclass
class _Parsed:
    raw: list[RawRecord] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, text) for ordering
    n_bad: int = 0  # records that could not even be parsed


@dataclass
class FileResult:
    path: str
    format: str | None
    records: list[Record]
    problems: list[str]
    n_records: int
    n_invalid: int


def _decode(path: Path, data: bytes, parsed: _Parsed) -> tuple[str, set[int]]:
    """Decode UTF-8 (BOM allowed); report each line holding a bad byte; return text + bad lines."""
    name = str(path)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: file: encoded as UTF-16, expected UTF-8", hint="Save as UTF-8.")
    data = data.removeprefix(BOM)
    bad: set[int] = set()
    try:
        return data.decode("utf-8"), bad
    except UnicodeDecodeError:
        pass
    for ln, raw_line in enumerate(data.split(b"\n"), 1):
        try:
            raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(ln)
            byte = raw_line[e.start]
            parsed.problems.append(
                (
                    ln,
                    f"{name}:{ln}: record: invalid UTF-8 (byte 0x{byte:02x} at column "
                    f"{e.start + 1})",
                )
            )
    return data.decode("utf-8", errors="replace"), bad


def _jsonl(path: Path, text: str, bad: set[int], parsed: _Parsed) -> None:
    name = str(path)
    for ln, line in enumerate(text.split("\n"), 1):
        s = line.strip()
        if not s:
            continue
        if ln in bad:
            parsed.n_bad += 1
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            parsed.n_bad += 1
            parsed.problems.append(
                (
                    ln,
                    f"{name}:{ln}: record: invalid JSON: {e.msg} (column "
                    f"{e.colno + len(line) - len(line.lstrip())})",
                )
            )
            continue
        parsed.raw.append(RawRecord(f"{name}:{ln}", ln, obj))


def _json_array(path: Path, text: str, bad: set[int], parsed: _Parsed) -> None:
    """A JSON array of objects; each record's line is where its value starts (raw_decode)."""
    name = str(path)
    starts = [i for i, c in enumerate(text) if c == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(starts, pos) + 1

    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = len(text) - len(text.lstrip(ws))
    if pos >= len(text):
        return
    if text[pos] != "[":
        ln = line_of(pos)
        raise DataError(
            f"{name}:{ln}: file: expected a JSON array of records ([{{...}}, ...]), found "
            f"{text[pos]!r}",
            hint="Use .jsonl for one JSON object per line.",
        )
    pos += 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos >= len(text):
            parsed.problems.append(
                (
                    line_of(pos),
                    f"{name}:{line_of(pos)}: record: invalid JSON: "
                    "unexpected end of file (missing ']')",
                )
            )
            return
        c = text[pos]
        if c == "]" and (expect_value is False or not parsed.raw):
            return
        if not expect_value:
            if c != ",":
                ln = line_of(pos)
                parsed.problems.append(
                    (
                        ln,
                        f"{name}:{ln}: record: invalid JSON: expected ',' or "
                        "']' between records; records after this were not read",
                    )
                )
                return
            pos += 1
            expect_value = True
            continue
        ln = line_of(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            parsed.n_bad += 1
            parsed.problems.append(
                (
                    e.lineno,
                    f"{name}:{e.lineno}: record: invalid JSON: {e.msg} "
                    f"(column {e.colno}); records after this were not read",
                )
            )
            return
        if any(ln <= b <= line_of(end) for b in bad):
            parsed.n_bad += 1
        else:
            parsed.raw.append(RawRecord(f"{name}:{ln}", ln, obj))
        pos, expect_value = end, False


def _csv(path: Path, text: str, bad: set[int], parsed: _Parsed) -> None:
    """CSV with a header row; a record's line is the physical line its row starts on."""
    name = str(path)
    lines = [ln + "\n" for ln in text.split("\n")]
    reader = csv.reader(lines)
    header: list[str] | None = None
    end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a bare carriage return or NUL in an unquoted field, ...
            start, end = end + 1, reader.line_num
            parsed.n_bad += 1
            parsed.problems.append((start, f"{name}:{start}: record: invalid CSV: {e}"))
            continue
        start, end = end + 1, reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            continue
        if any(start <= b <= end for b in bad):
            parsed.n_bad += 1
            continue
        if len(row) != len(header):
            parsed.n_bad += 1
            parsed.problems.append(
                (
                    start,
                    f"{name}:{start}: record: expected {len(header)} "
                    f"columns (from the header), got {len(row)}",
                )
            )
            continue
        parsed.raw.append(RawRecord(f"{name}:{start}", start, dict(zip(header, row, strict=True))))


DEFAULT_MAX_DECODED_MB = 4096
_PARQUET_BATCH = 256  # rows decoded at a time, so the size cap is checked as it grows


def max_decoded_bytes() -> int:
    """$LOFT_DATA_MAX_DECODED_MB, else ``data.max_decoded_mb`` in settings.yaml, else 4096: the
    most a compressed file (Parquet pages) may expand to when read."""
    from loft.core.settings import positive_setting

    mb = positive_setting(
        "LOFT_DATA_MAX_DECODED_MB", "data.max_decoded_mb", DEFAULT_MAX_DECODED_MB,
        most=1024 * 1024, expected="a number of megabytes above 0, e.g. 4096",
    )  # fmt: skip
    return int(mb * 1024 * 1024)


def _too_big(path: Path, size: int, limit: int) -> DataError:
    return DataError(
        f"{path}: file: decompresses to more than {limit / 2**20:.0f} MB ({size / 2**20:.0f} MB "
        "so far); refused as a possible decompression bomb.",
        hint="Split the file, or raise data.max_decoded_mb in LOFT_HOME/settings.yaml "
        "(or LOFT_DATA_MAX_DECODED_MB).",
    )


def _parquet(path: Path, parsed: _Parsed) -> None:
    """Rows of a Parquet file, decoded a batch at a time under ``max_decoded_bytes``: the
    sizes its metadata declares are checked first, then what each batch really decodes to."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limit = max_decoded_bytes()
    i = 0
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        declared = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        if declared > limit:
            raise _too_big(path, declared, limit)
        decoded = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            decoded += batch.nbytes
            if decoded > limit:
                raise _too_big(path, decoded, limit)
            for row in batch.to_pylist():
                parsed.raw.append(RawRecord(f"{path}:row {i}", i, row))
                i += 1
    except (pa.ArrowException, OSError, ValueError, TypeError, OverflowError) as e:
        # pyarrow's errors for a malformed file: ArrowInvalid (a ValueError), ArrowIOError, ...
        where = f" (at row {i})" if i else ""
        raise DataError(f"{path}: file: not a readable Parquet file{where} ({e})") from None


def parse_file(path: str | Path) -> _Parsed:
    """Parse a file into raw objects with locations; syntax problems collected, not raised."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"data file not found: {path}", hint="Check the path.")
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {ext or '(none)'!r}",
            hint="Use one of: " + ", ".join(EXTENSIONS),
        )
    parsed = _Parsed()
    if ext == ".parquet":
        _parquet(path, parsed)
        return parsed
    text, bad = _decode(path, path.read_bytes(), parsed)
    {".jsonl": _jsonl, ".json": _json_array, ".csv": _csv}[ext](path, text, bad, parsed)
    return parsed


def read_file(
    path: str | Path, *, format: str = "auto", column_map: dict[str, str] | None = None
) -> FileResult:
    """Parse, rename columns, detect/convert every record; collect every problem."""
    if format != "auto" and format not in FORMATS:
        choices = ", ".join(FORMATS)
        raise DataError(f"unknown format {format!r}", hint=f"Use auto or one of: {choices}")
    name = str(path)
    parsed = parse_file(path)
    reverse = {v: k for k, v in (column_map or {}).items()}
    problems = list(parsed.problems)
    n_invalid = parsed.n_bad
    candidates: list[tuple[RawRecord, dict[str, Any], str]] = []
    for raw in parsed.raw:
        if not isinstance(raw.obj, dict):
            n_invalid += 1
            kind = "null" if raw.obj is None else type(raw.obj).__name__
            problems.append((raw.line, f"{raw.loc}: record: expected an object, got {kind}"))
            continue
        obj = apply_column_map(raw.obj, column_map)
        fmt = format if format != "auto" else detect_format(obj)
        if fmt is None:
            n_invalid += 1
            problems.append((raw.line, f"{raw.loc}: record: {unknown_format_reason(raw.obj)}"))
            continue
        candidates.append((raw, obj, fmt))

    majority: str | None = format if format != "auto" else None
    if format == "auto":
        majority, mixed, off = mixed_format_problems([(r.loc, f) for r, _, f in candidates])
        for i, reason in mixed:
            raw = candidates[i][0]
            problems.append((raw.line, f"{raw.loc}: record: {reason}"))
        n_invalid += len(off)
        candidates = [c for i, c in enumerate(candidates) if i not in off]

    records: list[Record] = []
    for raw, obj, fmt in candidates:
        data, issues = to_canonical(obj, fmt)
        if data is None:
            n_invalid += 1
            for fld, reason in issues:
                problems.append((raw.line, f"{raw.loc}: {_display(fld, reverse)}: {reason}"))
            continue
        records.append(Record(file=name, line=raw.line, format=fmt, data=data, loc=raw.loc))

    n_records = len(parsed.raw) + parsed.n_bad
    if n_records == 0 and not problems:
        problems.append((0, f"{name}: file: empty, no records found"))
    problems.sort(key=lambda p: p[0])
    return FileResult(name, majority, records, [p for _, p in problems], n_records, n_invalid)


def _display(fld: str, reverse: dict[str, str]) -> str:
    """Show the user's own column name for a field renamed by column_map."""
    root = fld.split("[", 1)[0].split(".", 1)[0]
    return reverse[root] + fld[len(root) :] if root in reverse else fld


def read_records(
    path: str | Path, *, format: str = "auto", column_map: dict[str, str] | None = None
) -> tuple[list[Record], list[str]]:
    """Valid records (canonical, with line numbers) and every problem as ``FILE:LINE: f: why``."""
    res = read_file(path, format=format, column_map=column_map)
    return res.records, res.problems


def validate_file(
    path: str | Path, *, format: str = "auto", column_map: dict[str, str] | None = None
) -> ValidationReport:
    res = read_file(path, format=format, column_map=column_map)
    return ValidationReport(
        path=res.path,
        format=res.format,
        n_records=res.n_records,
        n_valid=len(res.records),
        problems=res.problems,
        n_invalid=res.n_invalid,
    )
