"""Held-out preference metrics: does the model prefer the chosen reply, and by how much?

For each pair the implicit reward of a reply is its log-probability ratio against a reference,
``r(y) = log p(y | x) - log p_ref(y | x)`` (summed over the reply's tokens, as DPO's reward with
beta = 1). ``preference_accuracy`` is the share of pairs with ``r(chosen) > r(rejected)``;
``reward_margin`` the mean of ``r(chosen) - r(rejected)``, in nats. The reference is the
``--baseline`` when one is given, else the candidate's base model: a DPO model compared with its
SFT parent says what preference tuning added.

Pairs are rendered and tokenized exactly as training renders them
(``loft.data.preference.tokenize_preference``) and scored with the trainer's own packed,
completion-only log-probabilities (``loft.train.preference.completion_logps``).
"""

from __future__ import annotations

from typing import Any

import torch

from loft.core.errors import DataError

PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")


def is_pair(record: Any) -> bool:
    return isinstance(record, dict) and {"prompt", "chosen", "rejected"} <= set(record)


def pair_logps(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], *, batch_size: int = 8
) -> torch.Tensor:
    """[n, 2]: summed log-probabilities of (chosen, rejected) for each pair under ``model``."""
    from loft.data.preference import end_of_turn_ids, tokenize_preference
    from loft.train.attention import register
    from loft.train.preference import completion_logps, pack_pairs

    eot = end_of_turn_ids(tokenizer)
    rows, problems = [], []
    for i, rec in enumerate(records):
        if not is_pair(rec):
            problems.append(f"record {i}: not a preference pair (prompt, chosen, rejected)")
            continue
        row, bad = tokenize_preference(rec, tokenizer, eot_ids=eot)
        problems += [f"record {i}: {field}: {why}" for field, why in bad]
        if row is not None:
            rows.append(row)
    if problems:
        raise DataError(
            f"{len(problems)} pair(s) cannot be scored:\n"
            + "\n".join(f"  {p}" for p in problems[:20]),
            problems=problems,
            hint="`loft data validate FILE` checks a preference file.",
        )
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    was_training = model.training
    model.eval()
    out = torch.zeros(len(rows), 2, dtype=torch.float64)
    try:
        with torch.inference_mode():
            for s in range(0, len(rows), batch_size):
                chunk = rows[s : s + batch_size]
                batch = pack_pairs(
                    [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in chunk]
                )
                batch = {
                    k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                lp = completion_logps(model, batch).double().cpu()
                out[s : s + len(chunk), 0] = lp[: len(chunk)]
                out[s : s + len(chunk), 1] = lp[len(chunk) :]
    finally:
        model.train(was_training)
        model.set_attn_implementation(previous)
    return out


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``preference_accuracy`` and ``reward_margin`` from [n, 2] log-probabilities."""
    rewards = policy - reference
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "preference_accuracy": float((margin > 0).double().mean()),
        "reward_margin": float(margin.mean()),
    }
