"""Render conversations with the tokenizer's chat template and build loss masks.

The mask is found from the template itself, never from token ids (SmolLM2's pad == eos ==
``<|im_end|>``): for each assistant message i, render ``messages[:i]`` with the generation prompt
(P) and ``messages[:i+1]`` (Q). Q starts with P, and ``Q[len(P):]`` (trailing whitespace removed)
is exactly the assistant's reply *including the template's end-of-turn token*, so the model learns
to stop. The full text is tokenized once with offsets and a token is trained when it starts inside
such a span. Template text is tokenized with ``add_special_tokens=False``: the template already
writes any BOS it wants.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from loft.core.errors import DataError
from loft.core.paths import atomic_write_json, loft_home, read_json_object

IGNORE_INDEX = -100
# the files a tokenizer is loaded from (whichever of them a folder has)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)  # fmt: skip
_MEMO = "tokenizer_fingerprints.json"


def tokenizer_files_key(folder: Path, context: str) -> str | None:
    """A key for "the tokenizer these files load into, in this context, with this transformers":
    sha256 over the files' bytes, ``context`` (how it is loaded) and the transformers version.
    None when the folder holds no tokenizer files."""
    present = [n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()]
    if not present:
        return None
    h = hashlib.sha256(f"{context}\0{metadata.version('transformers')}".encode())
    for name in present:
        h.update(f"\0{name}\0".encode() + (Path(folder) / name).read_bytes())
    return h.hexdigest()


def cached_tokenizer_fingerprint(key: str) -> str | None:
    """The :func:`tokenizer_fingerprint` recorded for ``key`` (no tokenizer is loaded)."""
    value = read_json_object(loft_home() / "cache" / _MEMO).get(key)
    return value if isinstance(value, str) else None


def remember_tokenizer_fingerprint(key: str, fingerprint: str) -> None:
    path = loft_home() / "cache" / _MEMO
    atomic_write_json(path, {**read_json_object(path), key: fingerprint})


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer definition (tokenizer.json), chat template and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(b"\0" + json.dumps(getattr(tokenizer, "chat_template", None)).encode())
    specials = {
        "map": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(b"\0" + json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def _render(tokenizer: Any, messages: list[dict[str, str]], *, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple]]:
    """The full rendered text and the (start, end) char span of every assistant reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template",
            hint="Use format 'completion' for plain text, or a model with a chat template.",
        )
    full = _render(tokenizer, messages, gen=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], gen=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], gen=False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise DataError(
                "the chat template does not render conversations incrementally (rendering the "
                f"first {i + 1} messages is not a prefix of the whole), so loft cannot tell which "
                "tokens are the assistant's",
                hint="Use a model whose chat template appends turns, or --train-on-inputs.",
            )
        reply = upto[len(prefix) :].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))
    return full, spans


def tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
) -> dict[str, Any]:
    """``{"input_ids", "labels", "truncated"}``; labels are -100 outside assistant replies
    (unless ``train_on_inputs``). Truncation keeps the start."""
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue
            while k < len(spans) and spans[k][1] <= s:
                k += 1
            if k < len(spans) and spans[k][0] <= s < spans[k][1]:
                labels[t] = ids[t]
    return _truncate(ids, labels, max_seq_len)


def tokenize_completion(text: str, tokenizer: Any, *, max_seq_len: int) -> dict[str, Any]:
    """Plain text + eos, every token trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return _truncate(ids, list(ids), max_seq_len)


def tokenize_record(
    data: dict[str, Any], tokenizer: Any, *, max_seq_len: int, train_on_inputs: bool = False
) -> dict[str, Any]:
    if "text" in data:
        return tokenize_completion(data["text"], tokenizer, max_seq_len=max_seq_len)
    return tokenize_conversation(
        data["messages"], tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs
    )


def _truncate(ids: list[int], labels: list[int], max_seq_len: int) -> dict[str, Any]:
    truncated = len(ids) > max_seq_len
    return {
        "input_ids": ids[:max_seq_len],
        "labels": labels[:max_seq_len],
        "truncated": truncated,
    }


def mask_segments(
    input_ids: list[int], labels: list[int], tokenizer: Any
) -> list[tuple[str, bool]]:
    """Decode a row into runs of (text, trained) so a user can see the loss mask."""
    out: list[tuple[str, bool]] = []
    run: list[int] = []
    state: bool | None = None
    for tid, lab in zip(input_ids, labels, strict=True):
        trained = lab != IGNORE_INDEX
        if state is not None and trained != state:
            out.append((tokenizer.decode(run), state))
            run = []
        run.append(tid)
        state = trained
    if run and state is not None:
        out.append((tokenizer.decode(run), state))
    return out
