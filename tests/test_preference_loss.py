"""loft's preference losses equal TRL 1.16's on the same tensors.

TRL's losses live inside trainer methods, so each comparison builds a bare trainer
(``object.__new__``) with only the attributes its loss path reads, and a stub model: for DPO and KTO
one that returns preset per-token log-probs the way TRL's fused LM head does (zero outside the
completion), for ORPO and SimPO one that returns preset logits. Per-example values are compared by
running TRL on one pair at a time; batch means and logged metrics on the whole batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loft.train.preference_loss import (
    LossOut,
    PairLogps,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    reward_metrics,
    sequence_logps,
    simpo_loss,
)

RTOL = 1e-5  # the brief allows 1e-3; the formulas are the same, so only fp32 rounding differs
ATOL = 1e-6
CPU = torch.device("cpu")
ACCELERATOR = SimpleNamespace(
    device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
)


def close(actual: torch.Tensor | float, expected: torch.Tensor | float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        rtol=RTOL,
        atol=ATOL,
    )


def random_pairs(b: int, seed: int, *, extreme: bool = False, ref: bool = True) -> PairLogps:
    """B pairs of summed log-probs; ``extreme`` adds 1-token completions, log-ratios of +-500, and
    average log-probs near 0 and near -40 (ORPO's log1mexp on both sides of -ln 2)."""
    g = torch.Generator().manual_seed(seed)
    chosen_len = torch.randint(1, 48, (b,), generator=g)
    rejected_len = torch.randint(1, 48, (b,), generator=g)
    chosen = -torch.rand(b, generator=g) * 3 * chosen_len
    rejected = -torch.rand(b, generator=g) * 3 * rejected_len
    if extreme:
        chosen_len[0], chosen[0] = 1, -1e-4
        rejected_len[1], rejected[1] = 1, -40.0
        chosen[2], rejected[2] = -3e-3 * chosen_len[2], -35.0 * rejected_len[2]
        rejected[3] = -1e-5 * rejected_len[3]
    ref_chosen = ref_rejected = None
    if ref:
        ref_chosen = chosen + torch.randn(b, generator=g) * 4
        ref_rejected = rejected + torch.randn(b, generator=g) * 4
        if extreme:
            ref_chosen[0] = chosen[0] - 500.0
            ref_rejected[1] = rejected[1] + 500.0
    return PairLogps(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected)


def one_pair(lp: PairLogps, i: int) -> PairLogps:
    pick = [lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len, lp.ref_chosen, lp.ref_rejected]
    return PairLogps(*(None if t is None else t[i : i + 1] for t in pick))


class FusedStub(torch.nn.Module):
    """A model as TRL's ``add_fused_lm_head`` patches it: returns preset per-token log-probs,
    picked by the first input id (1: the main sequences, 2: KTO's mismatched KL sequences)."""

    def __init__(self, per_token: dict[int, torch.Tensor]):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        log_probs = self.per_token[int(input_ids[0, 0])]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=zeros,
            aux_loss=None,
        )


def fused_rows(key: int, sums: torch.Tensor, lens: torch.Tensor):
    """input_ids/attention_mask/completion_mask for rows of one prompt token + ``lens`` completion
    tokens, and per-token log-probs (TRL's shifted layout) whose row sums are ``sums``."""
    rows, width = len(sums), int(lens.max()) + 1
    input_ids = torch.full((rows, width), 5)
    input_ids[:, 0] = key
    positions = torch.arange(width)
    completion_mask = ((positions >= 1) & (positions <= lens[:, None])).long()
    attention_mask = (positions <= lens[:, None]).long()
    log_probs = torch.zeros(rows, width - 1)
    log_probs[:, 0] = sums  # the first completion token carries the whole sum
    return input_ids, attention_mask, completion_mask, log_probs


