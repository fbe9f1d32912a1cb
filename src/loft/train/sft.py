"""Supervised fine-tuning: full, LoRA, DoRA, QLoRA. Reads top to bottom.

Built on transformers (model, schedulers), PEFT (adapters) and our own step loop. The loop is the
part we own because the stock TRL/Trainer path is slow on this class of hardware: it pads, projects
every position through the LM head and cannot resume bit-for-bit. Measured on a 2-core CPU with
SmolLM2-135M (bench/train_throughput.py): see the README's performance section.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loft.core.config import flatten
from loft.core.errors import (
    HardwareError,
    LoftError,
    RunPruned,
    TrainingInterrupted,
)
from loft.core.paths import runs_dir
from loft.core.specs import TrainConfig
from loft.data.packing import collate, count_label_tokens
from loft.train import distributed, outputs, rundir
from loft.train.checkpoint import checkpoint_dirs, load_checkpoint
from loft.train.device import (
    Placement,
    determinism,
    determinism_error,
    peak_memory_bytes,
    plan_placement,
)
from loft.train.distributed import Ranks
from loft.train.loop import StepLoop
from loft.train.loss import loss_sum
from loft.train.model_setup import build_model, count_params, init_version
from loft.train.preflight import refuse_if_too_big, run_preflight
from loft.train.progress import TrainProgress
from loft.train.signals import GracefulStop


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def output_path(self) -> Path:
        return Path(self.summary["output_path"])


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step sees: a pure function of (seed, epoch, step)."""

    n_examples: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    total_steps: int

    @property
    def per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.per_step)

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.n_examples, self.seed, epoch)
        idx = order[k * self.per_step : (k + 1) * self.per_step]
        mbs = self.micro_batch_size
        return [idx[i : i + mbs] for i in range(0, len(idx), mbs)]


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDER_CACHE[key] = torch.randperm(n, generator=g).tolist()
    return _ORDER_CACHE[key]


def make_plan(config: TrainConfig, n_examples: int) -> StepPlan:
    t = config.training
    per_epoch = math.ceil(n_examples / (t.micro_batch_size * t.grad_accum))
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    return StepPlan(n_examples, t.micro_batch_size, t.grad_accum, t.seed, total)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    tracker: Any = None,
    force: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Run one fine-tune end to end and return its run directory and summary.

    Before the model is loaded, the planner's memory estimate for the run's largest micro-batch
    is checked against this device; HardwareError when it does not fit, unless ``force``.
    ``on_eval(step, eval_loss)`` is called after each evaluation (a study's pruner); when it
    raises RunPruned the run saves a checkpoint, ends with status ``pruned`` and re-raises.
    ``tags`` go on the run's MLflow run when train opens it (a study's trial: its parent run).
    """
    started = time.time()
    placement = plan_placement(config)  # refuses impossible configs before anything is loaded
    ranks = distributed.setup(config, placement.device)  # one rank of several, under torchrun
    try:
        if ranks.fsdp and placement.grad_scaler:
            raise HardwareError(
                "fsdp with fp16 autocast (a GPU without native bf16) is not supported: the "
                "gradient scaler would see only this rank's shard of the gradients.",
                hint="Use --set training.distributed.strategy=ddp, or training.precision=fp32.",
            )
        _check_data(config)  # every bad record is reported before a model is converted or loaded
        resume = resume or distributed.restarted()  # torchrun restarts resume the checkpoint
        run_dir = _run_dir(config, resume, ranks)
        run_id = run_dir.name
        if ranks.main:
            rundir.write_resolved(run_dir, config)
        summary = {**rundir.read_summary(run_dir), "run_id": run_id, "status": "running"}
        summary.update(method=config.method, base_model=config.base_model, run_dir=str(run_dir))
        if ranks.active:
            summary["distributed"] = {"strategy": ranks.strategy, "world_size": ranks.world}
        _write_summary(ranks, run_dir, summary)
        try:
            with determinism(placement):  # before the model is built: cuBLAS reads it at start
                return _train(
                    config, run_dir, summary, placement, resume, progress, tracker, started,
                    force, on_eval, tags, ranks,
                )  # fmt: skip
        except BaseException as e:
            if ranks.main and rundir.read_summary(run_dir).get("status") == "running":
                interrupted = isinstance(e, KeyboardInterrupt | TrainingInterrupted)
                summary["status"] = "interrupted" if interrupted else "failed"
                rundir.write_summary(run_dir, summary)  # failed before the loop
            raise
    finally:
        distributed.teardown(ranks)


def _run_dir(config: TrainConfig, resume: bool, ranks: Ranks) -> Path:
    """Rank 0 finds (--resume) or makes the run directory, and tells the other ranks. Under
    ``loft train``'s launcher it is already chosen (LOFT_RUN_DIR)."""
    run_dir: Path | None = None
    if ranks.main:
        chosen = os.environ.get(distributed.RUN_DIR_ENV) if ranks.active else None
        if chosen:
            run_dir = Path(chosen)
            if resume and (run_dir / rundir.RESOLVED).is_file():
                rundir.check_same(run_dir, config)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = rundir.find_resume_dir(config) if resume else _new_run_dir(config)
    return Path(ranks.broadcast(str(run_dir) if run_dir is not None else None))


