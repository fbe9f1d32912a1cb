"""loft.evaluate: pure scorers, and the batched greedy generation harness (tiny + real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loft.core.errors import ConfigError, DataError, NotFoundError
from loft.evaluate.scorers import (
    SCORERS,
    exact_match,
    get_scorer,
    json_exact_match,
    json_field_accuracy,
    parse_json_object,
)

HELDOUT = Path(__file__).resolve().parents[1] / "examples" / "support_tickets" / "heldout.jsonl"
REF = '{"category":"billing","priority":"high","product":"mobile app"}'


# ---------------------------------------------------------------- scorers (pure)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        (REF, 1.0),
        (f"  {REF}\n", 1.0),
        (f"```json\n{REF}\n```", 1.0),
        (f"{REF} I hope this helps! {{not json}}", 1.0),
        (f"Here you go: {REF}", 1.0),
        ('{"product": "mobile app", "priority": "high", "category": "billing"}', 1.0),
        ('{"category":"billing","priority":"low","product":"mobile app"}', 0.0),
        ('{"category":"billing","priority":"high"}', 0.0),
        ('{"category":"billing","priority":"high","product":"mobile app","x":1}', 0.0),
        ('{"category":"billing","priority":"high","product":"mobile app"', 0.0),
        ("billing, high, mobile app", 0.0),
        ("", 0.0),
        ('["billing","high","mobile app"]', 0.0),
    ],
)
def test_json_exact_match(pred: str, expected: float) -> None:
    assert json_exact_match(pred, REF) == expected


@pytest.mark.unit
def test_json_exact_match_invalid_reference_scores_zero() -> None:
    assert json_exact_match(REF, "not json") == 0.0


@pytest.mark.unit
def test_parse_json_object_skips_a_broken_brace_before_the_object() -> None:
    assert parse_json_object('{oops} then {"a": 1} and {"b": 2}') == {"a": 1}
    assert parse_json_object('{"a": {"b": [1, 2]}}') == {"a": {"b": [1, 2]}}
    assert parse_json_object("no braces here") is None
    assert parse_json_object("{") is None


@pytest.mark.unit
def test_exact_match_strips_only_surrounding_whitespace() -> None:
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Par is", "Paris") == 0.0


@pytest.mark.unit
def test_json_field_accuracy() -> None:
    pred = '```json\n{"priority":"high","category":"technical","product":"mobile app"}\n```'
    assert json_field_accuracy(pred, REF) == {"category": 0.0, "priority": 1.0, "product": 1.0}
    assert json_field_accuracy("garbage", REF) == {"category": 0.0, "priority": 0.0, "product": 0.0}
    assert json_field_accuracy(REF, "garbage") == {}


@pytest.mark.unit
def test_scorer_registry() -> None:
    assert set(SCORERS) == {"exact_match", "json_exact_match", "rouge_l"}
    assert get_scorer("json_exact_match") is json_exact_match
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        get_scorer("bleu")


@pytest.mark.integration
def test_scorers_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, loft.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- harness helpers


def _records(n: int) -> list[dict]:
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.mark.unit
def test_split_record_uses_last_assistant_turn() -> None:
    from loft.evaluate.harness import split_record

    rec = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    prompt, ref = split_record(rec)
    assert [m["content"] for m in prompt] == ["a", "b", "c"]
    assert ref == "d"
    with pytest.raises(DataError, match="record 7"):
        split_record({"messages": [{"role": "user", "content": "a"}]}, 7)
    with pytest.raises(DataError, match="record 0"):
        split_record({"text": "a"})


@pytest.mark.unit
def test_load_jsonl_records(tmp_path: Path) -> None:
    from loft.evaluate.harness import load_jsonl_records

    assert len(load_jsonl_records(HELDOUT)) == 200
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n\nnot json\n[1]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_jsonl_records(bad)
    assert [p.split(":", 2)[1] for p in err.value.problems] == ["3", "4"]
    with pytest.raises(NotFoundError):
        load_jsonl_records(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- harness on the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return model, tok


@pytest.mark.unit
def test_batched_generation_equals_unbatched_and_keeps_order(tiny) -> None:
    from loft.evaluate.harness import GenerationStats, generate, split_record

    model, tok = tiny
    convs = [split_record(r)[0] for r in _records(7)]
    convs.append([{"role": "user", "content": "hi"}])  # much shorter: forces left padding
    tok_side = tok.padding_side
    stats = GenerationStats()
    batched = generate(
        model, tok, convs, max_new_tokens=12, batch_size=4, progress=False, stats=stats
    )
    single = generate(model, tok, convs, max_new_tokens=12, batch_size=1, progress=False)
    assert len(batched) == len(convs)
    assert batched == single
    # each prompt's own completion, not its neighbour's: generating one alone gives the same text
    assert generate(model, tok, [convs[5]], max_new_tokens=12, progress=False) == [batched[5]]
    assert tok.padding_side == tok_side
    assert stats.prompts == len(convs)
    assert 0 < stats.new_tokens <= 12 * len(convs)
    assert stats.tokens_per_s > 0


@pytest.mark.unit
def test_generation_stops_at_end_of_turn(tiny) -> None:
    """When <|im_end|> is the greedy choice each row generates one token and decodes to ''."""
    from loft.evaluate.harness import GenerationStats, generate

    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def force_eos(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] = logits.max() + 10.0
        return logits

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        stats = GenerationStats()
        convs = [[{"role": "user", "content": "x"}], [{"role": "user", "content": "longer one"}]]
        out = generate(model, tok, convs, batch_size=2, progress=False, stats=stats)
    finally:
        handle.remove()
    assert out == ["", ""]
    assert stats.new_tokens == 2


@pytest.mark.unit
def test_evaluate_generation_end_to_end(tiny) -> None:
    from loft.evaluate.harness import evaluate_generation

    model, tok = tiny
    records = _records(4)
    result = evaluate_generation(
        model, tok, records, max_new_tokens=8, batch_size=3, progress=False, n_samples=2
    )
    assert result.metric == "json_exact_match"
    assert result.n == 4
    assert len(result.predictions) == len(result.scores) == 4
    assert result.score == sum(result.scores) / 4
    assert set(result.field_accuracy) == {"category", "priority", "product"}
    refs = [r["messages"][-1]["content"] for r in records]
    per_record = [json_field_accuracy(p, r) for p, r in zip(result.predictions, refs, strict=True)]
    assert result.field_accuracy == {
        k: pytest.approx(sum(d[k] for d in per_record) / 4) for k in result.field_accuracy
    }
    assert [s.ref for s in result.samples] == [r["messages"][-1]["content"] for r in records[:2]]
    assert result.samples[0].prompt == records[0]["messages"][1]["content"]
    assert json.loads(json.dumps(result.to_dict()))["n"] == 4


@pytest.mark.unit
def test_evaluate_generation_scores_a_known_answer(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring is wired to the right reference: feed predictions through a stand-in generator."""
    from loft.evaluate import harness

    model, tok = tiny
    records = _records(4)
    refs = [r["messages"][-1]["content"] for r in records]
    canned = [f"```json\n{refs[0]}\n```", refs[1] + " done", refs[0], "nope"]
    monkeypatch.setattr(harness, "generate", lambda *a, **k: canned)
    result = harness.evaluate_generation(model, tok, records, progress=False)
    expected = [1.0, 1.0, float(refs[0] == refs[2]), 0.0]
    assert result.scores == expected
    assert result.score == sum(expected) / 4


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_generates_for_heldout_prompts(smollm2) -> None:
    from loft.evaluate.harness import evaluate_generation
    from loft.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2)
    result = evaluate_generation(model, tok, _records(4), max_new_tokens=24, progress=False)
    assert result.n == 4
    assert all(p.strip() for p in result.predictions)  # real text, not an immediate stop
    assert result.tokens_per_s > 0