def bare(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.__dict__.update(
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )
    return trainer


def trl_dpo(lp: PairLogps, *, beta: float, loss_type: str, label_smoothing: float = 0.0):
    """TRL DPOTrainer's loss (the batch mean) and its logged metrics on these sums."""
    from trl import DPOTrainer

    sums = torch.cat([lp.chosen, lp.rejected])
    lens = torch.cat([lp.chosen_len, lp.rejected_len])
    input_ids, attention_mask, completion_mask, log_probs = fused_rows(1, sums, lens)
    model = FusedStub({1: log_probs})
    trainer = bare(
        DPOTrainer,
        model=model,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": lp.ref_chosen,
        "ref_rejected_logps": lp.ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_kto(
    policy, reference, desirable, policy_kl, ref_kl, *, beta, desirable_weight, undesirable_weight
):
    """TRL KTOTrainer's loss (the batch mean) and its logged metrics; completions of 1..5 tokens."""
    from trl import KTOTrainer

    lens = torch.arange(len(policy)) % 5 + 1
    input_ids, attention_mask, completion_mask, log_probs = fused_rows(1, policy, lens)
    kl_ids, kl_attention, kl_completion, kl_log_probs = fused_rows(2, policy_kl, lens.flip(0))
    model = FusedStub({1: log_probs, 2: kl_log_probs})
    trainer = bare(
        KTOTrainer,
        model=model,
        beta=beta,
        loss_type="kto",
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": desirable,
        "ref_logps": reference,
        "ref_KL_logps": ref_kl,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_cpo_loss(chosen, rejected, *, beta, loss_type, gamma=0.0, label_smoothing=0.0):
    """TRL CPOTrainer.cpo_loss on (average, for simpo) log-probs: per-pair losses and rewards."""
    from trl.experimental.cpo import CPOTrainer

    trainer = bare(
        CPOTrainer,
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
    )
    return trainer.cpo_loss(chosen, rejected)


def trl_odds_ratio_loss(chosen_avg, rejected_avg, *, lam):
    from trl.experimental.orpo import ORPOTrainer

    return bare(ORPOTrainer, beta=lam).odds_ratio_loss(chosen_avg, rejected_avg)


# ---- preset logits, for the paths where TRL computes its own NLL (ORPO, SimPO with cpo_alpha)

VOCAB = 11
PAD = 0


class LogitsStub(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.logits)


def logits_batch(b: int, seed: int, *, prompt_max: int):
    """A padded TRL-style pair batch (chosen_*/rejected_* input_ids, attention_mask, labels with
    the prompt and padding at -100) and random logits for its concatenation [2B, T, V]."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    width = 0
    for side in ("chosen", "rejected"):
        prompt = torch.randint(1, prompt_max + 1, (b,), generator=g)
        completion = torch.randint(1, 9, (b,), generator=g)
        lengths = prompt + completion
        w = int(lengths.max())
        positions = torch.arange(w)
        attention = (positions < lengths[:, None]).long()
        ids = torch.randint(1, VOCAB, (b, w), generator=g) * attention
        labels = ids.masked_fill((positions < prompt[:, None]) | (attention == 0), -100)
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_attention_mask": attention,
                f"{side}_labels": labels,
            }
        )
        width = max(width, w)
    logits = torch.randn(2 * b, width, VOCAB, generator=g) * 3
    return batch, logits


def padded(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def loft_sums(logits: torch.Tensor, labels: torch.Tensor):
    """Our path: score only the positions whose next label is kept, sum per row."""
    keep = labels[:, 1:] != -100
    rows = torch.arange(labels.shape[0])[:, None].expand_as(keep)
    sums = sequence_logps(logits[:, :-1][keep], labels[:, 1:][keep], rows[keep], labels.shape[0])
    return sums, keep.sum(1)


def pair_sums(batch, logits):
    """PairLogps from a logits batch (completion positions), and the chosen rows' full-sequence
    (prompt + completion, TRL ORPO's NLL) sums and counts."""
    b = batch["chosen_labels"].shape[0]
    width = logits.shape[1]
    labels = torch.cat([padded(batch[f"{s}_labels"], width, -100) for s in ("chosen", "rejected")])
    sums, lens = loft_sums(logits, labels)
    chosen_ids = padded(batch["chosen_input_ids"], width, PAD)
    chosen_attention = padded(batch["chosen_attention_mask"], width, 0)
    full, full_len = loft_sums(logits[:b], chosen_ids.masked_fill(chosen_attention == 0, -100))
    return PairLogps(sums[:b], sums[b:], lens[:b], lens[b:]), full, full_len


def trl_batch_loss(cls, logits, batch, **attrs):
    trainer = bare(cls, is_encoder_decoder=False, **attrs)
    return trainer.get_batch_loss_metrics(LogitsStub(logits), batch)


# ---- DPO


@pytest.mark.unit
@pytest.mark.parametrize("extreme", [False, True], ids=["typical", "extreme"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_matches_trl_per_pair_and_batch(loss_type: str, extreme: bool) -> None:
    beta, smoothing = 0.1, (0.2 if loss_type == "robust" else 0.0)
    lp = random_pairs(6, seed=11, extreme=extreme)
    out = dpo_loss(lp, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    per_pair = [
        trl_dpo(one_pair(lp, i), beta=beta, loss_type=loss_type, label_smoothing=smoothing)[0]
        for i in range(6)
    ]
    close(out.loss, torch.stack(per_pair))
    batch_loss, metrics = trl_dpo(lp, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    close(out.loss.mean(), batch_loss)
    ours = reward_metrics(out)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        close(ours[name], metrics[name])


@pytest.mark.unit
def test_dpo_label_smoothing_is_cdpo_as_trl_cpo_and_trl_dpo_ignores_it() -> None:
    """sigmoid + label_smoothing is conservative DPO; TRL 1.16 keeps that formula in CPO's sigmoid
    (fed log-ratios here), while its DPOTrainer ignores label_smoothing for sigmoid."""
    lp = random_pairs(7, seed=3, extreme=True)
    beta, smoothing = 0.25, 0.15
    out = dpo_loss(lp, beta=beta, label_smoothing=smoothing)
    cpo, _, _ = trl_cpo_loss(
        lp.chosen - lp.ref_chosen,
        lp.rejected - lp.ref_rejected,
        beta=beta,
        loss_type="sigmoid",
        label_smoothing=smoothing,
    )
    close(out.loss, cpo)
    plain = dpo_loss(lp, beta=beta).loss.mean()
    close(trl_dpo(lp, beta=beta, loss_type="sigmoid", label_smoothing=smoothing)[0], plain)
    assert not torch.allclose(out.loss.mean(), plain)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("sigmoid", 0.1, math.log(2)),
        ("robust", 0.1, math.log(2)),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, (1 / (2 * 0.1)) ** 2),
    ],
)
def test_dpo_at_policy_equal_reference(loss_type: str, smoothing: float, expected: float) -> None:
    """The first step of DPO from its reference: ln 2 for the sigmoid family, zero rewards."""
    lp = random_pairs(5, seed=8)
    same = PairLogps(lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len, lp.chosen, lp.rejected)
    out = dpo_loss(same, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    close(out.loss, torch.full((5,), expected))
    metrics = reward_metrics(out)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # TRL counts strict >, so ties are not accurate


@pytest.mark.unit
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_gradient_reaches_policy_only(loss_type: str) -> None:
    lp = random_pairs(4, seed=5)
    lp.chosen.requires_grad_(True)
    lp.rejected.requires_grad_(True)
    smoothing = 0.1 if loss_type == "robust" else 0.0
    # a margin under 1/beta keeps the hinge active
    out = dpo_loss(lp, beta=0.01, loss_type=loss_type, label_smoothing=smoothing)
    out.loss.sum().backward()
    assert (lp.chosen.grad < 0).all() and (lp.rejected.grad > 0).all()
    assert not out.rewards_chosen.requires_grad and not out.rewards_rejected.requires_grad
    assert all(not v.requires_grad for v in out.extra.values())


@pytest.mark.unit
def test_dpo_refuses_what_it_cannot_compute() -> None:
    lp = random_pairs(4, seed=1)
    no_ref = PairLogps(lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(no_ref, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(lp, beta=0.1, loss_type="kto_pair")
    with pytest.raises(ValueError, match="not to hinge"):
        dpo_loss(lp, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(lp, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(lp, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"rejected_len \(3,\)"):
        PairLogps(lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len[:3])


# ---- KTO


def kto_inputs(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = 7
    policy = -torch.rand(b, generator=g) * 60
    reference = policy + torch.randn(b, generator=g) * 5
    reference[0] = policy[0] + 400.0  # extreme log-ratio
    desirable = {
        "mixed": torch.tensor([True, False, True, True, False, False, True]),
        "all_desirable": torch.ones(b, dtype=torch.bool),
        "all_undesirable": torch.zeros(b, dtype=torch.bool),
    }[kind]
    policy_kl = -torch.rand(b, generator=g) * 60
    ref_kl = policy_kl - torch.rand(b, generator=g) * 2  # positive mean: z0 > 0
    return policy, reference, desirable, policy_kl, ref_kl


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["mixed", "all_desirable", "all_undesirable"])
def test_kto_matches_trl(kind: str) -> None:
    policy, reference, desirable, policy_kl, ref_kl = kto_inputs(kind, seed=4)
    weights = {"desirable_weight": 1.0, "undesirable_weight": 1.33}
    z0 = kto_kl(policy_kl, ref_kl)
    assert z0 > 0
    out = kto_loss(policy, reference, desirable, z0, beta=0.1, **weights)
    batch_loss, metrics = trl_kto(
        policy, reference, desirable, policy_kl, ref_kl, beta=0.1, **weights
    )
    close(out.loss.mean(), batch_loss)
    close(z0, metrics["kl"])
    ours = reward_metrics(out)
    trl_names = {k for k in metrics if k.startswith(("rewards/", "logps/"))} | {"kl"}
    assert set(ours) == trl_names
    for name in trl_names:
        close(ours[name], metrics[name])
    # per example: TRL on one example whose single mismatched pair gives the same z0
    for i in range(len(policy)):
        one, _ = trl_kto(
            policy[i : i + 1],
            reference[i : i + 1],
            desirable[i : i + 1],
            z0.reshape(1),
            torch.zeros(1),
            beta=0.1,
            **weights,
        )
        close(out.loss[i], one)


@pytest.mark.unit
def test_kto_kl_is_clamped_at_zero_as_trl() -> None:
    policy, reference, desirable, policy_kl, _ = kto_inputs("mixed", seed=9)
    ref_kl = policy_kl + 3.0  # negative mean KL
    z0 = kto_kl(policy_kl, ref_kl)
    assert z0 == 0.0
    batch_loss, metrics = trl_kto(
        policy,
        reference,
        desirable,
        policy_kl,
        ref_kl,
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=1.0,
    )
    assert metrics["kl"] == 0.0
    close(kto_loss(policy, reference, desirable, z0, beta=0.5).loss.mean(), batch_loss)


@pytest.mark.unit
def test_kto_rewards_convention_and_gradient() -> None:
    policy, reference, desirable, policy_kl, ref_kl = kto_inputs("mixed", seed=2)
    policy.requires_grad_(True)
    policy_kl.requires_grad_(True)
    z0 = (policy_kl - ref_kl).mean()  # not detached: kto_loss must detach it, as TRL's z0 is
    out = kto_loss(policy, reference, desirable, z0, beta=0.1)
    assert torch.isnan(out.rewards_chosen[~desirable]).all()
    assert torch.isnan(out.rewards_rejected[desirable]).all()
    assert not torch.isnan(out.rewards_chosen[desirable]).any()
    out.loss.sum().backward()
    assert (policy.grad[desirable] < 0).all() and (policy.grad[~desirable] > 0).all()
    assert policy_kl.grad is None


# ---- SimPO (TRL CPOTrainer loss_type="simpo")


@pytest.mark.unit
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("extreme", [False, True], ids=["typical", "extreme"])
def test_simpo_matches_trl_cpo_loss(extreme: bool, smoothing: float) -> None:
    lp = random_pairs(8, seed=21, extreme=extreme, ref=False)
    beta, gamma = 2.0, 0.5
    out = simpo_loss(lp, beta=beta, gamma=gamma, label_smoothing=smoothing)
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss(
        lp.chosen / lp.chosen_len,
        lp.rejected / lp.rejected_len,
        beta=beta,
        loss_type="simpo",
        gamma=gamma,
        label_smoothing=smoothing,
    )
    close(out.loss, losses)
    close(out.rewards_chosen, chosen_rewards)
    close(out.rewards_rejected, rejected_rewards)
    assert "nll_loss" not in out.extra


@pytest.mark.unit
@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_simpo_on_logits_matches_trl_with_cpo_alpha(nll_weight: float) -> None:
    """End to end from the same logits: sequence_logps + simpo_loss vs TRL's
    get_batch_loss_metrics (which adds cpo_alpha x the chosen completions' token-mean NLL)."""
    from trl.experimental.cpo import CPOTrainer

    batch, logits = logits_batch(5, seed=6, prompt_max=4)
    lp, _, _ = pair_sums(batch, logits)
    out = simpo_loss(lp, beta=2.0, gamma=0.8, nll_weight=nll_weight)
    loss, metrics = trl_batch_loss(
        CPOTrainer,
        logits,
        batch,
        alpha=0.0,
        beta=2.0,
        loss_type="simpo",
        simpo_gamma=0.8,
        label_smoothing=0.0,
        cpo_alpha=nll_weight,
        pad_token_id=PAD,
    )
    close(out.loss.mean(), loss)
    ours = reward_metrics(out)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(ours[name], metrics[name])
    close(ours["logps/chosen"], metrics["logps/chosen"])
    close(ours.get("nll_loss", 0.0), metrics["nll_loss"])


# ---- ORPO


@pytest.mark.unit
@pytest.mark.parametrize("extreme", [False, True], ids=["typical", "extreme"])
def test_orpo_odds_ratio_matches_trl(extreme: bool) -> None:
    lp = random_pairs(8, seed=31, extreme=extreme, ref=False)
    lam = 0.1
    out = orpo_loss(lp, lam=lam)
    losses, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = trl_odds_ratio_loss(
        lp.chosen / lp.chosen_len, lp.rejected / lp.rejected_len, lam=lam
    )
    # TRL's ORPO loss is nll - mean(losses): the odds-ratio part of ours is -losses per pair
    close(out.loss - out.extra["nll_loss"], -losses)
    close(out.rewards_chosen, chosen_rewards)
    close(out.rewards_rejected, rejected_rewards)
    close(out.extra["log_odds_ratio"].mean(), mean_ratio)
    close(out.extra["log_odds_chosen"].mean(), mean_log_odds)
    assert torch.isfinite(out.loss).all()


@pytest.mark.unit
@pytest.mark.parametrize("prompt_max", [1, 5], ids=["one_token_prompts", "prompts_in_trl_nll"])
def test_orpo_on_logits_matches_trl_total_loss(prompt_max: int) -> None:
    """End to end from the same logits. TRL's NLL covers prompt + completion: with one-token
    prompts (never a label) our completion-only default equals it; with longer prompts the
    prompt-inclusive sums passed as nll_sum/nll_len do."""
    from trl.experimental.orpo import ORPOTrainer

    batch, logits = logits_batch(6, seed=12, prompt_max=prompt_max)
    lp, full, full_len = pair_sums(batch, logits)
    nll = {} if prompt_max == 1 else {"nll_sum": full, "nll_len": full_len}
    out = orpo_loss(lp, lam=0.2, **nll)
    loss, metrics = trl_batch_loss(ORPOTrainer, logits, batch, beta=0.2, padding_value=PAD)
    close(out.loss.mean(), loss)
    ours = reward_metrics(out)
    assert set(ours) == {k for k in metrics if not k.startswith("logits/")}
    for name in ours:
        close(ours[name], metrics[name])
    if prompt_max > 1:  # the default (completion-only NLL) is a different, documented quantity
        assert not torch.allclose(orpo_loss(lp, lam=0.2).loss.mean(), loss)


@pytest.mark.unit
def test_orpo_nll_reductions_and_gradient() -> None:
    lp = random_pairs(5, seed=40, ref=False)
    lp.chosen.requires_grad_(True)
    tokens = orpo_loss(lp, lam=0.1)
    example = orpo_loss(lp, lam=0.1, nll="example")
    close(tokens.extra["nll_loss"].mean(), -lp.chosen.sum() / lp.chosen_len.sum())
    close(example.extra["nll_loss"], -lp.chosen / lp.chosen_len)
    tokens.loss.sum().backward()
    assert (lp.chosen.grad < 0).all()
    with pytest.raises(ValueError, match="nll must be one of"):
        orpo_loss(lp, lam=0.1, nll="sum")
    with pytest.raises(ValueError, match="no reference"):
        orpo_loss(random_pairs(4, seed=1), lam=0.1)


# ---- sequence_logps


def naive_sequence_logps(logits, targets, segment_ids, n):
    per_token = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    return torch.stack([per_token[segment_ids == s].sum() for s in range(n)])


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_sequence_logps_matches_naive(dtype: torch.dtype, chunk_rows: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    n, vocab, segments = 50, 97, 6
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    logits[3, 5] = 80.0  # a confident token
    targets = torch.randint(0, vocab, (n,), generator=g)
    segment_ids = torch.randint(0, segments - 1, (n,), generator=g)  # the last segment is empty
    ours = sequence_logps(
        logits.requires_grad_(True), targets, segment_ids, segments, chunk_rows=chunk_rows
    )
    assert ours.dtype == torch.float32 and ours[-1] == 0.0
    expected = naive_sequence_logps(logits.detach().float(), targets, segment_ids, segments)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-4)
    weights = torch.randn(segments, generator=g)
    (ours * weights).sum().backward()
    reference = logits.detach().float().requires_grad_(True)
    (naive_sequence_logps(reference, targets, segment_ids, segments) * weights).sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad.float(), rtol=1e-2, atol=1e-2)


class LargestFp32(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces (views count by their own size)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.unit
def test_sequence_logps_is_memory_light() -> None:
    """From bf16 logits: no op makes an fp32 tensor larger than one chunk, and autograd keeps one
    fp32 [N, V] in all (the log-softmax), never a second copy."""
    n, vocab, chunk = 64, 1000, 16
    logits = torch.randn(n, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets, segments = torch.randint(0, vocab, (n,)), torch.arange(n) % 4
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), LargestFp32() as mode:
        sequence_logps(logits, targets, segments, 4, chunk_rows=chunk)
    assert mode.largest == chunk * vocab
    assert n * vocab * 4 <= sum(saved.values()) <= n * vocab * 4 + 64 * 1024


@pytest.mark.unit
def test_sequence_logps_refuses_ignored_targets() -> None:
    targets = torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match="-100"):
        sequence_logps(torch.randn(3, 5), targets, torch.zeros(3, dtype=torch.long), 1)


@pytest.mark.unit
def test_reward_metrics_kto_omits_what_the_batch_lacks() -> None:
    policy, reference, _, policy_kl, ref_kl = kto_inputs("all_undesirable", seed=4)
    out: LossOut = kto_loss(
        policy, reference, torch.zeros(7, dtype=torch.bool), kto_kl(policy_kl, ref_kl), beta=0.1
    )
    metrics = reward_metrics(out)
    assert set(metrics) == {"rewards/rejected", "logps/rejected", "kl"}