def _write_summary(ranks: Ranks, run_dir: Path, summary: dict) -> None:
    if ranks.main:
        rundir.write_summary(run_dir, summary)


def _check_data(config: TrainConfig) -> None:
    from loft.data import validate_file
    from loft.data.validate import raise_for_problems

    if config.data.skip_invalid:
        return
    for path in filter(None, (config.data.train, config.data.eval)):
        rep = validate_file(path, format=config.data.format, column_map=config.data.column_map)
        raise_for_problems(rep.problems, rep.n_invalid, rep.n_records, str(rep.path))


def _train(
    config,
    run_dir,
    summary,
    placement,
    resume,
    progress,
    tracker,
    started,
    force,
    on_eval=None,
    tags=None,
    ranks: Ranks | None = None,
) -> RunResult:
    ranks = ranks or Ranks()
    run_id = run_dir.name
    from loft.models import load_tokenizer, resolve_model

    progress = progress and ranks.main
    with ranks.main_first():  # rank 0 converts the model and prepares the data, once
        info = resolve_model(config.base_model)
        init = init_version(config, info)  # the registered version to continue from, verified
        tokenizer = load_tokenizer(info)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        objective = _objective(config, tokenizer, pad_id, placement, progress, info, init)
    dataset = objective.dataset
    n_train = objective.size("train")
    if not n_train:
        raise LoftError(f"no trainable examples left in {config.data.train} after preparation.")

    plan = make_plan(config, n_train)
    dp = None
    if config.privacy is not None:  # Poisson sampling; the noise for the target epsilon
        from loft.train import privacy

        secret = privacy.run_secret(run_dir, resume)
        plan = privacy.PoissonPlan(
            n_train, plan.micro_batch_size, plan.grad_accum, secret, plan.total_steps
        )
        dp = privacy.resolve(config, plan)
    pre = objective.preflight(config, placement, plan)
    summary["memory_estimate"] = pre.to_dict()
    _write_summary(ranks, run_dir, summary)
    if not force:
        try:
            refuse_if_too_big(pre, config)
        except HardwareError:
            if not resume and ranks.main:  # never started: leave no run dir to trip over
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    torch.manual_seed(config.training.seed)
    model = build_model(config, info, placement, init)
    trainable, total = count_params(model)
    layers = distributed.shard_model(model, ranks) if ranks.fsdp else []
    optimizer, scheduler = _optimizer(config, model, plan.total_steps)
    private = None
    if dp is not None:  # per-example clipping, noise and accounting through Opacus
        private = privacy.PrivateTraining(config, model, optimizer, dp, placement, plan.secret)

    if tracker is None and not ranks.main:
        from loft.tracking import NullTracker

        tracker = NullTracker()  # rank 0 tracks the run
    if tracker is None:
        tracker = outputs.open_tracker(config, run_id, summary.get("mlflow_run_id"), tags)
    # before a checkpoint is loaded: the model is still as it started (the reference, if any)
    objective.setup(model, run_dir, summary)
    summary.update(
        mlflow_run_id=tracker.run_id,
        dataset_fingerprint=dataset.fingerprint,
        trainable_params=trainable,
        total_params=total,
        placement=placement.describe(),
    )
    state = {"train_tokens": 0, "recent_losses": [], "eval_loss": None, "train_s": 0.0}
    start_step, resumed_from = 0, None
    if resume and (ckpts := checkpoint_dirs(run_dir)):
        ck = load_checkpoint(
            ckpts[-1],
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            place=distributed if ranks.fsdp else None,
        )
        start_step, state, resumed_from = ck.step, {**state, **ck.state}, ck.path.name
        if private is not None:  # the accountant goes on counting where it stopped
            private.load_state_dict(state.get("privacy"), start_step)
    else:
        tracker.log_params(
            {
                **flatten(config.model_dump(mode="json")),
                **outputs.data_params(dataset),
                **outputs.planner_params(pre),
                **(outputs.privacy_params(dp) if dp is not None else {}),
            }
        )
    # one record per process that trained this run: where it started, from which checkpoint,
    # and (when it ends) how many steps it ran; a SIGKILLed process leaves only its start
    session = {"started": rundir.now_iso(), "start_step": start_step, "resumed_from": resumed_from}
    summary["sessions"] = [*summary.get("sessions", []), session]
    _write_summary(ranks, run_dir, summary)

    loop = StepLoop(config, model, optimizer, scheduler, plan, placement, objective, tracker, ranks)
    loop.layers = layers
    loop.on_eval = on_eval
    loop.private = private
    if loop.scaler is not None and state.get("grad_scaler"):
        loop.scaler.load_state_dict(state["grad_scaler"])
    bar = TrainProgress(plan.total_steps, start_step, enabled=progress)
    if resumed_from:
        bar.note(
            f"resuming run {run_id} at step {start_step}/{plan.total_steps} from checkpoint "
            f"{resumed_from}",
            always=True,
        )
    bar.note(
        f"run {run_id}: {objective.describe(config.method)} on {info.name} ({trainable:,} of "
        f"{total:,} params trainable), {n_train:,} {objective.unit}, {plan.total_steps} steps, "
        f"{placement.describe()}"
        + (f", {ranks.strategy} on {ranks.world} ranks" if ranks.active else "")
    )
    status = "failed"
    try:
        with GracefulStop() as stop:
            loop.run(start_step, state, run_dir, bar, stop)
        objective.finish(model)  # e.g. the weights must have moved
        if private is not None:  # the adapter must have moved (opacus#820)
            private.finish(check_changed=loop.steps_run > 0)
        status = "completed"
    except TrainingInterrupted:
        status = "interrupted"
        raise
    except RunPruned:
        status = "pruned"
        raise
    except RuntimeError as e:
        if (err := determinism_error(e, placement)) is not None:
            raise err from e
        raise
    finally:
        bar.close()
        summary.update(_summary_metrics(state, loop, placement, started))
        summary["status"] = status
        if private is not None:
            summary["privacy"] = private.report()
            outputs.log_privacy(tracker, summary["privacy"], bar, ranks.main)
        session.update(
            steps_run=loop.steps_run, end_step=start_step + loop.steps_run, status=status
        )
        if status == "completed":
            metrics = {
                "final_train_loss": summary["final_train_loss"],
                "eval_loss": state["eval_loss"],
            }
            if private is not None:
                metrics["dp_epsilon"] = summary["privacy"]["epsilon"]
            # sharded: every rank gathers; rank 0 writes the single-process format, once
            whole = distributed.full_trainable_state(model) if ranks.fsdp else None
            if ranks.main:
                path = outputs.save_output(
                    config, model, tokenizer, run_dir, info, dataset, metrics, state_dict=whole,
                    privacy=summary.get("privacy"),
                )  # fmt: skip
                summary["output_path"] = str(path)
                rundir.write_summary(run_dir, summary)
                summary.update(outputs.register_run(config, run_dir, bar))
        if ranks.main:
            rundir.write_summary(run_dir, summary)
            outputs.finish_tracker(tracker, run_dir, dataset, status)
    return RunResult(run_dir=run_dir, summary=summary)


