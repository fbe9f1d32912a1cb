"""Reading files and validating records: every problem as an exact ``FILE:LINE: field: reason``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loft.core.errors import DataError, NotFoundError
from loft.data import read_records, validate_file
from loft.data.validate import raise_for_problems

pytestmark = pytest.mark.unit

U, A, S = "user", "assistant", "system"


def msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def problems_of(path: Path, **kw) -> list[str]:
    return validate_file(path, **kw).problems


# ------------------------------------------------------------------------------ file types


def test_jsonl_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    good = json.dumps(msgs((U, "hi"), (A, "hello")))
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + f"{good}\r\n\r\n   \r\n{good}\r\n\n".encode())
    records, problems = read_records(p)
    assert problems == []
    assert [r.line for r in records] == [1, 4]
    assert records[0].format == "chat"
    assert records[0].data == msgs((U, "hi"), (A, "hello"))
    assert records[1].loc == f"{p}:4"


def test_json_array_lines_are_where_each_object_starts(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_text(
        '\ufeff[\r\n  {"instruction": "a", "output": "b"},\r\n\r\n'
        '  {"instruction": "c",\r\n   "input": "ctx",\r\n   "output": "d"},'
        ' {"instruction": "e", "output": "f"}\r\n]\r\n',
        encoding="utf-8",
    )
    records, problems = read_records(p)
    assert problems == []
    assert [r.line for r in records] == [2, 4, 6]
    assert records[1].data["messages"] == [
        {"role": "user", "content": "c\n\nctx"},
        {"role": "assistant", "content": "d"},
    ]


def test_json_array_syntax_error_reports_its_line(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_text('[\n{"text": "a"},\n{"text": "b",}\n]\n')
    assert problems_of(p) == [
        f"{p}:3: record: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 14); records after this were not read"
    ]


def test_csv_lines_are_physical_lines_with_multiline_cells(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_bytes(
        b'\xef\xbb\xbfinstruction,input,output\r\n"two\r\nlines",,out1\r\n\r\n'
        b"q2,,\r\nq3,x\r\nq4,in4,out4\r\n"
    )
    records, problems = read_records(p)
    assert [r.line for r in records] == [2, 7]
    assert records[0].data["messages"][0]["content"] == "two\r\nlines"
    assert records[1].data["messages"][0]["content"] == "q4\n\nin4"
    assert problems == [
        f"{p}:5: output: empty content",
        f"{p}:6: record: expected 3 columns (from the header), got 2",
    ]


def test_csv_cells_may_hold_json_message_lists(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    cell = json.dumps(msgs((U, "hi"), (A, "yo"))["messages"]).replace('"', '""')
    p.write_text(f'messages\n"{cell}"\n')
    records, problems = read_records(p)
    assert problems == [] and records[0].data == msgs((U, "hi"), (A, "yo"))


def test_parquet_rows_and_column_map(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    table = pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", None, "a3"]})
    pq.write_table(table, p)
    records, problems = read_records(p, column_map={"question": "instruction", "answer": "output"})
    assert [r.line for r in records] == [0, 2]
    assert records[0].loc == f"{p}:row 0" and records[0].format == "alpaca"
    # problems name the user's own column, not loft's field
    assert problems == [f"{p}:row 1: answer: missing field"]


def test_column_map_renames_before_detection(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [{"body": "some text"}, {"body": 5}])
    records, problems = read_records(p, column_map={"body": "text"})
    assert records[0].format == "completion" and records[0].data == {"text": "some text"}
    assert problems == [f"{p}:2: body: expected a string, got int"]


def test_each_format_normalises(tmp_path: Path) -> None:
    cases = {
        "chat": msgs((S, "sys"), (U, "u1"), (A, "a1"), (U, "u2"), (A, "a2")),
        "sharegpt": {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "u1"},
                {"from": "gpt", "value": "a1"},
                {"from": "user", "value": "u2"},
                {"from": "assistant", "value": "a2"},
            ]
        },
        "alpaca": {"instruction": "do", "input": "", "output": "done"},
        "completion": {"text": "plain"},
        "preference": {"prompt": "p", "chosen": "good", "rejected": "bad"},
    }
    expected = {
        "chat": cases["chat"],
        "sharegpt": cases["chat"],
        "alpaca": msgs((U, "do"), (A, "done")),
        "completion": {"text": "plain"},
        "preference": {
            "prompt": [{"role": U, "content": "p"}],
            "chosen": [{"role": A, "content": "good"}],
            "rejected": [{"role": A, "content": "bad"}],
        },
    }
    for fmt, row in cases.items():
        p = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        for named in ("auto", fmt):
            records, problems = read_records(p, format=named)
            assert problems == [], (fmt, named)
            assert records[0].format == fmt and records[0].data == expected[fmt]
        assert validate_file(p).format == fmt


def test_preference_with_message_lists_and_implicit_prompt(tmp_path: Path) -> None:
    prompt = [{"role": U, "content": "q"}]
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "chosen": prompt + [{"role": A, "content": "good"}],
                "rejected": prompt + [{"role": A, "content": "bad"}],
            },
            {"prompt": prompt, "chosen": [{"role": U, "content": "x"}], "rejected": ""},
        ],
    )
    records, problems = read_records(p)
    assert records[0].data["prompt"] == prompt
    assert records[0].data["chosen"] == [{"role": A, "content": "good"}]
    assert problems == [f"{p}:2: rejected: empty content"]


# ------------------------------------------------------------------------- every error kind


def test_every_validation_error_kind(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    rows = [
        json.dumps(msgs((U, "fine"), (A, "ok"))),  # 1
        '{"messages": [{"role": "user", "content": "x"}',  # 2 invalid JSON
        json.dumps({"messages": "hello"}),  # 3 wrong type
        json.dumps(msgs((U, "q"), ("tool", "r"), (A, "a"))),  # 4 unknown role
        json.dumps(msgs((U, "q"), (A, "   "))),  # 5 empty content
        json.dumps(msgs((S, "s"), (U, "q"))),  # 6 no assistant turn
        json.dumps(msgs((U, "q"), (A, "a"), (U, "q2"), (U, "q3"), (A, "a3"))),  # 7 two users
        json.dumps(msgs((U, "q"), (A, "a"), (U, "dangling"))),  # 8 ends with user
        json.dumps(msgs((A, "hi"), (U, "q"), (A, "a"))),  # 9 assistant first
        json.dumps(msgs((U, "q"), (S, "late"), (A, "a"))),  # 10 late system
        json.dumps({"messages": [{"role": "user"}, {"content": 3, "role": "assistant"}]}),  # 11
        json.dumps([1, 2]),  # 12 not an object
        json.dumps({"foo": 1}),  # 13 unknown format
        json.dumps(msgs((U, "q"), (A, "a"), (A, "again"))),  # 14 two assistants
    ]
    p.write_text("\n".join(rows) + "\n")
    allowed = "allowed: system, user, assistant"
    assert problems_of(p) == [
        f"{p}:2: record: invalid JSON: Expecting ',' delimiter (column 47)",
        f"{p}:3: messages: expected a list of messages, got str",
        f"{p}:4: messages[1].role: unknown role 'tool' ({allowed})",
        f"{p}:5: messages[1].content: empty content",
        f"{p}:6: messages: no assistant turn to train on",
        f"{p}:7: messages: two consecutive user messages at index 3 and 2",
        f"{p}:8: messages: ends with a user message at index 2; the last message must be an "
        "assistant reply to train on",
        f"{p}:9: messages: assistant message at index 0 comes before any user message; start "
        "with a user turn (after an optional system message)",
        f"{p}:10: messages[1].role: system message at index 1; a system message is allowed only "
        "as the first message",
        f"{p}:11: messages[0].content: missing field",
        f"{p}:11: messages[1].content: expected a string, got int",
        f"{p}:12: record: expected an object, got list",
        f"{p}:13: record: cannot tell the format: found foo; expected one of: messages (a list "
        "of {role, content}) (chat); conversations (a list of {from, value}) (sharegpt); "
        "instruction + output (+ optional input) (alpaca); text (completion); prompt + chosen + "
        "rejected (preference); prompt + completion + label (kto)",
        f"{p}:14: messages: two consecutive assistant messages at index 2 and 1",
    ]
    report = validate_file(p)
    assert (report.n_records, report.n_valid, report.n_invalid, report.ok) == (14, 1, 13, False)


def test_sharegpt_and_alpaca_errors_use_their_own_field_names(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": ""}]},
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "human", "value": "b"},
                    {"from": "gpt", "value": "c"},
                ]
            },
        ],
    )
    assert problems_of(p, format="sharegpt") == [
        f"{p}:1: conversations[0].from: unknown role 'bot' (allowed: human, user, gpt, "
        "assistant, system)",
        f"{p}:2: conversations: two consecutive user messages at index 1 and 0",
    ]
    q = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}, {"instruction": 1, "output": "y"}])
    assert problems_of(q, format="alpaca") == [
        f"{q}:1: output: missing field",
        f"{q}:2: instruction: expected a string, got int",
    ]


def test_named_format_reports_missing_field(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert problems_of(p, format="chat") == [f"{p}:1: messages: missing field"]


def test_bad_utf8_reports_the_line_with_the_byte(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    good = json.dumps({"text": "fine"}).encode()
    p.write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n' + good + b"\n")
    records, problems = read_records(p)
    assert [r.line for r in records] == [1, 3]
    assert problems == [f"{p}:2: record: invalid UTF-8 (byte 0xe9 at column 14)"]
    assert validate_file(p).n_invalid == 1


def test_empty_file(tmp_path: Path) -> None:
    for name, content in (("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text\n")):
        p = tmp_path / name
        p.write_text(content)
        assert problems_of(p) == [f"{p}: file: empty, no records found"]


def test_mixed_formats_name_the_line_and_the_majority(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "m.jsonl",
        [msgs((U, "a"), (A, "b")), {"text": "plain"}, msgs((U, "c"), (A, "d"))],
    )
    records, problems = read_records(p)
    assert [r.line for r in records] == [1, 3]
    assert problems == [
        f"{p}:2: record: format 'completion' differs from the file's majority format 'chat' "
        "(2 of 3 records); one file must use one format"
    ]


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        validate_file(tmp_path / "x.txt")
    with pytest.raises(NotFoundError, match="data file not found"):
        validate_file(tmp_path / "nope.jsonl")


def test_data_error_shows_first_20_and_counts_the_rest(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}] * 25 + [{"text": "ok"}])
    report = validate_file(p)
    with pytest.raises(DataError) as info:
        raise_for_problems(report.problems, report.n_invalid, report.n_records, str(p))
    err = info.value
    lines = err.message.splitlines()
    assert lines[0] == f"{p}: 25 invalid of 26 records:"
    assert lines[1] == f"  {p}:1: text: empty content"
    assert len(lines) == 22 and lines[-1] == "  … and 5 more (25 invalid of 26 records)"
    assert len(err.problems) == 25
    assert "--skip-invalid" in (err.hint or "")
