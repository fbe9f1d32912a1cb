"""Property tests of the data file readers (loft.data.readers): whatever bytes a file holds, reading
it gives records and ``FILE:LINE: field: reason`` problems, or raises DataError naming the file;
never another exception. Records keep the line they start on. A Parquet file that decompresses
past the cap is refused as a bomb. (bench/fuzz.py runs the same readers under atheris.)"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loft.core.errors import DataError
from loft.data.readers import read_file

pytestmark = pytest.mark.unit

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TEXT_EXTS = (".jsonl", ".json", ".csv")
_DIR = Path(tempfile.mkdtemp(prefix="loft-props-"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=12),
        "completion": st.text(max_size=12),
        "text": st.text(max_size=12),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system", "tool"]),
                    "content": st.text(max_size=10),
                }  # fmt: skip
            ),
            max_size=3,
        ),
        "chosen": st.text(max_size=8),
        "rejected": st.text(max_size=8),
        "label": json_values,
    },
)
# how a problem names its place: FILE:LINE, FILE:row N (Parquet), or FILE: file/... for the file
PLACE = r"(:\d+|:row \d+)?: "


def check_read(path: Path) -> None:
    """The readers' contract on one file."""
    try:
        result = read_file(path)
    except DataError as e:
        assert e.message.startswith(str(path)), e.message
        return
    where = re.compile(re.escape(str(path)) + PLACE)
    for problem in result.problems:
        assert where.match(problem), problem
    assert result.n_invalid <= result.n_records
    assert len(result.records) <= result.n_records
    lines = path.read_bytes().count(b"\n") + 1
    for rec in result.records:
        assert rec.file == str(path) and rec.format in (result.format, rec.format)
        if path.suffix != ".parquet":
            assert 1 <= rec.line <= lines


def _write(name: str, data: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data)
    return path


@SETTINGS
@given(data=st.binary(max_size=400), ext=st.sampled_from([*TEXT_EXTS, ".parquet"]))
def test_any_bytes_give_records_or_a_data_error(data: bytes, ext: str) -> None:
    check_read(_write(f"any{ext}", data))


@SETTINGS
@given(
    lines=st.lists(
        st.one_of(
            records.map(json.dumps),
            json_values.map(json.dumps),
            st.text(max_size=20),
            st.just(""),
        ),
        max_size=8,
    ),
    ext=st.sampled_from(TEXT_EXTS),
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_near_valid_text_files(lines: list[str], ext: str, bom: bool, crlf: bool) -> None:
    """Mostly-valid JSON lines (also read as a .json array's inside or as CSV)."""
    text = ("\r\n" if crlf else "\n").join(lines)
    if ext == ".json":
        text = "[" + ",\n".join(lines) + "]"
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    check_read(_write(f"near{ext}", data))


@SETTINGS
@given(rows=st.lists(records, min_size=1, max_size=6))
def test_valid_jsonl_records_keep_their_lines(rows: list[dict]) -> None:
    path = _write("rows.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    result = read_file(path)
    assert result.n_records == len(rows)
    assert len(result.records) + result.n_invalid == len(rows)
    for rec in result.records:
        original = rows[rec.line - 1]
        assert rec.loc == f"{path}:{rec.line}"
        if "messages" in rec.data and "messages" in original:
            assert len(rec.data["messages"]) <= len(original["messages"]) + 1


@SETTINGS
@given(rows=st.lists(records, max_size=5), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_damaged_parquet(rows: list[dict], flip: int, byte: int) -> None:
    """A real Parquet file with one byte changed: read, or refused as DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _DIR / "damaged.parquet"
    table = pa.table({"text": [json.dumps(r) for r in rows] or ["x"]})
    pq.write_table(table, path)
    data = bytearray(path.read_bytes())
    data[flip % len(data)] = byte
    check_read(_write("damaged.parquet", bytes(data)))


def test_a_parquet_bomb_is_refused(loft_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = loft_home / "bomb.parquet"
    table = pa.table({"prompt": ["x" * 1_000_000] * 20, "completion": ["y"] * 20})
    pq.write_table(table, path, compression="zstd", use_dictionary=True)
    assert path.stat().st_size < 10_000  # 20 MB of text in a few kB
    monkeypatch.setenv("LOFT_DATA_MAX_DECODED_MB", "5")
    with pytest.raises(DataError, match=r"bomb.parquet: file: decompresses to more than 5 MB"):
        read_file(path)
    monkeypatch.setenv("LOFT_DATA_MAX_DECODED_MB", "64")
    assert read_file(path).n_records == 20
