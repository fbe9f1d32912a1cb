"""Preference (paired) and KTO (unpaired) data: validation with FILE:LINE, rendering with the chat
template (prefix and end-of-turn checks that refuse), rows, derivation, cache and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loft.core.errors import DataError
from loft.core.specs import DataSpec
from loft.data import (
    load_prepared,
    prepare_dataset,
    prepare_preference_dataset,
    read_records,
    validate_file,
)
from loft.data.preference import end_of_turn_ids
from loft.data.prepare import split_eval

pytestmark = pytest.mark.unit

U, A, S = "user", "assistant", "system"
IM_END = "<|im_end|>"

# SmolLM2's template, except that a user turn followed by anything reads "user (answered)": the
# prompt rendered alone is then not a prefix of prompt + completion.
PREFIX_BREAKING = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}"
    "{% if message['role'] == 'user' and not loop.last %} (answered){% endif %}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolLM2's template, except that the final assistant turn is left open (no <|im_end|>).
UNCLOSED = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if not (loop.last and message['role'] == 'assistant') %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> Any:
    from loft.models import builtin_tokenizer

    return builtin_tokenizer()


def fresh_tokenizer(template: str | None = None) -> Any:
    from loft.models import builtin_tokenizer

    t = builtin_tokenizer()  # a new object each call: changing it leaves `tok` alone
    if template is not None:
        t.chat_template = template
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": "No."}
        for i in range(n)
    ]


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def render(tok: Any, messages: list[dict[str, str]], *, gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


# -------------------------------------------------------------------------------- validation


def test_kto_rows_are_detected_and_normalised(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"prompt": "q", "completion": "good", "label": True},
            {"prompt": msgs((S, "s"), (U, "q")), "completion": msgs((A, "bad")), "label": False},
        ],
    )
    for fmt in ("auto", "kto"):
        records, problems = read_records(p, format=fmt)
        assert problems == []
        assert [r.format for r in records] == ["kto", "kto"]
        assert records[0].data == {
            "prompt": msgs((U, "q")),
            "completion": msgs((A, "good")),
            "label": True,
        }
        assert records[1].data["prompt"] == msgs((S, "s"), (U, "q"))
        assert records[1].data["label"] is False
    c = tmp_path / "k.csv"  # CSV has no booleans: its cells say true/false
    c.write_text("prompt,completion,label\nq,good,true\nq,bad,False\n")
    assert [r.data["label"] for r in read_records(c)[0]] == [True, False]
    assert validate_file(p).format == "kto"


def test_each_preference_validation_error_with_file_line(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "same answer", "rejected": " same  answer"},  # 1
            {"prompt": "q", "chosen": "", "rejected": "b"},  # 2
            {"prompt": "q", "chosen": "a", "rejected": []},  # 3
            {"prompt": msgs((U, "q"), (A, "a")), "chosen": "b", "rejected": "c"},  # 4
            {"prompt": msgs((U, "q"), (U, "q2")), "chosen": "b", "rejected": "c"},  # 5
            {"prompt": "q", "chosen": msgs((A, "same")), "rejected": msgs((A, "same"))},  # 6
            {"prompt": "q", "chosen": msgs((A, "  ")), "rejected": "c"},  # 7
            {"prompt": "q", "chosen": "a", "rejected": "b"},  # 8 fine
        ],
    )
    identical = (
        "rejected: identical to chosen (ignoring whitespace); a pair must prefer one reply over "
        "a different one"
    )
    assert validate_file(p).problems == [
        f"{p}:1: {identical}",
        f"{p}:2: chosen: empty content",
        f"{p}:3: rejected: empty list, expected at least one assistant message",
        f"{p}:4: prompt: ends with an assistant message at index 1; a conversational prompt "
        "must end with the user turn that the completions answer",
        f"{p}:5: prompt: two consecutive user messages at index 1 and 0",
        f"{p}:6: {identical}",
        f"{p}:7: chosen: empty content",
    ]


def test_each_kto_validation_error_with_file_line(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"prompt": "q", "completion": "a", "label": True},  # 1 fine
            {"prompt": "q", "completion": "", "label": False},  # 2
            {"prompt": "q", "completion": "a", "label": "yes"},  # 3
            {"prompt": "q", "completion": "a", "label": 1},  # 4
            {"prompt": "q", "completion": "a"},  # 5
            {"prompt": msgs((S, "s")), "completion": "a", "label": False},  # 6
            {"prompt": "q", "completion": [], "label": True},  # 7
        ],
    )
    label = "label: expected true (desirable) or false (undesirable), got"
    report = validate_file(p)
    assert report.problems == [
        f"{p}:2: completion: empty content",
        f"{p}:3: {label} str 'yes'",
        f"{p}:4: {label} int 1",
        f"{p}:5: label: missing field",
        f"{p}:6: prompt: ends with a system message at index 0; a conversational prompt must "
        "end with the user turn that the completions answer",
        f"{p}:7: completion: empty list, expected at least one assistant message",
    ]
    assert (report.format, report.n_valid, report.n_invalid) == ("kto", 1, 6)


def test_mixed_paired_and_unpaired_rows_name_both_kinds_at_the_first_minority_line(
    tmp_path: Path,
) -> None:
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    row = {"prompt": "q", "completion": "a", "label": True}
    p = write_jsonl(tmp_path / "m.jsonl", [pair, row, pair, row, pair])
    report = validate_file(p)
    assert report.problems == [
        f"{p}:2: record: unpaired (prompt/completion/label) row (and 1 more after it) in a file "
        "of paired (prompt/chosen/rejected) rows (3 of 5 records); one file must hold one kind: "
        "pairs for dpo, orpo and simpo (kto can derive its rows from pairs), or unpaired rows "
        "for kto"
    ]
    assert (report.format, report.n_valid, report.n_invalid) == ("preference", 3, 2)
    q = write_jsonl(tmp_path / "n.jsonl", [row, row, pair])
    assert validate_file(q).problems == [
        f"{q}:3: record: paired (prompt/chosen/rejected) row in a file of unpaired "
        "(prompt/completion/label) rows (2 of 3 records); one file must hold one kind: pairs "
        "for dpo, orpo and simpo (kto can derive its rows from pairs), or unpaired rows for kto"
    ]


# ------------------------------------------------------------------------------- rendering


def test_end_of_turn_comes_from_the_template_not_only_eos(tok: Any) -> None:
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert end_of_turn_ids(tok) == {im_end} and tok.pad_token_id == im_end  # pad == eos
    other = fresh_tokenizer()
    other.eos_token = "<|endoftext|>"
    assert end_of_turn_ids(other) == {other.eos_token_id, im_end}
    assert other.eos_token_id != im_end


def test_pairs_split_at_the_rendered_prompt_and_end_with_end_of_turn(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    conversation = {
        "prompt": msgs((S, "Be brief."), (U, "Hi"), (A, "Hello."), (U, "Capital of France?")),
        "chosen": "Paris.",
        "rejected": msgs((A, "London, I think.")),
    }
    p = write_jsonl(tmp_path / "p.jsonl", [*pairs(3), conversation])
    ds = prepare_preference_dataset(
        DataSpec(train=str(p), eval_fraction=0.0), tok, paired=True, progress=False
    )
    assert ds.layout == "paired" and ds.eval is None
    assert {k: str(v) for k, v in ds.train.features.items()} == {
        "prompt_ids": "List(Value('int32'))",
        "chosen_ids": "List(Value('int32'))",
        "rejected_ids": "List(Value('int32'))",
        "length": "Value('int32')",
    }
    im_end = tok.convert_tokens_to_ids(IM_END)
    records = [r.data for r in read_records(p)[0]]
    assert len(ds.train) == len(records) == 4
    for row, data in zip(ds.train, records, strict=True):
        prompt = data["prompt"]
        assert row["prompt_ids"] == ids(tok, render(tok, prompt, gen=True))
        for side in ("chosen", "rejected"):
            full = ids(tok, render(tok, prompt + data[side], gen=False))
            got = row["prompt_ids"] + row[f"{side}_ids"]
            assert got == full[: len(got)]  # the rendering, up to the end-of-turn token
            assert tok.decode(full[len(got) :]) == "\n"  # only the template's newline after it
            assert row[f"{side}_ids"][-1] == im_end
            assert tok.decode(row[f"{side}_ids"]) == data[side][-1]["content"] + IM_END
        assert row["length"] == sum(
            len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
    r = ds.report
    assert (r["format"], r["layout"], r["too_long"], r["train_records"]) == (
        "preference",
        "paired",
        0,
        4,
    )
    stats = r["stats"]["train"]
    assert stats["prompt_tokens"] == sum(len(x) for x in ds.train["prompt_ids"])
    assert stats["chosen_tokens"] == sum(len(x) for x in ds.train["chosen_ids"])
    assert stats["rejected_tokens"] == sum(len(x) for x in ds.train["rejected_ids"])
    assert stats["completion_tokens"] == stats["chosen_tokens"] + stats["rejected_tokens"]
    assert stats["tokens"] == sum(ds.train["length"])


def test_kto_rows_derived_from_pairs_and_read_from_a_kto_file(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    spec = DataSpec(train=str(p), eval_fraction=0.0)
    paired = prepare_preference_dataset(spec, tok, paired=True, progress=False)
    unpaired = prepare_preference_dataset(spec, tok, paired=False, progress=False)
    assert unpaired.fingerprint != paired.fingerprint
    assert unpaired.layout == "unpaired" and unpaired.report["format"] == "preference"
    assert unpaired.train.column_names == ["prompt_ids", "completion_ids", "label", "length"]
    assert str(unpaired.train.features["label"]) == "Value('bool')"
    expected = []
    for row in paired.train:
        expected.append((row["prompt_ids"], row["chosen_ids"], True))
        expected.append((row["prompt_ids"], row["rejected_ids"], False))
    got = [(r["prompt_ids"], r["completion_ids"], r["label"]) for r in unpaired.train]
    assert got == expected
    assert all(
        r["length"] == len(r["prompt_ids"]) + len(r["completion_ids"]) for r in unpaired.train
    )
    stats = unpaired.report["stats"]["train"]
    assert (stats["desirable"], stats["undesirable"], stats["records"]) == (3, 3, 6)

    k = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"prompt": r["prompt"], "completion": r["chosen"], "label": i != 1}
            for i, r in enumerate(pairs(3))
        ],
    )
    rows = prepare_preference_dataset(
        DataSpec(train=str(k), eval_fraction=0.0), tok, paired=False, progress=False
    )
    assert rows.report["format"] == "kto" and rows.train["label"] == [True, False, True]
    assert rows.train["completion_ids"] == paired.train["chosen_ids"]


def test_a_paired_objective_on_a_kto_file_is_refused(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    for fmt in ("auto", "kto"):
        with pytest.raises(DataError) as info:
            prepare_preference_dataset(DataSpec(train=str(k), format=fmt), tok, paired=True)
        assert info.value.message.startswith(f"{k}: a paired objective on unpaired data")
        assert "objective: kto" in info.value.hint
    sft = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs((U, "q"), (A, "a"))}])
    with pytest.raises(DataError, match="chat records hold no preferences"):
        prepare_preference_dataset(DataSpec(train=str(sft)), tok, paired=False)


def test_a_prompt_that_is_not_a_token_prefix_is_refused_for_every_record(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    assert prepare_preference_dataset(
        DataSpec(train=str(p), eval_fraction=0.0), tok, paired=True, progress=False
    )  # SmolLM2's own template is fine
    prepared = set((loft_home / "datasets").iterdir())
    bad = fresh_tokenizer(PREFIX_BREAKING)
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(
            DataSpec(train=str(p), eval_fraction=0.0), bad, paired=True, progress=False
        )
    err = info.value
    assert err.message.splitlines()[0].startswith("3 of 3 records cannot be rendered")
    assert [x.split(": the rendered")[0] for x in err.problems] == [
        f"{p}:{line}: {side}" for line in (1, 2, 3) for side in ("chosen", "rejected")
    ]
    assert all("is not a token prefix" in x and "(answered)" in x for x in err.problems), (
        err.problems
    )
    assert set((loft_home / "datasets").iterdir()) == prepared  # nothing cached


def test_a_completion_without_its_end_of_turn_token_is_refused(
    loft_home: Path, tmp_path: Path
) -> None:
    k = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "r", "completion": "b", "label": False},
        ],
    )
    open_end = fresh_tokenizer(UNCLOSED)
    assert end_of_turn_ids(open_end) == {open_end.convert_tokens_to_ids(IM_END)}
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(
            DataSpec(train=str(k), eval_fraction=0.0), open_end, paired=False, progress=False
        )
    assert info.value.problems == [
        f"{k}:{line}: completion: does not end with an end-of-turn token ('{IM_END}') once "
        f"rendered (it ends {tail!r}); a model trained on it would not learn to stop"
        for line, tail in ((1, "a"), (2, "b"))
    ]


def test_records_longer_than_max_seq_len_are_dropped_whole_and_counted(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    long = {"prompt": "Question?", "chosen": "Short.", "rejected": "word " * 80}
    p = write_jsonl(tmp_path / "p.jsonl", [*pairs(3), long])
    ds = prepare_preference_dataset(
        DataSpec(train=str(p), eval_fraction=0.0, max_seq_len=64), tok, paired=True, progress=False
    )
    assert ds.report["too_long"] == 1 and len(ds.train) == 3
    for row in ds.train:
        longest = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        assert len(row["prompt_ids"]) + longest <= 64
    unpaired = prepare_preference_dataset(
        DataSpec(train=str(p), eval_fraction=0.0, max_seq_len=64), tok, paired=False, progress=False
    )
    assert unpaired.report["too_long"] == 1 and len(unpaired.train) == 6  # the pair goes whole


def test_re_prepare_is_a_cache_hit_without_tokenizing(
    loft_home: Path, tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loft.data.preference as preference

    calls: list[int] = []
    real = preference.tokenize_preference

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(preference, "tokenize_preference", counting)
    p = write_jsonl(tmp_path / "p.jsonl", pairs(5))
    spec = DataSpec(train=str(p), eval_fraction=0.2)
    first = prepare_preference_dataset(spec, tok, paired=True, progress=False)
    assert len(calls) == 5 and first.report["cached"] is False
    again = prepare_preference_dataset(spec, tok, paired=True, progress=False)
    assert len(calls) == 5  # nothing tokenized again
    assert again.report["cached"] is True and again.fingerprint == first.fingerprint
    assert again.train["chosen_ids"] == first.train["chosen_ids"]
    assert load_prepared(first.fingerprint[:12]).layout == "paired"
    prepare_preference_dataset(spec, tok, paired=False, progress=False)
    assert len(calls) == 10  # unpaired rows are another dataset


def test_eval_split_keeps_each_prompt_on_one_side(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    rows = [
        {"prompt": f"Prompt {i}?", "chosen": f"Good {i}.{j}", "rejected": f"Bad {i}.{j}"}
        for i in range(10)
        for j in range(3)
    ]
    records = read_records(write_jsonl(tmp_path / "p.jsonl", rows))[0]
    train, ev = split_eval(records, 0.2, group=lambda r: json.dumps(r.data["prompt"]))
    assert len(ev) == 6 and len(train) == 24
    assert not {json.dumps(r.data["prompt"]) for r in ev} & {
        json.dumps(r.data["prompt"]) for r in train
    }
    assert len(split_eval(records[:3], 0.5, group=lambda r: "one prompt")[1]) == 0


def test_sft_settings_are_refused_and_sft_refuses_preference_data(
    loft_home: Path, tmp_path: Path, tok: Any
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", pairs(2))
    with pytest.raises(DataError, match="data.train_on_inputs: True is for supervised"):
        prepare_preference_dataset(
            DataSpec(train=str(p), train_on_inputs=True), tok, paired=True, progress=False
        )
    with pytest.raises(DataError, match="objective: dpo\\|kto\\|orpo\\|simpo"):
        prepare_dataset(DataSpec(train=str(p)), tok, progress=False)


# ------------------------------------------------------------------------------------- CLI


def test_inspect_tokens_marks_the_trained_completions(
    loft_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loft.cli.main import main

    p = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}]
    )
    main(["data", "inspect", str(p), "--tokens"])
    out = capsys.readouterr().out
    assert f"{p}:1 (preference): prompt " in out
    assert f"chosen\n⟦4.{IM_END}⟧\nrejected\n⟦5.{IM_END}⟧" in out
    assert f"What is 2+2?{IM_END}\n<|im_start|>assistant\n" in out  # the prompt, unmarked
    assert "⟦What" not in out

    k = write_jsonl(
        tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Go away.", "label": False}]
    )
    main(["data", "inspect", str(k), "--tokens"])
    out = capsys.readouterr().out
    assert f"completion (label false, undesirable)\n⟦Go away.{IM_END}⟧" in out

    main(["data", "prepare", str(p), "--json", "--eval-fraction", "0"])
    fp = json.loads(capsys.readouterr().out)["fingerprint"]
    main(["data", "inspect", fp[:12], "-n", "1"])
    out = capsys.readouterr().out
    assert "train row 0: prompt " in out and f"⟦4.{IM_END}⟧" in out and f"⟦5.{IM_END}⟧" in out

    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs((U, "Hi"), (A, "Hello."))}])
    main(["data", "inspect", str(c), "--tokens"])
    assert f"⟦Hello.{IM_END}⟧" in capsys.readouterr().out


def test_inspect_tokens_shows_why_a_record_cannot_be_rendered(
    loft_home: Path, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from loft.cli.main import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(PREFIX_BREAKING)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    p = write_jsonl(tmp_path / "p.jsonl", pairs(1))
    main(["data", "inspect", str(p), "--tokens", "--model", str(model)])
    out = capsys.readouterr().out
    assert f"{p}:1: chosen: the rendered prompt is not a token prefix" in out


def test_prepare_cli_picks_pairs_or_unpaired_rows(
    loft_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loft.cli.main import main

    p = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    main(["data", "prepare", str(p), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (report["layout"], report["format"], report["cached"]) == ("paired", "preference", False)
    main(["data", "prepare", str(p), "--objective", "kto"])
    out = capsys.readouterr().out
    assert "format preference, unpaired rows (kto)" in out and "desirable" in out
    main(["data", "prepare", str(p)])
    out = capsys.readouterr().out
    assert f"dataset {report['fingerprint'][:12]} (cached)" in out and "chosen" in out
    assert "dropped 0 longer than max_seq_len 1024" in out

    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(SystemExit) as info:
        main(["data", "prepare", str(k), "--objective", "dpo"])
    assert info.value.code == 2
    assert "a paired objective on unpaired data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", str(p), "--objective", "sft"])
    assert "objective: dpo|kto|orpo|simpo" in capsys.readouterr().err
