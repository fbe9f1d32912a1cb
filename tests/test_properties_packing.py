"""Property tests of batch collation (loft.data.packing) and of the chat template's loss mask.

Packing, as loft defines it: one row that is the examples' tokens in order, each exactly once;
``position_ids`` restarting at 0 at every example (transformers makes that a block-diagonal
attention mask, so nothing attends across examples); the first label of each example ignored (so
no example's loss is predicted from the one before it); every other label as the example had
it; ``cu_seq_lens``/``seq_bounds`` the example boundaries and ``max_length`` the longest.
Padding: the same tokens and labels, pads masked in attention and labels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loft.data.packing import IGNORE_INDEX, count_label_tokens, pack_batch, pad_batch

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


@st.composite
def example(draw: st.DrawFn, max_len: int = 40) -> dict[str, list[int]]:
    ids = draw(st.lists(st.integers(0, 50_000), min_size=1, max_size=max_len))
    trained = draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, trained, strict=True)]
    return {"input_ids": ids, "labels": labels}


batches = st.lists(example(), min_size=1, max_size=8)


@SETTINGS
@given(batch=batches)
def test_packing_keeps_every_token_once_and_no_example_sees_another(batch: list[dict]) -> None:
    out = pack_batch(batch)
    ids = out["input_ids"][0].tolist()
    labels = out["labels"][0].tolist()
    pos = out["position_ids"][0].tolist()
    bounds = list(out["seq_bounds"])
    assert out["input_ids"].shape[0] == 1 and out["attention_mask"] is None
    assert ids == [t for ex in batch for t in ex["input_ids"]]  # every token, once, in order
    assert out["num_tokens"] == len(ids)
    assert bounds == out["cu_seq_lens"].tolist()
    assert bounds[0] == 0 and bounds[-1] == len(ids) and len(bounds) == len(batch) + 1
    assert out["max_length"] == max(len(ex["input_ids"]) for ex in batch)
    for ex, start, end in zip(batch, bounds[:-1], bounds[1:], strict=True):
        n = len(ex["input_ids"])
        assert end - start == n <= out["max_length"]
        assert pos[start:end] == list(range(n))  # positions restart: attention stays inside
        assert labels[start] == IGNORE_INDEX  # nothing predicts an example from the one before
        assert labels[start + 1 : end] == ex["labels"][1:]
        trained = [lab for lab in labels[start:end] if lab != IGNORE_INDEX]
        assert set(trained) <= set(ex["input_ids"])  # a label is one of its own tokens
    expected = sum(sum(lab != IGNORE_INDEX for lab in ex["labels"][1:]) for ex in batch)
    # count_label_tokens skips the row's first position, which packing always ignores
    assert count_label_tokens(out) == expected


@SETTINGS
@given(batch=batches, pad=st.integers(0, 50_000))
def test_padding_masks_every_pad(batch: list[dict], pad: int) -> None:
    out = pad_batch(batch, pad)
    width = max(len(ex["input_ids"]) for ex in batch)
    assert tuple(out["input_ids"].shape) == (len(batch), width)
    assert out["num_tokens"] == sum(len(ex["input_ids"]) for ex in batch)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        assert out["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert out["labels"][i, :n].tolist() == ex["labels"]
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert out["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert out["input_ids"][i, n:].tolist() == [pad] * (width - n)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from loft.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(tiny_model)))


# users speak digits, assistants letters: a trained token may hold only an assistant's text
user_text = st.text(alphabet="0123456789 ", min_size=1, max_size=12)
assistant_text = st.text(alphabet="abcdefgh ", min_size=1, max_size=12)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    turns=st.lists(st.tuples(user_text, assistant_text), min_size=1, max_size=3),
    max_seq_len=st.integers(4, 120),
)
def test_the_loss_mask_trains_only_assistant_replies(tokenizer, turns, max_seq_len: int) -> None:
    from loft.data.template import tokenize_conversation

    messages = []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    out = tokenize_conversation(messages, tokenizer, max_seq_len=max_seq_len)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) <= max_seq_len
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert not any(c.isdigit() for c in trained), trained  # no user text is ever trained
    if not out["truncated"]:
        for _, reply in turns:  # every reply is trained, with the end-of-turn token
            assert reply.strip() in trained
        assert trained.count(tokenizer.eos_token or "<|im_end|>") == len(turns)
