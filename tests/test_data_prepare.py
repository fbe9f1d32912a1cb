"""prepare_dataset: cleaning counts, split, truncation, fingerprint, cache and on-disk layout."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from loft.core.errors import DataError, NotFoundError
from loft.core.specs import DataSpec
from loft.data import IGNORE_INDEX, load_prepared, prepare_dataset
from loft.data.prepare import compute_fingerprint, split_eval
from loft.data.readers import read_file
from loft.data.template import tokenizer_fingerprint

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok() -> Any:
    from loft.models import builtin_tokenizer

    return builtin_tokenizer()


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def qa_rows(n: int) -> list[dict]:
    return [
        chat(f"Question number {i} about topic {i * 13 % 7}?", f"Answer {i}.") for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def decoded(ds: Any, tok: Any) -> list[str]:
    return [tok.decode(row["input_ids"]) for row in ds]


def test_prepare_writes_rows_report_and_manifest_then_hits_the_cache(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", qa_rows(20))
    spec = DataSpec(train=str(p), eval_fraction=0.1)
    ds = prepare_dataset(spec, tok, progress=False)
    assert ds.path == loft_home / "datasets" / ds.fingerprint
    assert sorted(ds.train.column_names) == ["input_ids", "labels", "length"]
    assert (len(ds.train), len(ds.eval)) == (18, 2)
    row = ds.train[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    trained = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
    assert tok.decode(trained) == "Answer 0.<|im_end|>"
    r = ds.report
    assert r["cached"] is False and r["format"] == "chat" and r["layout"] == "sft"
    counts = {
        k: r[k]
        for k in r
        if k
        not in (
            "files",
            "stats",
            "pii",
            "settings",
            "tokenizer",
            "dedup",
            "problems",
            "created_at",
            "fingerprint",
            "format",
            "layout",
            "cached",
        )
    }
    assert counts == {
        "records": 20,
        "invalid": 0,
        "dropped_invalid": 0,
        "valid": 20,
        "exact_dups": 0,
        "near_dups": 0,
        "truncated": 0,
        "empty_after_truncation": 0,
        "eval_overlap": 0,
        "train_records": 18,
        "eval_records": 2,
    }
    stats = r["stats"]["train"]
    assert stats["records"] == 18 and stats["p50"] <= stats["p95"] <= stats["max"]
    assert stats["tokens"] == sum(ds.train["length"])
    assert stats["trained_tokens"] == sum(
        sum(lab != IGNORE_INDEX for lab in labels) for labels in ds.train["labels"]
    )
    assert r["files"]["train"]["records"] == 20
    assert r["files"]["train"]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    manifest = json.loads((ds.path / "MANIFEST.json").read_text())
    assert manifest["fingerprint"] == ds.fingerprint and "report.json" in manifest["files"]
    assert any(f.startswith("train/") for f in manifest["files"])
    assert [p.name for p in (loft_home / "datasets").iterdir()] == [ds.fingerprint]  # no temps

    again = prepare_dataset(spec, tok, progress=False)
    assert again.report["cached"] is True and again.fingerprint == ds.fingerprint
    assert again.train["input_ids"] == ds.train["input_ids"]
    assert load_prepared(ds.fingerprint[:10]).fingerprint == ds.fingerprint


def test_fingerprint_is_stable_and_tracks_settings_and_tokenizer(tmp_path: Path, tok: Any) -> None:
    from loft.models import builtin_tokenizer

    rows = qa_rows(5)
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    q = tmp_path / "t.json"
    q.write_text(json.dumps(rows, indent=2))  # same records, another file type
    tfp = tokenizer_fingerprint(tok)

    def fp(spec: DataSpec, tfp: str = tfp) -> str:
        return compute_fingerprint(spec, read_file(spec.train), None, tfp)

    base = fp(DataSpec(train=str(p)))
    assert base == fp(DataSpec(train=str(p)))
    assert base == fp(DataSpec(train=str(q)))
    assert base == fp(DataSpec(train=str(p), packing=False))  # packing happens at training
    assert base != fp(DataSpec(train=str(p), max_seq_len=512))
    assert base != fp(DataSpec(train=str(p), train_on_inputs=True))
    assert base != fp(DataSpec(train=str(p), pii="redact"))
    assert base != fp(DataSpec(train=str(p), eval_fraction=0.2))
    assert base != fp(DataSpec(train=str(p), dedup=False))
    other = builtin_tokenizer()
    other.chat_template = other.chat_template.replace("SmolLM", "Smol")
    assert base != fp(DataSpec(train=str(p)), tokenizer_fingerprint(other))
    write_jsonl(p, [*rows[:4], chat("changed", "record")])
    assert base != fp(DataSpec(train=str(p)))


def test_split_is_deterministic_and_independent_of_file_order(tmp_path: Path) -> None:
    rows = qa_rows(40)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    a = read_file(write_jsonl(tmp_path / "a.jsonl", rows)).records
    b = read_file(write_jsonl(tmp_path / "b.jsonl", shuffled)).records
    (_, ea), (_, eb) = split_eval(a, 0.1), split_eval(b, 0.1)
    assert len(ea) == 4
    assert sorted(json.dumps(r.data) for r in ea) == sorted(json.dumps(r.data) for r in eb)
    assert split_eval(a[:2], 0.01)[1] != [] and split_eval(a[:1], 0.5)[1] == []
    assert split_eval(a, 0.0)[1] == []


def test_invalid_records_fail_unless_skipped(
    loft_home: Path, tmp_path: Path, tok: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [*qa_rows(4), "{oops", {"messages": []}])
    with pytest.raises(DataError) as info:
        prepare_dataset(DataSpec(train=str(p)), tok, progress=False)
    assert info.value.problems == [
        f"{p}:5: record: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 2)",
        f"{p}:6: messages: empty list, expected at least one user and one assistant message",
    ]
    assert "2 invalid of 6 records" in info.value.message
    ds = prepare_dataset(DataSpec(train=str(p), skip_invalid=True), tok, progress=True)
    assert ds.report["dropped_invalid"] == 2
    assert len(ds.train) + len(ds.eval) == 4
    assert "skipped 2 invalid of 6 records" in capsys.readouterr().err


def test_preference_data_is_refused_for_sft(loft_home: Path, tmp_path: Path, tok: Any) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    for path, fmt in ((p, "auto"), (p, "preference"), (k, "auto"), (k, "kto")):
        with pytest.raises(DataError, match="objective: dpo\\|kto\\|orpo\\|simpo") as info:
            prepare_dataset(DataSpec(train=str(path), format=fmt), tok, progress=False)
        assert info.value.message.startswith(f"{path}: ")


def test_dedup_pii_redaction_and_truncation_counts(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=6)) for _ in range(300)]
    near = list(words)
    near[100] = "changed"
    rows = [
        *qa_rows(6),
        qa_rows(1)[0],  # exact duplicate of row 0
        chat("Summarise this.", " ".join(words)),
        chat("Summarise this.", " ".join(near)),  # near duplicate
        chat("Mail me at jane@example.com", "Sure, jane@example.com noted."),
        chat("x " * 60, "late answer"),  # the answer falls past max_seq_len
    ]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = DataSpec(train=str(p), max_seq_len=48, pii="redact", eval_fraction=0.0)
    ds = prepare_dataset(spec, tok, progress=False)
    c = ds.report
    assert (c["exact_dups"], c["near_dups"]) == (1, 1)
    assert c["truncated"] == 2  # the long summary (kept, cut) and the long prompt
    assert c["empty_after_truncation"] == 1  # the long prompt: no assistant token within 48
    assert c["train_records"] == 8 and ds.eval is None
    assert max(ds.train["length"]) <= 48
    texts = decoded(ds.train, tok)
    assert any("Mail me at [EMAIL]" in t and "Sure, [EMAIL] noted." in t for t in texts)
    assert not any("jane@example.com" in t for t in texts)
    assert ds.report["pii"]["kinds"]["email"] == {"count": 2, "records": 1, "lines": [f"{p}:10"]}


def test_completion_file_and_eval_file_with_overlap(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": f"Document {i} body."} for i in range(5)]
    )
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": "Document 1 body."}, {"text": "Held out."}])
    ds = prepare_dataset(
        DataSpec(train=str(train), eval=str(ev), max_seq_len=64), tok, progress=False
    )
    assert ds.report["format"] == "completion"
    assert (len(ds.train), ds.report["eval_overlap"]) == (5, 1)
    assert decoded(ds.eval, tok) == ["Held out.<|im_end|>"]
    assert ds.train[0]["labels"] == ds.train[0]["input_ids"]


def test_load_prepared_unknown(loft_home: Path) -> None:
    with pytest.raises(NotFoundError, match="no prepared dataset 'deadbeef00'"):
        load_prepared("deadbeef00")
