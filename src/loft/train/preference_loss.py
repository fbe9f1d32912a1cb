"""Preference losses (DPO, KTO, ORPO, SimPO) as pure functions of per-example log-probabilities.

The preference loop (``loft.train.preference``) runs the model, reduces each completion to the SUM
of its tokens' log-probabilities (:func:`sequence_logps`) and its token count, and calls one
function here per micro-batch. Every function returns a per-example loss, not reduced: the loop
sums it over the optimizer step and divides by the number of pairs (KTO: examples), which is TRL's
loss (a mean over the micro-batch) when the step is one micro-batch. Each formula is TRL 1.16.0's
(pinned), checked on the same tensors by ``tests/test_preference_loss.py``. Where TRL works on
average (per-token) log-probabilities, the function divides by the lengths itself: the loop always
passes sums.

DPO (Rafailov et al. 2023, arXiv:2305.18290), ``trl.DPOTrainer._compute_loss``. With the log-ratios
``c = chosen - ref_chosen`` and ``r = rejected - ref_rejected`` (sums) and ``d = c - r``:

- ``sigmoid``: ``-log sigmoid(beta * d)``. With ``label_smoothing = e > 0`` this is conservative DPO
  (cDPO, Mitchell 2023): ``-(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)``, the formula of
  TRL < 1.0's DPOTrainer and of TRL 1.16's ``CPOTrainer.cpo_loss``. TRL 1.16's DPOTrainer ignores
  ``label_smoothing`` for ``sigmoid`` (it reads it only for ``robust``, ``exo_pair`` and ``aot``),
  so for ``e > 0`` we match the cDPO formula, not DPOTrainer 1.16.
- ``robust`` (Chowdhury et al. 2024, arXiv:2403.00409), as TRL 1.16:
  ``(-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)``.
- ``hinge`` (SLiC, arXiv:2305.10425): ``relu(1 - beta * d)``.
- ``ipo`` (Azar et al. 2023, arXiv:2310.12036, eq. 17): ``(d_avg - 1 / (2 beta))^2`` where, as in
  TRL 1.16, each log-ratio is divided by its completion's token count (clamped at 1) before the
  difference: ``d_avg = c / chosen_len - r / rejected_len`` (TRL confirmed this normalisation with
  the IPO authors). ``beta`` is the paper's tau.

Rewards (logged, detached) are ``beta * c`` and ``beta * r`` for every DPO loss type, IPO included.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7), ``trl.KTOTrainer._compute_loss`` with
``loss_type="kto"``: with ``x = policy - reference`` (sums) and the reference point ``z0`` (``kl``),
a desirable example costs ``desirable_weight * (1 - sigmoid(beta (x - z0)))`` and an undesirable
one ``undesirable_weight * (1 - sigmoid(beta (z0 - x)))``. ``z0`` comes from :func:`kto_kl`: the
mean over the micro-batch of ``policy_KL - ref_KL`` on mismatched (prompt, other completion) pairs,
detached, clamped at 0, computed once per micro-batch as TRL does. TRL's loss is the plain mean of
these over the micro-batch (the weights are not renormalised), which the loop's sum / count gives.

SimPO (Meng et al. 2024, arXiv:2405.14734), ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with
``loss_type="simpo"``: no reference; with average log-probabilities ``a_c = chosen / chosen_len``,
``a_r = rejected / rejected_len``, ``z = beta * ((a_c - a_r) - gamma / beta)`` (TRL's order of
operations, equal to the paper's ``beta a_c - beta a_r - gamma``) the loss is
``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``. ``gamma`` is TRL's ``simpo_gamma`` (the paper's
gamma, a margin in reward units; TRL divides it by beta internally). ``nll_weight`` is TRL's
``cpo_alpha`` (CPO-SimPO): TRL adds ``cpo_alpha * NLL`` where NLL is the chosen completions'
cross-entropy averaged over all their tokens in the micro-batch (see "NLL terms" below). Pure SimPO
is ``nll_weight=0``, our default; note that TRL's ``CPOConfig`` defaults to ``cpo_alpha=1.0``.
Rewards are ``beta * a_c`` and ``beta * a_r``.

ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7), ``trl.experimental.orpo.ORPOTrainer``: with
the average log-probabilities ``a_c``, ``a_r`` as for SimPO,
``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`` and the loss is
``NLL - lam * log sigmoid(log_odds)``; ``lam`` is TRL's ``beta`` (the paper's lambda). Rewards are
``lam * a_c`` and ``lam * a_r``. TRL's NLL runs over the chosen sequence's prompt AND completion
tokens (its comment: "orpo chosen nll loss is computed over the full prompt and response"); ours
defaults to the completion tokens (the paper's official code offers both, ``disable_prompt_loss``).
To reproduce TRL exactly, pass ``nll_sum``/``nll_len`` summed over the chosen prompt + completion
(every position but the first).

NLL terms (ORPO, SimPO's ``nll_weight``): TRL's NLL is ``nn.CrossEntropyLoss()`` over the chosen
half of the micro-batch, a mean over all its tokens. With ``nll="tokens"`` (default) example ``i``
carries ``-sum_i * B / sum_j len_j``, so the micro-batch's sum / ``B`` is exactly TRL's token mean.
With ``nll="example"`` it carries ``-sum_i / len_i`` (each completion weighs the same whatever its
length, invariant to how pairs are grouped into micro-batches).

TRL's logged metric names are the keys of ``LossOut.extra`` and of :func:`reward_metrics`; note the
TRL names are quirky: ORPO's ``log_odds_ratio`` is the mean of ``log sigmoid(log_odds)`` and its
``log_odds_chosen`` the mean of ``log_odds``; ``logps/*`` are sums for DPO and KTO, averages for
ORPO and SimPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
NLL_REDUCTIONS = ("tokens", "example")

# sequence_logps projects this many logit elements (rows x vocab) per chunk: 64 MiB of fp32.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PairLogps:
    """One micro-batch of B preference pairs: per-completion SUMS of token log-probabilities."""

    chosen: torch.Tensor  # [B] policy, summed over the chosen completion's tokens
    rejected: torch.Tensor  # [B]
    chosen_len: torch.Tensor  # [B] completion token counts (float or long)
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # [B] frozen reference sums (DPO); None for ORPO/SimPO
    ref_rejected: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.chosen.shape
        named = {
            "rejected": self.rejected,
            "chosen_len": self.chosen_len,
            "rejected_len": self.rejected_len,
            "ref_chosen": self.ref_chosen,
            "ref_rejected": self.ref_rejected,
        }
        wrong = [
            f"{name} {tuple(t.shape)}"
            for name, t in named.items()
            if t is not None and t.shape != shape
        ]
        if self.chosen.dim() != 1 or wrong:
            raise ValueError(
                f"PairLogps wants 1-D tensors of one shape; chosen is {tuple(shape)}"
                + (f", but {', '.join(wrong)}" if wrong else "")
            )
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("PairLogps: give both ref_chosen and ref_rejected, or neither")


@dataclass
class LossOut:
    """Per-example loss (not reduced) and the detached quantities TRL logs for it."""

    loss: torch.Tensor  # [B]
    rewards_chosen: torch.Tensor  # [B], detached; KTO: NaN where the example is undesirable
    rewards_rejected: torch.Tensor  # [B], detached; KTO: NaN where the example is desirable
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] each, detached, TRL's names
    desirable: torch.Tensor | None = None  # KTO only: [B] bool label; None for paired losses


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are lifted to fp32; fp32/fp64 are kept (TRL computes in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _avg(total: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Average log-probability per token (length clamped at 1, as TRL's IPO; equal for len >= 1)."""
    total = _fp32(total)
    return total / length.to(total.dtype).clamp(min=1.0)


