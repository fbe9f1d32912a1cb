"""Differentially private LoRA (loft.train.privacy): what the config refuses and why, the checks
that need the data, the modules Opacus cannot cover, Poisson sampling, and per-example clipping
against a manual per-example computation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from loft.core.config import validate_config
from loft.core.errors import ConfigError

pytestmark = pytest.mark.unit

OK = {"data": {"train": "x.jsonl", "packing": False}, "privacy": {"epsilon": 8}}


def _doc(**over) -> dict:
    doc = {k: dict(v) for k, v in OK.items()}
    for key, value in over.items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def _problems(doc: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(doc)
    return e.value.message


def test_a_valid_private_config_passes_and_privacy_is_off_by_default():
    assert validate_config(_doc()).privacy.epsilon == 8
    assert validate_config({"data": {"train": "x.jsonl"}}).privacy is None


@pytest.mark.parametrize(
    ("over", "key", "says"),
    [
        ({"data.packing": True}, "data.packing", "set data.packing: false"),
        ({"method": "full"}, "method", "loft's loss projects only the trained positions"),
        ({"method": "dora"}, "method", "DoRA's magnitude vectors"),
        ({"method": "qlora"}, "method", "bitsandbytes' 4-bit layers"),
        ({"training.distributed.strategy": "ddp"}, "training.distributed.strategy", "one process"),
        ({"training.gradient_checkpointing": True}, "training.gradient_checkpointing", "hooks"),
        ({"training.precision": "fp16"}, "training.precision", "before they are clipped"),
        ({"privacy.noise_multiplier": 1.0}, "privacy.noise_multiplier", "not both"),
        ({"privacy": {"delta": 1e-6}}, "privacy", "give privacy.epsilon"),
    ],
)
def test_each_combination_privacy_cannot_run_is_refused_with_its_reason(over, key, says):
    msg = _problems(_doc(**over))
    line = next(ln for ln in msg.splitlines() if ln.strip().startswith(f"{key}:"))
    assert says in line, msg


def test_every_privacy_problem_is_reported_at_once():
    doc = {
        "method": "dora",
        "objective": "dpo",
        "data": {"train": "x.jsonl", "format": "preference"},
        "privacy": {"epsilon": 1, "noise_multiplier": 1, "max_grad_norm": 0},
    }
    msg = _problems(doc)
    for key in ("method:", "objective:", "data.packing:", "privacy.noise_multiplier:"):
        assert key in msg, msg
    assert "privacy.max_grad_norm: got 0" in msg  # a field problem beside the combinations


def _plan(n: int, mbs: int = 4, accum: int = 2, steps: int = 10, secret: int = 7):
    from loft.train.privacy import PoissonPlan

    return PoissonPlan(n, mbs, accum, secret, steps)


def test_delta_must_be_below_one_over_n_and_defaults_below_it():
    from loft.train.privacy import default_delta, resolve

    cfg = validate_config(_doc(**{"privacy.delta": 0.01}))
    with pytest.raises(ConfigError) as e:
        resolve(cfg, _plan(200))
    assert "privacy.delta 0.01 is not below 1/N = 0.005 (N = 200" in e.value.message
    assert default_delta(200) == 1e-5 and default_delta(50_000) == pytest.approx(2e-6)
    given = validate_config(_doc(**{"privacy": {"noise_multiplier": 1.0}}))
    assert resolve(given, _plan(200)).delta == 1e-5


def test_an_unreachable_epsilon_and_a_batch_larger_than_the_data_are_refused():
    from loft.train.privacy import resolve

    with pytest.raises(ConfigError) as e:
        resolve(validate_config(_doc(**{"privacy.epsilon": 1e-6})), _plan(100, steps=500))
    assert "cannot be reached" in e.value.message
    with pytest.raises(ConfigError) as e:
        resolve(validate_config(_doc()), _plan(6))
    assert "global batch" in e.value.message and "larger than the 6" in e.value.message


def test_the_noise_for_a_target_epsilon_spends_it_by_opacus_accountant():
    from opacus.accountants import RDPAccountant

    from loft.train.privacy import resolve

    dp = resolve(validate_config(_doc()), _plan(1000, steps=200))
    assert dp.sample_rate == 8 / 1000 and dp.steps == 200
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)]
    eps = acc.get_epsilon(dp.delta)
    assert 8 - 0.011 <= eps <= 8  # the search stops within its tolerance, never above


def test_poisson_sampling_is_a_pure_function_of_the_secret_and_the_step():
    plan = _plan(2000, mbs=8, accum=4, steps=200)
    sizes = [len(plan.sampled(s)) for s in range(200)]
    assert plan.sampled(3) == plan.sampled(3) != plan.sampled(4)
    assert plan.sampled(3) != _plan(2000, mbs=8, accum=4, secret=8).sampled(3)
    assert len(set(sizes)) > 5  # the logical batch size varies (Binomial(N, q))
    assert abs(sum(sizes) / len(sizes) - 32) < 2  # with mean the global batch
    mbs = plan.micro_batches(5)
    assert [i for mb in mbs for i in mb] == plan.sampled(5) and max(map(len, mbs)) <= 8


def _peft(tiny_model, targets):
    from peft import LoraConfig, get_peft_model

    from loft.models import load_causal_lm, resolve_model

    torch.manual_seed(0)
    model = load_causal_lm(resolve_model(str(tiny_model)), dtype=torch.float32)
    model.config.use_cache = False
    cfg = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, init_lora_weights=False
    )
    return get_peft_model(model, cfg)


@pytest.mark.parametrize(
    ("targets", "names"),
    [(["embed_tokens"], "embed_tokens"), (["q_proj", "lm_head"], "lm_head")],
)
def test_modules_opacus_cannot_give_per_example_gradients_are_named(tiny_model, targets, names):
    from loft.train.privacy import _module_problem

    problem = _module_problem(_peft(tiny_model, targets))
    assert problem is not None and names in problem
    assert _module_problem(_peft(tiny_model, ["q_proj", "v_proj"])) is None


def test_one_step_is_the_clipped_per_example_mean_opacus_promises(tiny_model):
    """SGD at lr 1 and no noise: the update is exactly -(sum of each example's gradient clipped
    to C) / expected batch, which a manual per-example backward pass reproduces."""
    from loft.data.packing import collate
    from loft.train.privacy import PoissonPlan, PrivacyPlan, PrivateTraining, example_losses

    model = _peft(tiny_model, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (7, 11, 5, 9, 12, 6):
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    clip = 0.05
    plan = PoissonPlan(len(rows), 2, 2, secret=11, total_steps=1)
    idx = plan.sampled(0)
    assert len(idx) >= 2  # this secret samples several examples at step 0

    def batch(split, which):
        return collate([rows[i] for i in which], packing=False, pad_token_id=0)

    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for i in idx:  # each example alone, no hooks needed
        model.zero_grad()
        losses, _ = example_losses(model, batch("train", [i]))
        losses.sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = math.sqrt(sum(float(gr.pow(2).sum()) for gr in grads))
        norms.append(norm)
        for e, gr in zip(expected, grads, strict=True):
            e += gr * min(1.0, clip / (norm + 1e-6))
    model.zero_grad()
    assert min(norms) > clip  # every example is clipped: the bound is what shapes the step
    dp = PrivacyPlan(0.0, plan.sample_rate, 1, 1e-5, clip, None, len(rows), plan.per_step)
    opt = torch.optim.SGD(params, lr=1.0)
    cfg = validate_config(_doc(**{"training.seed": 0}))
    placement = SimpleNamespace(grad_scaler=False)
    private = PrivateTraining(cfg, model, opt, dp, placement, secret=11)
    before = [p.detach().clone() for p in params]
    loop = SimpleNamespace(plan=plan, obj=SimpleNamespace(batch=batch), _autocast=nullcontext)
    loss, tokens, metrics = private.step(loop, 0)
    assert metrics["examples"] == len(idx) and tokens > 0
    step_norm = 0.0
    for p, b, e in zip(params, before, expected, strict=True):
        update = b - p.detach()
        torch.testing.assert_close(update, e / plan.per_step, rtol=1e-4, atol=1e-7)
        step_norm += float(update.pow(2).sum())
    assert math.sqrt(step_norm) <= len(idx) * clip / plan.per_step + 1e-6
    assert private.steps() == 1  # the step was accounted
    # an empty Poisson batch still steps (noise alone, here none) and is accounted
    empty = SimpleNamespace(plan=SimpleNamespace(micro_batches=lambda step: []), obj=loop.obj)
    after = [p.detach().clone() for p in params]
    _, tokens, metrics = private.step(SimpleNamespace(**vars(empty), _autocast=nullcontext), 1)
    assert tokens == 0 and metrics["examples"] == 0 and private.steps() == 2
    assert all(torch.equal(a, p.detach()) for a, p in zip(after, params, strict=True))
