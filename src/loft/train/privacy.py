"""Differentially private LoRA: DP-SGD through Opacus, on loft's own step loop.

Each optimizer step (Abadi et al., 2016, as Opacus implements it):

1. **Poisson sampling.** Every training example joins the step independently with probability
   ``q = global batch / N`` (global batch = ``micro_batch_size`` x ``grad_accum``), so a step's
   logical batch has a random size with mean the global batch. That is the sampling Opacus' RDP
   accountant assumes. The logical batch is cut into micro-batches of at most
   ``micro_batch_size`` (memory only: like Opacus' BatchMemoryManager, they are one step).
2. **Per-example gradients.** Opacus' GradSampleModule hooks PEFT's ``lora_A``/``lora_B``
   (``nn.Linear``) and computes each example's gradient of its own loss (mean cross-entropy
   over its trained tokens); rows are padded, never packed.
3. **Clipping and noise.** DPOptimizer clips each example's gradient to ``max_grad_norm``, sums,
   adds N(0, (noise_multiplier x max_grad_norm)^2), divides by the expected batch size and
   steps AdamW.
4. **Accounting.** Opacus' RDP accountant records (noise_multiplier, q) per step; the epsilon
   spent at ``delta`` is logged every step and written to the run summary and the lineage.

The sampling and the noise come from generators seeded by a secret drawn from the OS when the run
starts (kept in the run's checkpoints, never in its config, summary or card), so a resumed run
draws exactly what an uninterrupted one would; the accountant's history is restored with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loft.core.errors import ConfigError, LoftError, TrainingDiverged
from loft.core.specs import DEFAULT_DELTA, TrainConfig
from loft.data.packing import IGNORE_INDEX
from loft.train.loss import _causal_lm

ACCOUNTANT = "rdp"
SAMPLING = "poisson"


@contextlib.contextmanager
def _quiet():
    """Opacus' warnings that say nothing wrong here: the RDP search touching its largest order
    (the epsilon is then an upper bound, still valid), and the full backward hook firing on the
    first adapter layer, whose input needs no gradient (Opacus reads the output's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order is the (largest|smallest) alpha")
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        yield


def default_delta(n_examples: int) -> float:
    """1e-5, or 1/(10 N) when the training split has more than 10,000 examples."""
    return min(DEFAULT_DELTA, 1.0 / (10 * n_examples))


def _mix(secret: int, step: int, what: str) -> int:
    digest = hashlib.sha256(f"{secret}:{step}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << 63)


@dataclass(frozen=True)
class PoissonPlan:
    """The step plan under privacy: each example joins step ``s`` with probability
    ``sample_rate``, drawn from a generator seeded by (the run's secret, s): a pure function of
    the step, like loft's shuffled plan, so preflight and resume see the same batches."""

    n_examples: int
    micro_batch_size: int
    grad_accum: int
    secret: int
    total_steps: int

    @property
    def per_step(self) -> int:
        """The expected logical batch (the global batch)."""
        return self.micro_batch_size * self.grad_accum

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.per_step / self.n_examples)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.per_step)

    def sampled(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.secret, step, "sample"))
        keep = torch.rand(self.n_examples, generator=g) < self.sample_rate
        return keep.nonzero().flatten().tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        idx, mbs = self.sampled(step), self.micro_batch_size
        return [idx[i : i + mbs] for i in range(0, len(idx), mbs)]


def run_secret(run_dir: Path, resume: bool) -> int:
    """The secret seeding the sampling and the noise: the one the run's newest checkpoint
    holds when resuming, else a fresh one from the OS."""
    import json

    from loft.train.checkpoint import STATE_FILE, checkpoint_dirs

    if resume and (ckpts := checkpoint_dirs(run_dir)):
        state = json.loads((ckpts[-1] / STATE_FILE).read_text())
        saved = (state.get("privacy") or {}).get("secret")
        if not isinstance(saved, int):
            raise ConfigError(
                f"--resume: checkpoint {ckpts[-1]} holds no privacy state, and the config has "
                "privacy: it was not saved by a private run, so its epsilon cannot be continued.",
                hint="Resume with the config the run was started with, or start a new run.",
            )
        return saved
    return secrets.randbits(63)


