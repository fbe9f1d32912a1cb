"""Chat-template rendering and loss masks on the real SmolLM2 tokenizer (pad == eos)."""

from __future__ import annotations

from typing import Any

import pytest

from loft.data import IGNORE_INDEX, mask_segments, tokenize_conversation, tokenizer_fingerprint
from loft.data.template import tokenize_completion

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?\nExplain."},
    {"role": "assistant", "content": "6, because 3 and 3 make six.\nDone"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    from loft.models import builtin_tokenizer

    return builtin_tokenizer()


def labelled_runs(ids: list[int], labels: list[int], tok: Any) -> list[str]:
    """Decode contiguous labelled runs token by token."""
    runs: list[list[int]] = []
    prev = False
    for tid, lab in zip(ids, labels, strict=True):
        on = lab != IGNORE_INDEX
        if on:
            assert lab == tid  # a label is always the token itself
            if not prev:
                runs.append([])
            runs[-1].append(tid)
        prev = on
    return ["".join(tok.decode([t]) for t in run) for run in runs]


def test_assistant_only_mask_token_by_token(tok: Any) -> None:
    assert tok.pad_token_id == tok.eos_token_id  # the trap: masks must not come from pad ids
    end = tok.eos_token  # <|im_end|>
    out = tokenize_conversation(CONVERSATION, tok, max_seq_len=4096)
    ids, labels = out["input_ids"], out["labels"]
    assert not out["truncated"] and len(ids) == len(labels)
    replies = [m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    assert labelled_runs(ids, labels, tok) == replies
    # every assistant turn's closing <|im_end|> is trained; the system/user ones are not
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos_positions) == len(CONVERSATION)
    trained = [labels[i] != IGNORE_INDEX for i in eos_positions]
    assert trained == [m["role"] == "assistant" for m in CONVERSATION]
    # the exact number of trained tokens is the replies tokenized on their own
    expected = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
    assert sum(lab != IGNORE_INDEX for lab in labels) == expected
    # the untrained text is exactly the template around the replies
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids) == text
    untrained = "".join(s for s, on in mask_segments(ids, labels, tok) if not on)
    assert untrained == text.replace(replies[0], "").replace(replies[1], "").replace(replies[2], "")


def test_default_system_prompt_injected_by_template_is_not_trained(tok: Any) -> None:
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = tokenize_conversation(convo, tok, max_seq_len=4096)
    assert "SmolLM" in tok.decode(out["input_ids"])  # template's default system prompt
    assert labelled_runs(out["input_ids"], out["labels"], tok) == ["hello<|im_end|>"]


def test_no_second_bos(tok: Any) -> None:
    out = tokenize_conversation(CONVERSATION, tok, max_seq_len=4096)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert out["input_ids"][0] == start and out["input_ids"][1] != start


def test_train_on_inputs_labels_everything(tok: Any) -> None:
    out = tokenize_conversation(CONVERSATION, tok, max_seq_len=4096, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_truncation_keeps_the_start(tok: Any) -> None:
    full = tokenize_conversation(CONVERSATION, tok, max_seq_len=4096)
    cut = tokenize_conversation(CONVERSATION, tok, max_seq_len=40)
    assert cut["truncated"] and len(cut["input_ids"]) == 40
    assert cut["input_ids"] == full["input_ids"][:40] and cut["labels"] == full["labels"][:40]


def test_completion_is_trained_whole_with_eos(tok: Any) -> None:
    out = tokenize_completion("Once upon a time", tok, max_seq_len=100)
    assert out["input_ids"][-1] == tok.eos_token_id
    assert out["labels"] == out["input_ids"]
    assert tok.decode(out["input_ids"]) == "Once upon a time<|im_end|>"


def test_tokenizer_fingerprint_is_stable_and_sees_the_template(tok: Any) -> None:
    from loft.models import builtin_tokenizer

    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(builtin_tokenizer())  # a second load hashes the same
    other = builtin_tokenizer()
    other.chat_template = other.chat_template.replace("helpful", "useful")
    assert tokenizer_fingerprint(other) != fp
