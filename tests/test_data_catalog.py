"""The dataset catalog: versions, validation with FILE:LINE, atomic storage, paging, reports."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from loft.core import audit
from loft.core.errors import ConfigError, DataError, NotFoundError
from loft.data import catalog

pytestmark = pytest.mark.unit

UPLOAD = {"kind": "upload", "filename": "chats.jsonl"}


def chat(i: int, extra: str = "") -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i} about the weather in town {extra}"},
            {"role": "assistant", "content": f"answer {i}: it rains a lot in town {i * 7}"},
        ]
    }


def pair(i: int) -> dict:
    return {"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


def test_versions_count_from_one_store_canonical_records_and_are_audited(loft_home: Path) -> None:
    v1 = catalog.add_version("chats", [chat(0), chat(1)], source=UPLOAD, created_by="alice")
    v2 = catalog.add_version("chats", [chat(2)], source=UPLOAD, parents=["chats:1"])
    assert (v1.ref, v2.ref, v1.records, v2.records) == ("chats:1", "chats:2", 2, 1)
    assert v1.layout == "sft" and v1.created_by == "alice" and v2.parents == ("chats:1",)
    folder = loft_home / "catalog" / "chats" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["data.idx", "data.jsonl", "version.json"]
    lines = v1.path.read_text().splitlines()
    assert json.loads(lines[0]) == chat(0)
    assert lines[0] == json.dumps(chat(0), sort_keys=True, separators=(",", ":"))
    import hashlib

    assert v1.sha256 == hashlib.sha256(v1.path.read_bytes()).hexdigest()
    assert catalog.get_version("chats") == v2
    assert catalog.get_version("chats:1") == v1
    d = v1.to_dict()
    assert d["ref"] == "chats:1" and d["parents"] == [] and d["source"] == UPLOAD
    entries = audit.read(10, action="dataset.version")[::-1]
    assert [(e["actor"], e["target"]) for e in entries][:1] == [("alice", "chats:1")]
    assert entries[1]["target"] == "chats:2" and entries[1]["details"]["parents"] == ["chats:1"]


def test_a_file_in_any_format_is_converted_and_a_layout_detected(loft_home: Path) -> None:
    csv = loft_home / "alpaca.csv"
    csv.write_text("instruction,output\nsay hi,hi\nsay bye,bye\n")
    v = catalog.add_version("alp", file=csv, source={"kind": "upload", "filename": "a.csv"})
    assert v.layout == "sft" and v.records == 2
    assert catalog.read_records("alp", 1, 5)[0]["messages"][1] == {
        "role": "assistant",
        "content": "bye",
    }
    prefs = catalog.add_version("prefs", [pair(0), pair(1)], source=UPLOAD)
    assert prefs.layout == "preference"
    rec = catalog.read_records("prefs:1", 0, 1)[0]
    assert rec["chosen"] == [{"role": "assistant", "content": "good 0"}]
    kto = [{"prompt": "p", "completion": "c", "label": i % 2 == 0} for i in range(3)]
    assert catalog.add_version("kto", kto, source=UPLOAD).layout == "kto"


def test_a_bad_record_is_reported_as_the_uploads_file_and_line_and_nothing_is_stored(
    loft_home: Path,
) -> None:
    path = loft_home / "upload-7f3a.jsonl"  # where the portal saved it
    rows = [json.dumps(chat(0)), "", '{"messages": [{"role": "user", "content": "hi"}]}', "{bad"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        catalog.add_version("chats", file=path, source=UPLOAD, filename="chats.jsonl")
    assert err.value.problems == [
        "chats.jsonl:3: messages: no assistant turn to train on",
        "chats.jsonl:4: record: invalid JSON: Expecting property name enclosed in double "
        "quotes (column 2)",
    ]
    assert "upload-7f3a" not in str(err.value)
    assert not (loft_home / "catalog" / "chats").exists() or not list(
        (loft_home / "catalog" / "chats").glob("[0-9]*")
    )
    with pytest.raises(NotFoundError, match="no dataset named 'chats'"):
        catalog.get_version("chats")
    with pytest.raises(DataError, match="empty, no records"):
        catalog.add_version("chats", [], source=UPLOAD)


def test_names_refs_sources_and_parents_are_checked(loft_home: Path) -> None:
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65, "a..b"):
        with pytest.raises(ConfigError, match="invalid dataset name"):
            catalog.add_version(bad, [chat(0)], source=UPLOAD)
    with pytest.raises(ConfigError, match="invalid dataset reference 'x:0'"):
        catalog.get_version("x:0")
    with pytest.raises(ConfigError, match="source"):
        catalog.add_version("ok", [chat(0)], source={"filename": "x"})
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        catalog.add_version("ok", [chat(0)], source=UPLOAD, parents=["nope:1"])
    with pytest.raises(ConfigError, match="exactly one"):
        catalog.add_version("ok", source=UPLOAD)
    catalog.add_version("ok", [chat(0)], source=UPLOAD)
    with pytest.raises(NotFoundError, match=r"no version 5 \(versions: 1-1\)"):
        catalog.get_version("ok:5")
    # a half-written version (no version.json) is invisible
    (loft_home / "catalog" / "ok" / "2").mkdir()
    assert catalog.get_version("ok").version == 1
    assert catalog.add_version("ok", [chat(1)], source=UPLOAD).version == 2


def test_lists_paginate(loft_home: Path) -> None:
    for name in ("b", "a", "c"):
        catalog.add_version(name, [chat(0)], source=UPLOAD)
    catalog.add_version("b", [chat(0), chat(1)], source=UPLOAD)
    rows, total = catalog.list_datasets(limit=2, offset=0)
    assert total == 3 and [r["name"] for r in rows] == ["a", "b"]
    assert rows[1] | {"updated": None} == {
        "name": "b",
        "latest": 2,
        "versions": 2,
        "records": 2,
        "layout": "sft",
        "updated": None,
        "created_by": None,
    }
    rows, total = catalog.list_datasets(limit=2, offset=2)
    assert [r["name"] for r in rows] == ["c"]
    versions, total = catalog.list_versions("b", limit=1, offset=0)
    assert total == 2 and [v.version for v in versions] == [2]
    versions, _ = catalog.list_versions("b", limit=5, offset=1)
    assert [v.version for v in versions] == [1]
    with pytest.raises(NotFoundError):
        catalog.list_versions("zz", 10, 0)


def test_read_records_is_fast_at_any_offset_of_100k(loft_home: Path) -> None:
    n = 100_000
    v = catalog.add_version("big", ({"text": f"row {i}"} for i in range(n)), source=UPLOAD)
    assert v.records == n
    assert (v.path.parent / "data.idx").stat().st_size == (n + 1) * 8
    start = time.perf_counter()
    for offset in (0, 50_000, n - 3):
        got = catalog.read_records("big:1", offset, 50)
        assert got[0] == {"text": f"row {offset}"} and len(got) == min(50, n - offset)
    assert time.perf_counter() - start < 0.5
    assert catalog.read_records("big", n, 10) == []
    assert catalog.read_records("big", -5, 1) == [{"text": "row 0"}]


def _add(home: str, i: int) -> int:
    import os

    os.environ["LOFT_HOME"] = home
    from loft.data import catalog as c

    return c.add_version("race", [{"text": f"t{i}"}], source=UPLOAD).version


def test_concurrent_writers_never_share_a_version_number(loft_home: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        versions = pool.starmap(_add, [(str(loft_home), i) for i in range(8)])
    assert sorted(versions) == list(range(1, 9))
    texts = {catalog.read_records(f"race:{v}", 0, 1)[0]["text"] for v in versions}
    assert len(texts) == 8


def _word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path


def test_report_stats_pii_duplicates_fingerprint_cached(
    loft_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [chat(i) for i in range(6)]
    rows[2]["messages"][1]["content"] += " mail bob@example.com"
    rows.append(chat(1))  # exact duplicate of record 2
    rows.append(chat(3, extra="!"))  # near duplicate of record 4 (punctuation only)
    v = catalog.add_version("rep", rows, source=UPLOAD)
    tok = _word_tokenizer(loft_home / "tokenizer.json")
    monkeypatch.setattr(catalog, "_tokenizer_file", lambda: tok)
    assert catalog.cached_report("rep:1") is None
    rep = catalog.report("rep:1")
    assert rep["fingerprint"] == {"sha256": v.sha256, "of": "data.jsonl"}
    stats = rep["stats"]
    assert stats["records"] == 8 and stats["turns"]["min"] == stats["turns"]["max"] == 2
    first = rows[0]["messages"]
    words = len(" ".join(m["content"] for m in first).replace(":", " : ").split())
    assert stats["tokens"]["min"] == words and stats["tokens"]["tokenizer"]
    assert stats["chars"]["min"] == len("\n".join(m["content"] for m in first))
    assert rep["pii"]["kinds"]["email"] == {"count": 1, "records": 1, "lines": ["data.jsonl:3"]}
    assert rep["duplicates"]["exact"] == 1 and rep["duplicates"]["near"] == 1
    assert rep["duplicates"]["examples"] == ["data.jsonl:7", "data.jsonl:8"]
    assert (v.path.parent / "report.json").is_file()
    monkeypatch.setattr(catalog, "_compute_report", lambda v: pytest.fail("recomputed"))
    assert catalog.report("rep") == rep == catalog.cached_report("rep:1")


def test_report_without_a_converted_tokenizer_says_so(
    loft_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog, "_tokenizer_file", lambda: None)
    catalog.add_version("p", [pair(0), pair(0), pair(1)], source=UPLOAD)
    rep = catalog.report("p")
    assert rep["stats"]["tokens"]["tokenizer"] is None
    assert "omitted" in rep["stats"]["tokens"]["note"]
    assert rep["duplicates"]["exact"] == 1 and rep["duplicates"]["near"] is None