class SftObjective:
    """Next-token cross-entropy on the labelled (assistant) positions, normalised over the
    optimizer step's label tokens. The other objectives (loft.train.preference) have the same
    shape: data, micro-batches, a summed loss with the count it is normalised by, metrics."""

    unit = "examples"

    def __init__(self, config: TrainConfig, tokenizer: Any, pad_id: int, placement, progress):
        from loft.data import prepare_dataset

        self.config, self.pad_id, self.device = config, pad_id, placement.device
        self.dataset = prepare_dataset(config.data, tokenizer, progress=progress)
        self.rows = {
            "train": _rows(self.dataset.train),
            "eval": _rows(self.dataset.eval) if self.dataset.eval is not None else [],
        }

    def describe(self, method: str) -> str:
        return str(method)

    def size(self, split: str) -> int:
        return len(self.rows[split])

    def preflight(self, config: TrainConfig, placement: Placement, plan: StepPlan):
        return run_preflight(config, placement, self.rows["train"], plan)

    def setup(self, model: torch.nn.Module, run_dir: Path, summary: dict) -> None:
        """Work before the first step (preference objectives: the reference pass)."""

    def batch(self, split: str, idx: list[int]) -> dict[str, Any]:
        rows = self.rows[split]
        b = collate(
            [rows[i] for i in idx], packing=self.config.data.packing, pad_token_id=self.pad_id
        )
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def count(self, batch: dict[str, Any]) -> int:
        return count_label_tokens(batch)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]):
        """(summed loss, {metric: (sum, count)})."""
        ls, _ = loss_sum(model, batch)
        return ls, {}

    def step_metrics(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {}

    def watch(self, done: int, total: int, metrics: dict[str, float], bar: TrainProgress) -> None:
        """Look at a finished step's metrics (preference objectives: warn on a dead signal)."""

    def progress(self, metrics: dict[str, float]) -> str:
        """Extra text for the progress line."""
        return ""

    def finish(self, model: torch.nn.Module) -> None:
        """Checks once the last step ran (preference objectives: the weights moved)."""


def _objective(config: TrainConfig, tokenizer, pad_id: int, placement, progress, info, init):
    if config.objective == "sft":
        return SftObjective(config, tokenizer, pad_id, placement, progress)
    from loft.train.preference import PreferenceObjective

    return PreferenceObjective(config, tokenizer, placement, progress, info=info, init=init)


def _rows(ds: Any) -> list[dict]:
    cols = ds.select_columns(["input_ids", "labels"])
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in cols]


