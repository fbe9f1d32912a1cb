"""The step loop every objective trains through: one optimizer step over a step plan's
micro-batches (on one process, or this rank's share of them), evaluation, checkpoints, and the
stop, divergence and pruning exits. ``sft.train`` builds it; the objectives supply batches and
losses."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from loft.core.errors import RunPruned, TrainingDiverged, TrainingInterrupted
from loft.train import distributed
from loft.train.checkpoint import save_checkpoint
from loft.train.distributed import Ranks


def _add(sums: dict[str, tuple[float, float]], more: dict[str, tuple[float, float]]) -> None:
    for k, (v, n) in more.items():
        a, m = sums.get(k, (0.0, 0.0))
        sums[k] = (a + v, m + n)


class StepLoop:
    def __init__(
        self, config, model, optimizer, scheduler, plan, placement, objective, tracker, ranks=None
    ):
        self.config, self.model, self.opt, self.sched = config, model, optimizer, scheduler
        self.plan, self.placement, self.obj, self.tracker = plan, placement, objective, tracker
        self.ranks: Ranks = ranks or Ranks()  # this process's share (loft.train.distributed)
        self.layers: list[torch.nn.Module] = []  # FSDP-sharded layers, under fsdp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.session_tokens = 0
        self.session_s = 0.0
        self.steps_run = 0  # optimizer steps taken by this process
        self.on_eval: Callable[[int, float], None] | None = None  # e.g. a study's pruner
        self.private = None  # loft.train.privacy.PrivateTraining: DP-SGD steps instead
        # fp16 autocast (GPUs without native bf16): scale the loss so small gradients survive
        self.scaler = torch.amp.GradScaler(placement.device) if placement.grad_scaler else None

    def _autocast(self):
        dtype = self.placement.autocast_dtype
        if dtype is not None:
            return torch.autocast(self.placement.device, dtype=dtype)
        return contextlib.nullcontext()

    def step(self, step: int) -> tuple[float, int, dict[str, float]]:
        """One optimizer step over grad_accum micro-batches; the loss is normalised over the
        whole step's count (label tokens for SFT, pairs or examples for preference objectives),
        so micro-batching does not change the gradient. A NaN or infinite loss takes no step.

        With several ranks each runs its share of the step's micro-batches; the count, the
        gradients and the loss are summed over ranks (loft.train.distributed), so every rank
        sees the single-process step. Each unit of work seeds its own dropout.

        Under privacy the step is DP-SGD over the step's Poisson-sampled examples
        (loft.train.privacy): per-example clipping, noise, accounting."""
        if self.private is not None:
            out = self.private.step(self, step)
            self.sched.step()
            return out
        r, seed = self.ranks, self.config.training.seed
        mbs = self.plan.micro_batches(step)
        mine = distributed.share(mbs, r.rank, r.world)
        work = [(j, self.obj.batch("train", idx), True) for j, idx in mine]
        local_n = sum(self.obj.count(b) for _, b, _ in work)
        local_tokens = sum(b["num_tokens"] for _, b, _ in work)
        n_all, tokens = r.all_sum([local_n, local_tokens])
        n_total = max(int(n_all), 1)
        if r.fsdp:  # every rank makes the same passes (all-gathers); extra ones weigh nothing
            filler = self.obj.batch("train", mbs[0])
            work += [(0, filler, False)] * (distributed.passes(mbs, r.world) - len(work))
        total_loss = 0.0
        sums: dict[str, tuple[float, float]] = {}
        scaler = self.scaler
        for k, (j, b, real) in enumerate(work):
            distributed.set_grad_sync(self.layers, k == len(work) - 1)
            torch.manual_seed(distributed.unit_seed(seed, step, j))
            with self._autocast():
                ls, more = self.obj.loss(self.model, b)
            scaled = ls / n_total if real else ls * 0.0
            (scaler.scale(scaled) if scaler else scaled).backward()
            if real:
                total_loss += float(ls.detach())
                _add(sums, more)
        distributed.sum_grads(self.params, r)
        total_loss, sums = _merge(r.gather((total_loss, sums)))
        loss = total_loss / n_total
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            raise NonFinite(loss)
        if scaler:
            scaler.unscale_(self.opt)  # clip the true gradients
        clip = self.config.training.max_grad_norm
        if clip:
            distributed.clip_grads(self.params, clip, r)
        if scaler:
            scaler.step(self.opt)  # skips the step when a gradient overflowed
            scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, int(tokens), self.obj.step_metrics(sums)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        n_rows = self.obj.size("eval")
        if not n_rows:
            return None, {}
        self.model.eval()
        r, mbs = self.ranks, self.config.training.micro_batch_size
        batches = [list(range(i, min(i + mbs, n_rows))) for i in range(0, n_rows, mbs)]
        mine = batches[r.rank :: r.world]
        if r.fsdp:  # the same forwards (all-gathers) on every rank; the filler's are dropped
            mine += [[]] * (math.ceil(len(batches) / r.world) - len(mine))
        total, n = 0.0, 0
        sums: dict[str, tuple[float, float]] = {}
        for idx in mine:
            b = self.obj.batch("eval", idx or batches[0])
            with self._autocast():
                ls, more = self.obj.loss(self.model, b)
            if idx:
                total, n = total + float(ls), n + self.obj.count(b)
                _add(sums, more)
        self.model.train()
        (total, sums), n = _merge(r.gather((total, sums))), int(r.all_sum([n])[0])
        return total / max(n, 1), self.obj.step_metrics(sums)

    def run(self, start_step, state, run_dir, bar, stop) -> None:
        t = self.config.training
        total = self.plan.total_steps
        recent = deque(state["recent_losses"], maxlen=10)
        self.model.train()
        for step in range(start_step, total):
            if self.ranks.any(stop.requested is not None):  # every rank stops at this step
                self._save(run_dir, step, state, recent)
                raise TrainingInterrupted(
                    f"{stop.requested or 'a signal'}: stopped at step {step}/{total}; checkpoint "
                    f"saved in "
                    f"{run_dir / 'checkpoints'}.",
                    hint="Continue with the same command plus --resume.",
                )
            t0 = time.perf_counter()
            try:
                loss, ntok, extra = self.step(step)
            except NonFinite as e:
                self._save(run_dir, step, state, recent)
                raise TrainingDiverged(
                    f"step {step + 1}/{total}: the loss is {e.value}; the step was not taken. "
                    f"Checkpoint of the weights before it: {run_dir / 'checkpoints'}"
                    f"/step-{step:08d}.",
                    hint="Lower training.lr (or raise warmup_ratio), check the data of this step "
                    "(`loft data validate`), then continue with --resume, or start over.",
                ) from None
            dt = time.perf_counter() - t0
            self.steps_run += 1
            self.session_tokens += ntok
            self.session_s += dt
            state["train_tokens"] += ntok
            state["train_s"] += dt
            recent.append(loss)
            done = step + 1
            tok_s = self.session_tokens / max(self.session_s, 1e-9)
            lr = self.sched.get_last_lr()[0]
            metrics = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tok_s}
            metrics.update({f"train/{k}": v for k, v in extra.items()})
            if self.obj.size("eval") and (done % t.eval_every == 0 or done == total):
                state["eval_loss"], eval_extra = self.evaluate()
                metrics["eval/loss"] = state["eval_loss"]
                metrics.update({f"eval/{k}": v for k, v in eval_extra.items()})
                bar.note(f"step {done}: eval loss {state['eval_loss']:.4f}")
            self.obj.watch(done, total, extra, bar)
            self.tracker.log_metrics(metrics, step=done)
            if self.on_eval is not None and "eval/loss" in metrics:
                try:
                    self.on_eval(done, state["eval_loss"])
                except RunPruned:
                    self._save(run_dir, done, state, recent)
                    raise
            eta = (total - done) * self.session_s / max(done - start_step, 1)
            bar.update(done, loss, tok_s, lr, eta, extra=self.obj.progress(extra))
            if done % t.save_every == 0 and done < total:
                self._save(run_dir, done, state, recent)
        state["recent_losses"] = list(recent)

    def _save(self, run_dir: Path, step: int, state: dict, recent: deque) -> None:
        state["recent_losses"] = list(recent)
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if self.private is not None:  # the sampling secret and the accountant's history
            state["privacy"] = self.private.state_dict()
        trainable = opt_state = None
        if self.ranks.fsdp:  # every rank gathers its shards; rank 0 writes them whole
            trainable = distributed.full_trainable_state(self.model)
            opt_state = distributed.full_optimizer_state(self.opt)
        if not self.ranks.main:
            return
        save_checkpoint(
            run_dir,
            step=step,
            model=self.model,
            optimizer=self.opt,
            scheduler=self.sched,
            state=state,
            keep=self.config.training.keep_checkpoints,
            trainable=trainable,
            optimizer_state=opt_state,
        )


def _merge(parts: list[tuple[float, dict]]) -> tuple[float, dict[str, tuple[float, float]]]:
    """Ranks' (loss sum, metric sums), added in rank order."""
    total, sums = 0.0, {}
    for t, more in parts:
        total += t
        _add(sums, more)
    return total, sums


class NonFinite(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


__all__ = ["NonFinite", "StepLoop"]