def _check_beta(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _nll(total: torch.Tensor, length: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-example NLL whose mean over the micro-batch is TRL's ("tokens") or the mean of
    per-example token means ("example"); see the module docstring."""
    total = _fp32(total)
    length = length.to(total.dtype)
    if reduction == "tokens":
        return -total * (total.shape[0] / length.sum().clamp(min=1.0))
    if reduction == "example":
        return -total / length.clamp(min=1.0)
    raise ValueError(f"nll must be one of {NLL_REDUCTIONS}, got {reduction!r}")


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log sigmoid(z) - e log sigmoid(-z)`` (TRL's cDPO/CPO/SimPO form)."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def dpo_loss(
    lp: PairLogps, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> LossOut:
    """DPO per pair; ``loss_type`` is one of ``DPO_LOSS_TYPES`` (module docstring: formulas, and
    where ``label_smoothing`` departs from TRL 1.16's DPOTrainer). Needs the reference sums."""
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError("dpo_loss needs reference log-probs: PairLogps.ref_chosen/ref_rejected")
    _check_beta("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    _check_smoothing(label_smoothing)
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing applies to sigmoid and robust, not to {loss_type}")

    chosen_logratios = _fp32(lp.chosen) - _fp32(lp.ref_chosen)
    rejected_logratios = _fp32(lp.rejected) - _fp32(lp.ref_rejected)
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        loss = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    else:  # ipo, length-normalised as TRL 1.16
        chosen_avg = _avg(chosen_logratios, lp.chosen_len)
        rejected_avg = _avg(rejected_logratios, lp.rejected_len)
        loss = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return LossOut(
        loss=loss,
        rewards_chosen=beta * chosen_logratios.detach(),
        rewards_rejected=beta * rejected_logratios.detach(),
        extra={"logps/chosen": lp.chosen.detach(), "logps/rejected": lp.rejected.detach()},
    )


def simpo_loss(
    lp: PairLogps,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    nll: str = "tokens",
) -> LossOut:
    """SimPO per pair (TRL CPOTrainer ``loss_type="simpo"``, ``simpo_gamma=gamma``,
    ``cpo_alpha=nll_weight``); no reference. Pass sums: they are length-averaged here."""
    _check_beta("beta", beta)
    _check_smoothing(label_smoothing)
    if lp.ref_chosen is not None:
        raise ValueError("SimPO has no reference model; PairLogps.ref_chosen must be None")
    chosen = _avg(lp.chosen, lp.chosen_len)
    rejected = _avg(lp.rejected, lp.rejected_len)
    logits = (chosen - rejected) - gamma / beta
    loss = _smoothed_sigmoid(beta * logits, label_smoothing)
    extra = {"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
    if nll_weight:
        nll_loss = _nll(lp.chosen, lp.chosen_len, nll)
        loss = loss + nll_weight * nll_loss
        extra["nll_loss"] = nll_loss.detach()
    return LossOut(
        loss=loss,
        rewards_chosen=beta * chosen.detach(),
        rewards_rejected=beta * rejected.detach(),
        extra=extra,
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, stable on both sides of -ln 2 (TRL ORPO's ``log1mexp``)."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    lp: PairLogps,
    *,
    lam: float,
    nll: str = "tokens",
    nll_sum: torch.Tensor | None = None,
    nll_len: torch.Tensor | None = None,
) -> LossOut:
    """ORPO per pair: ``NLL_i - lam * log sigmoid(log_odds_i)`` (``lam`` is TRL's ``beta``).

    The NLL defaults to the chosen completion (``lp.chosen`` over ``lp.chosen_len``); TRL's runs
    over prompt + completion, which ``nll_sum``/``nll_len`` (both [B]) reproduce. ``nll`` picks how
    it is spread over the examples (module docstring, "NLL terms"); the default makes the mean of
    the returned losses equal TRL's ORPO loss."""
    _check_beta("lam", lam)
    if lp.ref_chosen is not None:
        raise ValueError("ORPO has no reference model; PairLogps.ref_chosen must be None")
    if (nll_sum is None) != (nll_len is None):
        raise ValueError("orpo_loss: give both nll_sum and nll_len, or neither")
    chosen = _avg(lp.chosen, lp.chosen_len)
    rejected = _avg(lp.rejected, lp.rejected_len)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    if nll_sum is None:
        nll_loss = _nll(lp.chosen, lp.chosen_len, nll)
    else:
        nll_loss = _nll(nll_sum, nll_len, nll)
    return LossOut(
        loss=nll_loss - lam * ratio,
        rewards_chosen=lam * chosen.detach(),
        rewards_rejected=lam * rejected.detach(),
        extra={
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
            "nll_loss": nll_loss.detach(),
            "log_odds_ratio": ratio.detach(),
            "log_odds_chosen": log_odds.detach(),
        },
    )


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 for one micro-batch, as TRL: the mean of ``policy_kl - ref_kl``
    (summed log-probs of the mismatched (prompt, other completion) pairs), detached, clamped at
    0."""
    return (_fp32(policy_kl) - _fp32(ref_kl)).mean().detach().clamp(min=0)


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOut:
    """KTO per example (module docstring). ``policy``/``reference``: [B] summed log-probs of each
    (prompt, completion); ``desirable``: [B] bool; ``kl``: z0 from :func:`kto_kl` (a scalar).

    ``rewards_chosen`` holds ``beta * (policy - reference)`` for desirable examples and NaN for the
    others; ``rewards_rejected`` the reverse; ``LossOut.desirable`` is the label."""
    _check_beta("beta", beta)
    if policy.dim() != 1 or reference.shape != policy.shape or desirable.shape != policy.shape:
        raise ValueError(
            "kto_loss wants policy, reference and desirable of one 1-D shape; got "
            f"{tuple(policy.shape)}, {tuple(reference.shape)}, {tuple(desirable.shape)}"
        )
    z0 = torch.as_tensor(kl, device=policy.device).detach().reshape(())
    logratios = _fp32(policy) - _fp32(reference)
    z0 = z0.to(logratios.dtype)
    good = desirable.bool()
    desirable_losses = 1 - torch.sigmoid(beta * (logratios - z0))
    undesirable_losses = 1 - torch.sigmoid(beta * (z0 - logratios))
    loss = torch.where(
        good, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses
    )
    rewards = beta * logratios.detach()
    nan = torch.full_like(rewards, float("nan"))
    logps = _fp32(policy).detach()
    return LossOut(
        loss=loss,
        rewards_chosen=torch.where(good, rewards, nan),
        rewards_rejected=torch.where(good, nan, rewards),
        extra={
            "logps/chosen": torch.where(good, logps, nan),
            "logps/rejected": torch.where(good, nan, logps),
            "kl": z0.expand(policy.shape[0]),
        },
        desirable=good,
    )


def reward_metrics(out: LossOut) -> dict[str, float]:
    """TRL's logged values for one batch: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (paired losses: the fraction with chosen reward > rejected, strictly), and
    the batch mean of each ``extra`` entry under its TRL name.

    KTO (``out.desirable`` set): ``*/chosen`` average over the desirable examples and ``*/rejected``
    over the undesirable ones, each absent when the batch has none; margins is the difference of
    the two means (as TRL), present only when both are; TRL logs no accuracy for KTO. Unlike TRL's
    ``nansum``, a NaN reward stays NaN here, so a NaN guard sees it."""
    if out.desirable is None:
        chosen, rejected = out.rewards_chosen, out.rewards_rejected
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
        }
        metrics.update({name: value.mean() for name, value in out.extra.items()})
        return {name: float(value) for name, value in metrics.items()}

    good = out.desirable
    masks = {"/chosen": good, "/rejected": ~good}
    metrics = {}
    values = {"rewards/chosen": out.rewards_chosen, "rewards/rejected": out.rewards_rejected}
    for name, value in {**values, **out.extra}.items():
        mask = next((m for suffix, m in masks.items() if name.endswith(suffix)), None)
        if mask is None:
            metrics[name] = float(value.mean())
        elif bool(mask.any()):
            metrics[name] = float(value[mask].mean())
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def sequence_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    n_segments: int,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-segment sum of ``log_softmax(logits)[target]``, in fp32: [n_segments].

    ``logits`` [N, V] are the LM head's outputs at the positions that predict ``targets`` [N] (any
    final-logit softcapping already applied); ``segment_ids`` [N] (long) names each position's
    completion. Rows are lifted to fp32 ``chunk_rows`` at a time (default: 2**24 logit elements,
    64 MiB) and scored by ``cross_entropy(reduction="none")``, so no fp32 copy of the whole [N, V]
    exists beyond the log-softmax that autograd keeps for backward (none without grad)."""
    if (
        logits.dim() != 2
        or targets.shape != (logits.shape[0],)
        or segment_ids.shape != targets.shape
    ):
        raise ValueError(
            f"sequence_logps wants logits [N, V], targets [N], segment_ids [N]; got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(segment_ids.shape)}"
        )
    n, vocab = logits.shape
    out = torch.zeros(n_segments, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out + logits.sum().float() * 0.0  # stays connected to the graph
    if bool((targets < 0).any()):
        raise ValueError(
            "sequence_logps: targets contain negative ids (ignored positions such as -100); "
            "pass only the positions that are scored"
        )
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    token_logps = [
        -F.cross_entropy(logits[i : i + rows].float(), targets[i : i + rows], reduction="none")
        for i in range(0, n, rows)
    ]
    return out.index_add(0, segment_ids, torch.cat(token_logps))