@dataclass(frozen=True)
class PrivacyPlan:
    """The run's privacy parameters, resolved from the config and the data."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    target_epsilon: float | None
    n_examples: int
    expected_batch_size: int

    def epsilon_after(self, steps: int) -> float:
        from opacus.accountants import RDPAccountant

        if not steps:
            return 0.0
        acc = RDPAccountant()
        acc.history = [(self.noise_multiplier, self.sample_rate, steps)]
        with _quiet():
            return float(acc.get_epsilon(self.delta))


def resolve(config: TrainConfig, plan: PoissonPlan) -> PrivacyPlan:
    """Check what needs the data (delta < 1/N, a batch no larger than N, a reachable epsilon)
    and compute the noise multiplier for a target epsilon; ConfigError with the key path."""
    from opacus.accountants.utils import get_noise_multiplier

    p = config.privacy
    assert p is not None
    n = plan.n_examples
    delta = p.delta if p.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise ConfigError(
            f"privacy.delta {delta:g} is not below 1/N = {1.0 / n:.3g} (N = {n:,} training "
            "examples): with delta >= 1/N a mechanism that publishes one whole example "
            "satisfies the guarantee.",
            hint=f"Set privacy.delta below {1.0 / n:.3g} (e.g. {default_delta(n):.3g}), or remove "
            "it for the default.",
        )
    if plan.per_step > n:
        raise ConfigError(
            f"the global batch (training.micro_batch_size x training.grad_accum = "
            f"{plan.per_step}) is larger than the {n:,} training examples; Poisson sampling "
            "needs a sampling rate below 1.",
            hint="Lower training.micro_batch_size or training.grad_accum.",
        )
    q, steps = plan.sample_rate, plan.total_steps
    sigma = p.noise_multiplier
    if sigma is None:
        try:
            with _quiet():
                sigma = get_noise_multiplier(
                    target_epsilon=p.epsilon, target_delta=delta, sample_rate=q, steps=steps,
                    accountant=ACCOUNTANT, epsilon_tolerance=0.01,
                )  # fmt: skip
        except ValueError:
            raise ConfigError(
                f"privacy.epsilon {p.epsilon:g} cannot be reached at delta {delta:g} over "
                f"{steps} steps at sampling rate {q:.4g}, whatever the noise.",
                hint="Raise privacy.epsilon, or train fewer steps (training.max_steps/epochs).",
            ) from None
    return PrivacyPlan(
        noise_multiplier=float(sigma), sample_rate=q, steps=steps, delta=delta,
        max_grad_norm=p.max_grad_norm, target_epsilon=p.epsilon, n_examples=n,
        expected_batch_size=plan.per_step,
    )  # fmt: skip


def example_losses(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Each row's mean next-token cross-entropy over its trained positions (0 for a row with
    none), and how many rows have any: a padded batch, one example per row. Projects only the
    trained positions through the LM head, like ``loss_sum``."""
    lm = _causal_lm(model)
    out = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    counts = keep.sum(dim=1)
    logits = lm.get_output_embeddings()(hidden[keep]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    tok = F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero(as_tuple=True)[0]
    sums = torch.zeros(keep.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return sums / counts.clamp(min=1), int((counts > 0).sum())


def _module_problem(model: torch.nn.Module) -> str | None:
    """Why Opacus cannot give this model's trainable modules per-example gradients, naming the
    module; None when it can."""
    from opacus import GradSampleModule
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        return "; ".join(str(e) for e in errors[:3])
    for name, mod in trainable_modules(model):  # else Opacus falls back to functorch, unverified
        if type(mod) not in GradSampleModule.GRAD_SAMPLERS:
            return (
                f"{name} ({type(mod).__name__}) has trainable parameters and no per-example "
                "gradient sampler in Opacus"
            )
    lm = _causal_lm(model)
    embeddings = (("output", lm.get_output_embeddings()), ("input", lm.get_input_embeddings()))
    for where, mod in embeddings:
        names = [n for n, p in mod.named_parameters() if p.requires_grad] if mod else []
        if names:
            name = next(n for n, m in model.named_modules() if m is mod)
            return (
                f"{name} ({where} embeddings) has trainable parameters ({names[0]}): loft cannot "
                "attribute its gradient to examples; leave it out of lora.target_modules"
            )
    return None


class PrivateTraining:
    """Opacus' GradSampleModule, DPOptimizer and RDP accountant around a PEFT model and its
    AdamW; ``StepLoop`` calls :meth:`step` for each optimizer step."""

    def __init__(self, config: TrainConfig, model, optimizer, dp: PrivacyPlan, placement, secret):
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        if placement.grad_scaler:
            raise ConfigError(
                f"privacy with fp16 autocast ({placement.precision_note or 'this GPU'}): the "
                "gradient scaler would scale the per-example gradients before they are clipped.",
                hint="Set training.precision: fp32.",
            )
        if (problem := _module_problem(model)) is not None:
            raise ConfigError(f"privacy: {problem}.", hint="Use method lora on linear layers.")
        try:
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        except NotImplementedError as e:  # Opacus names the module it has no sampler for
            raise ConfigError(
                f"privacy: Opacus cannot compute per-example gradients here: {e}",
                hint="Target linear layers only (lora.target_modules: all-linear).",
            ) from None
        self.config, self.model, self.dp, self.secret = config, model, dp, secret
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.expected_batch_size,
            loss_reduction="mean",  # (sum of clipped + noise) / expected batch
        )
        self.accountant = RDPAccountant()
        self.last_loss = 0.0
        self._start = self._snapshot()

    # ------------------------------------------------------------------ state and reports

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the secret and the accountant's history."""
        return {"secret": self.secret, "history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        history = [tuple(h) for h in (state or {}).get("history", [])]
        if sum(int(h[2]) for h in history) != step:
            raise LoftError(
                f"the checkpoint's privacy accountant counts {sum(int(h[2]) for h in history)} "
                f"steps, but the checkpoint is at step {step}: its epsilon cannot be continued.",
                hint="Start a new run.",
            )
        self.accountant.history = history
        self._start = self._snapshot()

    def steps(self) -> int:
        return sum(int(h[2]) for h in self.accountant.history)

    def epsilon(self) -> float:
        if not self.steps():
            return 0.0
        with _quiet():
            return float(self.accountant.get_epsilon(self.dp.delta))

    def report(self) -> dict[str, Any]:
        """What the run summary, the tracker and the lineage record."""
        return {
            "epsilon": round(self.epsilon(), 6),
            "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "noise_multiplier": self.dp.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm,
            "sample_rate": self.dp.sample_rate,
            "expected_batch_size": self.dp.expected_batch_size,
            "n_examples": self.dp.n_examples,
            "steps": self.steps(),
            "accountant": ACCOUNTANT,
            "sampling": SAMPLING,
            "mechanism": "DP-SGD (Opacus, per-example clipping + Gaussian noise)",
            "unit": "example",
        }

    # ------------------------------------------------------------------ one step

    def step(self, loop: Any, step: int) -> tuple[float, int, dict[str, float]]:
        """One DP-SGD step over the Poisson-sampled logical batch of ``step``: each
        micro-batch's per-example gradients are clipped and summed; after the last, noise is
        added and AdamW steps. NonFinite (nothing stepped) when the loss is not finite."""
        from loft.train.distributed import unit_seed
        from loft.train.loop import NonFinite

        mbs = loop.plan.micro_batches(step)
        opt, seed = self.optimizer, self.config.training.seed
        total, n_examples, tokens = 0.0, 0, 0
        for j, idx in enumerate(mbs):
            b = loop.obj.batch("train", idx)
            torch.manual_seed(unit_seed(seed, step, j))  # dropout
            with loop._autocast(), _quiet():
                losses, n = example_losses(self.model, b)
                losses.sum().backward()
            self._check_grad_samples()
            total, n_examples = total + float(losses.detach().sum()), n_examples + n
            tokens += int(b["num_tokens"])
            if j < len(mbs) - 1:  # clip and accumulate; the step comes after the last
                opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        if not mbs:  # an empty Poisson batch: the step is noise alone, and it is accounted
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        loss = total / n_examples if n_examples else self.last_loss
        if not math.isfinite(loss):
            for p in self.params:
                p.grad_sample, p.summed_grad = None, None
            opt.zero_grad(set_to_none=True)
            raise NonFinite(loss)
        device = self.params[0].device
        opt.generator = torch.Generator(device=device).manual_seed(_mix(self.secret, step, "noise"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dp = self.dp
        self.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        self.last_loss = loss
        return loss, tokens, {"examples": float(n_examples), "epsilon": self.epsilon()}

    def _check_grad_samples(self) -> None:
        missing = [
            self.names[id(p)] for p in self.params if getattr(p, "grad_sample", None) is None
        ]
        if missing:
            raise LoftError(
                f"privacy: Opacus computed no per-example gradient for {len(missing)} trainable "
                f"parameters (first: {missing[0]}); clipping and noise would not cover them.",
                hint="Turn off training.gradient_checkpointing, and target linear layers only.",
            )

    # ------------------------------------------------------------------ the end

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in self.params]

    def finish(self, check_changed: bool = True) -> None:
        """Remove Opacus' hooks, and fail the run when the adapter did not change (the silent
        failure of opacus#820: a run that reports epsilon and trains nothing)."""
        self.gsm._close()
        now = self._snapshot()
        if check_changed and all(torch.equal(a, b) for a, b in zip(self._start, now, strict=True)):
            raise TrainingDiverged(
                f"privacy: no adapter weight changed in {self.steps()} DP-SGD steps; the result "
                "would equal its starting point (the failure of Opacus with PEFT reported in "
                "opacus#820).",
                hint="Check training.lr and privacy.max_grad_norm; this run is not registered.",
            )
