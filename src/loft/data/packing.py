"""Batch collation: padding-free packing (default) or right padding.

Packing concatenates a micro-batch's examples into one row with ``position_ids`` restarting at 0
for each example. transformers turns reset position ids into a block-diagonal attention mask
(``masking_utils.find_packed_sequence_indices``), so no token attends across examples, and the first
label of every example is masked so no loss crosses a boundary either. No pad tokens are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100


def pack_batch(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row: concatenated ids, per-example positions, boundary-safe labels (torch tensors)."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    cu = [0]
    for ex in examples:
        n = len(ex["input_ids"])
        ids.extend(ex["input_ids"])
        lab = list(ex["labels"])
        lab[0] = IGNORE_INDEX  # nothing in this example predicts its first token
        labels.extend(lab)
        pos.extend(range(n))
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "attention_mask": None,
        # example boundaries, as flash-attn varlen names them: read by loft's packed attention;
        # also as Python ints, so that attention on a GPU never reads them back from the device
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "seq_bounds": tuple(cu),
        "max_length": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "num_tokens": len(ids),
    }


def pad_batch(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest example. Pads are masked in attention and in the labels."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attn[i, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": None,
        "attention_mask": attn,
        "num_tokens": int(attn.sum()),
    }


def collate(examples: Sequence[dict[str, Any]], *, packing: bool, pad_token_id: int) -> dict:
    return pack_batch(examples) if packing else pad_batch(examples, pad_token_id)


def count_label_tokens(batch: dict[str, Any]) -> int:
    """Tokens that contribute to the loss: positions 1.. whose label is not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