def _optimizer(config: TrainConfig, model: torch.nn.Module, total_steps: int):
    from transformers import get_scheduler

    t = config.training
    groups = distributed.param_groups(model)
    opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    warmup = int(round(t.warmup_ratio * total_steps))
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    return opt, sched


def _new_run_dir(config: TrainConfig) -> Path:
    if config.output_dir:
        run_dir = Path(config.output_dir)
        if (run_dir / rundir.RESOLVED).exists():
            from loft.core.errors import ConfigError

            raise ConfigError(
                f"output_dir {run_dir} already holds a run.",
                hint="Pass --resume to continue it, or choose another output_dir.",
            )
    else:
        run_dir = runs_dir() / (config.run_name or rundir.new_run_id())
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _summary_metrics(state: dict, loop: StepLoop, placement: Placement, started: float) -> dict:
    recent = state.get("recent_losses") or []
    return {
        "train_tokens": state["train_tokens"],
        "steps": loop.sched.last_epoch if hasattr(loop.sched, "last_epoch") else None,
        "wall_s": round(time.time() - started, 2),
        "train_s": round(state["train_s"], 2),
        "tokens_per_s": round(loop.session_tokens / max(loop.session_s, 1e-9), 2),
        "peak_mem_bytes": peak_memory_bytes(placement.device),
        "final_train_loss": round(sum(recent) / len(recent), 6) if recent else None,
        "eval_loss": state.get("eval_loss"),
        "output_path": None,
    }
