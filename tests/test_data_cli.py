"""`loft data validate | prepare | inspect` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loft.cli.main import app, main

LOFT = str(Path(sys.executable).parent / "loft")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def run_loft(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOFT_HOME": str(home), "COLUMNS": "400"}
    return subprocess.run([LOFT, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.unit
@pytest.mark.parametrize("cmd", [[], ["validate"], ["prepare"], ["inspect"]])
def test_help(cmd: list[str]) -> None:
    result = CliRunner().invoke(app, ["data", *cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.integration
def test_validate_malformed_file_exits_2_with_file_line_problems(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            chat("q", "a"),
            "{not json",
            {"messages": [{"role": "bot", "content": "x"}]},
            chat("q", ""),
        ],
    )
    res = run_loft("data", "validate", str(p), home=tmp_path / "home")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    assert "3 invalid of 4 records" in res.stderr
    for line in (
        f"{p}:2: record: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 2)",
        f"{p}:3: messages[0].role: unknown role 'bot' (allowed: system, user, assistant)",
        f"{p}:4: messages[1].content: empty content",
    ):
        assert line in res.stderr
    assert "--skip-invalid" in res.stderr


@pytest.mark.unit
def test_validate_ok_and_column_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_jsonl(tmp_path / "ok.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}])
    main(["data", "validate", str(p), "--column-map", "q=instruction", "--column-map", "a=output"])
    assert capsys.readouterr().out.strip() == "OK: 2 records, format alpaca"
    with pytest.raises(SystemExit) as info:
        main(["data", "validate", str(p), "--column-map", "nonsense"])
    assert info.value.code == 2


@pytest.mark.unit
def test_prepare_then_inspect(
    loft_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loft.models import builtin_tokenizer

    builtin_tokenizer()  # make sure the shared tokenizer cache exists before timing the CLI
    rows = [chat(f"Question {i}? Mail bob{i}@example.org", f"Answer {i}.") for i in range(12)]
    p = write_jsonl(tmp_path / "t.jsonl", [*rows, rows[0]])
    main(["data", "prepare", str(p), "--json", "--max-seq-len", "256"])
    report = json.loads(capsys.readouterr().out)
    assert report["exact_dups"] == 1 and report["train_records"] == 11
    assert report["pii"]["kinds"]["email"]["count"] == 12
    assert report["settings"]["max_seq_len"] == 256 and not report["cached"]
    fp = report["fingerprint"]
    assert Path(report["path"]) == loft_home / "datasets" / fp

    main(["data", "prepare", str(p), "--max-seq-len", "256"])
    out = capsys.readouterr().out
    assert f"dataset {fp[:12]} (cached)" in out and f"fingerprint {fp}" in out
    assert "email" in out and "exact" in out

    main(["data", "inspect", fp[:12], "-n", "1"])
    out = capsys.readouterr().out
    assert "train row 0" in out and "Answer 0.<|im_end|>" in out

    main(["data", "inspect", str(p), "-n", "1"])
    out = capsys.readouterr().out
    assert "format chat, 13 records, 0 invalid" in out and "bob0@example.org" in out


@pytest.mark.unit
def test_prepare_rejects_bad_options(
    loft_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")])
    with pytest.raises(SystemExit) as info:
        main(["data", "prepare", str(p), "--pii", "maybe"])
    assert info.value.code == 2
    assert "pii" in capsys.readouterr().err


@pytest.mark.integration
def test_format_pii_redact_and_skip_invalid_flags_end_to_end(loft_home: Path, tmp_path: Path):
    """`--format` overrides detection, `--skip-invalid` drops what that format rejects,
    `--pii redact` replaces the emails in the rows that are trained on."""
    from loft.data import load_prepared
    from loft.models import builtin_tokenizer

    rows = [
        {"text": f"Ticket {i}: write to carol{i}@example.org about order {i}.",
         "instruction": "unused", "output": "unused"}
        for i in range(6)
    ]  # fmt: skip
    p = write_jsonl(tmp_path / "mixed.jsonl", [*rows, {"instruction": "no text", "output": "x"}])
    auto = run_loft("data", "prepare", str(p), "--json", home=loft_home)
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["format"] == "alpaca"  # what detection picks

    strict = run_loft("data", "prepare", str(p), "--format", "completion", home=loft_home)
    assert strict.returncode == 2 and f"{p}:7:" in strict.stderr
    assert "--skip-invalid" in strict.stderr and "Traceback" not in strict.stderr

    args = ["--format", "completion", "--pii", "redact", "--skip-invalid", "--json"]
    res = run_loft("data", "prepare", str(p), *args, home=loft_home)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["format"] == "completion"
    assert (report["records"], report["invalid"], report["dropped_invalid"]) == (7, 1, 1)
    assert report["pii"]["mode"] == "redact" and report["pii"]["kinds"]["email"]["count"] == 6
    ds = load_prepared(report["fingerprint"])
    tok = builtin_tokenizer()
    texts = [tok.decode(r["input_ids"]) for split in (ds.train, ds.eval) if split for r in split]
    assert len(texts) == 6
    assert all("[EMAIL]" in t and "@example.org" not in t and "Ticket" in t for t in texts)


_PREPARE_AGAIN = """
import json, sys
from loft.cli.main import main
main(["data", "prepare", sys.argv[1], "--model", sys.argv[2], "--json"])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})))
"""


@pytest.mark.integration
def test_a_cache_hit_is_found_without_loading_the_tokenizer(
    loft_home: Path, tmp_path: Path, tiny_model: Path
) -> None:
    """The second prepare of the same file and tokenizer reports the cached dataset without
    importing transformers or torch (seconds); a changed tokenizer file is a miss, not a stale
    hit. The timing is in bench/overheads.py."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(6)]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    first = run_loft("data", "prepare", str(p), "--model", str(model), "--json", home=loft_home)
    assert first.returncode == 0, first.stderr
    fp = json.loads(first.stdout)["fingerprint"]

    env = {**os.environ, "LOFT_HOME": str(loft_home)}
    again = subprocess.run([sys.executable, "-c", _PREPARE_AGAIN, str(p), str(model)],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    *report, modules = again.stdout.strip().splitlines()
    shown = json.loads("\n".join(report))
    assert shown["cached"] is True and shown["fingerprint"] == fp
    assert json.loads(modules) == []

    template = model / "chat_template.jinja"  # a changed template tokenizes differently
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    changed = run_loft("data", "prepare", str(p), "--model", str(model), "--json", home=loft_home)
    assert changed.returncode == 0, changed.stderr
    after = json.loads(changed.stdout)
    assert after["cached"] is False and after["fingerprint"] != fp
