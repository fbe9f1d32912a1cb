"""Pre-flight: estimate a run's peak memory on this device before the model is loaded.

The planner's estimate is for the run as loft will execute it: the largest micro-batch the step
plan will actually draw from the prepared data, shaped as the collator builds it (packed: one row
of its examples' tokens, padding-free; padded: one row per example, right-padded to its longest),
the LM head applied only to the positions whose next token is trained (loft's loss does that on
every device), and the precision and checkpointing ``plan_placement`` chose. When it exceeds the
memory this device has, the run stops with the breakdown and the changes that would make it fit,
unless ``--force``.

``loft train`` calls :func:`run_preflight` on the rows it prepared; ``loft plan CONFIG`` (for this
machine) calls :func:`preflight_config`, which takes the same placement, prepares (or reads from
the cache) the same data, draws the same step plan and ends in the same :func:`run_preflight`, so
the two print the same number. Without the data (no file, or the shape given as flags) it falls
back to ``micro_batch_size`` x ``max_seq_len`` and says so in ``shape_from``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loft.core.errors import HardwareError, LoftError
from loft.core.specs import TrainConfig
from loft.data.packing import IGNORE_INDEX
from loft.train.device import Placement, cpu_supports_bf16, plan_placement


@dataclass(frozen=True)
class Preflight:
    estimate: Any  # loft.planner.Estimate
    capacity_bytes: int
    device: str
    micro_batch_tokens: int
    placement: Placement | None = None
    shape: str = "data"  # "data": the step plan over the prepared rows; "config": mbs x max_seq_len
    shape_from: str = ""  # where micro_batch_tokens came from, in words
    dataset_fingerprint: str | None = None

    @property
    def fits(self) -> bool:
        return self.estimate.total_bytes <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {
            "total_bytes": self.estimate.total_bytes,
            "breakdown": dict(self.estimate.breakdown),
            "capacity_bytes": self.capacity_bytes,
            "device": self.device,
            "micro_batch_tokens": self.micro_batch_tokens,
            "fits": self.fits,
            "precision": self.estimate.settings.precision,
            "gradient_checkpointing": self.estimate.settings.gradient_checkpointing,
            "shape": self.shape,
            "shape_from": self.shape_from,
        }
        if self.placement is not None:
            out["placement"] = self.placement.describe()
        if self.dataset_fingerprint is not None:
            out["dataset_fingerprint"] = self.dataset_fingerprint
        return out


@dataclass(frozen=True)
class MicroBatchShape:
    """The batch the collator builds from one micro-batch (``loft.data.packing.collate``):
    ``rows`` x ``width`` token positions -- packed, one row of the examples end to end; padded,
    one row per example, right-padded to the longest -- of which ``trained`` are followed by a
    trained token (the positions loft's loss projects through the LM head)."""

    rows: int
    width: int
    trained: int
    packed: bool

    @property
    def positions(self) -> int:
        return self.rows * self.width

    @property
    def trained_fraction(self) -> float:
        return min(1.0, max(self.trained, 1) / max(self.positions, 1))

    def describe(self) -> str:
        return f"{self.positions:,} tokens" if self.packed else _padded(self.rows, self.width)


def _padded(rows: int, width: int) -> str:
    return f"{rows} rows padded to {width:,}: {rows * width:,} token positions"


def _trained_positions(labels: Any) -> int:
    """Positions whose next token is trained: labels 1.. that are not ignored."""
    tail = list(labels[1:])
    return len(tail) - tail.count(IGNORE_INDEX)


def _micro_batch_shape(
    lengths: list[int], trained: list[int], mb: list[int], *, packing: bool
) -> MicroBatchShape:
    """The shape ``collate(..., packing=packing)`` gives the examples ``mb``."""
    n_trained = sum(trained[i] for i in mb)
    if packing:
        return MicroBatchShape(1, max(1, sum(lengths[i] for i in mb)), n_trained, True)
    return MicroBatchShape(len(mb), max(1, max(lengths[i] for i in mb)), n_trained, False)


def _undominated(shapes: set[MicroBatchShape]) -> list[MicroBatchShape]:
    """The shapes no other shape with as many rows matches or beats in both width and trained
    positions (the only ones that can have the largest estimate), largest first."""
    out: list[MicroBatchShape] = []
    for n_rows in sorted({s.rows for s in shapes}, reverse=True):
        most = -1
        same = sorted((s for s in shapes if s.rows == n_rows), key=lambda s: (-s.width, -s.trained))
        for s in same:
            if s.trained > most:
                out.append(s)
                most = s.trained
    return out


def largest_micro_batch(
    rows: list[dict],
    plan: Any,
    *,
    packing: bool = True,
    cost: Callable[[MicroBatchShape], Any] | None = None,
    limit: int = 500_000,
) -> MicroBatchShape:
    """The largest micro-batch the step plan draws from ``rows``, shaped as the collator builds
    it with ``packing``. Largest by ``cost`` (``run_preflight`` passes the shape's estimated peak;
    by default: positions, then trained positions) among the drawn shapes that no other beats in
    every dimension; with padding, fewer rows of a longer example can cost more than more rows
    of short ones (the attention scores grow with the square of the width). For plans over
    ``limit`` example draws, an upper bound: the longest examples in one micro-batch, with the
    most trained positions any examples have."""
    if not rows:
        return MicroBatchShape(1, 1, 0, packing)
    lengths = [len(r["input_ids"]) for r in rows]
    trained = [_trained_positions(r["labels"]) for r in rows]
    if plan.total_steps * plan.per_step > limit:
        k = min(plan.micro_batch_size, len(rows))
        longest = sorted(lengths, reverse=True)[:k]
        most = sum(sorted(trained, reverse=True)[:k])
        if packing:
            return MicroBatchShape(1, max(1, sum(longest)), most, True)
        return MicroBatchShape(k, max(1, longest[0]), most, False)
    shapes = {
        _micro_batch_shape(lengths, trained, mb, packing=packing)
        for step in range(plan.total_steps)
        for mb in plan.micro_batches(step)
        if mb
    }
    return max(_undominated(shapes), key=cost or (lambda s: (s.positions, s.trained)))


def device_capacity(device: str, ranks: int = 1) -> int:
    """Bytes this process may use: free GPU memory (+ what it holds), or RAM available + our RSS.
    The ``ranks`` of a run on one machine share its RAM: each may use an equal part of what is
    available, on top of what it holds (each rank has a GPU of its own)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())
    available = _meminfo("MemAvailable") or _meminfo("MemTotal")
    return int(available // ranks + _rss())


def local_ranks(config: TrainConfig) -> int:
    """The run's ranks on this machine: torchrun's and Ray Train's ``LOCAL_WORLD_SIZE`` in a
    rank, else ``training.distributed.nproc`` (planning a run before it starts)."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    d = config.training.distributed
    return 1 if d.strategy == "none" else d.nproc


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if key == "MemTotal" and hasattr(os, "sysconf"):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return 0


def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def run_settings(
    config: TrainConfig,
    placement: Placement,
    *,
    micro_batch: int,
    seq_len: int,
    packing: bool,
    logit_fraction: float = 1.0,
) -> Any:
    """The planner's RunSettings for ``config`` as the trainer executes it under ``placement``:
    its precision (bf16 autocast or fp32) and checkpointing, AdamW, per device: each of the
    ranks of ``training.distributed`` (WORLD_SIZE inside a rank)."""
    from loft.planner import settings_from_train_config

    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    return settings_from_train_config(config, device=placement.device, world=world).with_(
        micro_batch=micro_batch,
        seq_len=seq_len,
        packing=packing,
        gradient_checkpointing=placement.gradient_checkpointing,
        precision=placement.precision,
        logit_fraction=logit_fraction,
    )


def _arch(config: TrainConfig) -> Any:
    from loft.models import resolve_model
    from loft.planner import resolve_arch

    return resolve_arch(
        config.base_model, resolve_path=lambda ref: resolve_model(ref, verify=False).path
    )


def run_preflight(
    config: TrainConfig,
    placement: Placement,
    rows: list[dict],
    plan: Any,
    *,
    capacity_bytes: int | None = None,
) -> Preflight:
    """The estimate for the largest micro-batch ``plan`` (the trainer's StepPlan) draws from
    ``rows`` (the prepared training rows), under ``placement``: the batch the collator builds
    (``data.packing`` false: micro-batch rows x its longest example), with logits for its trained
    positions only, as ``loss_sum`` computes them on every device."""
    from loft.planner import estimate

    arch = _arch(config)
    packing = config.data.packing
    base = run_settings(config, placement, micro_batch=1, seq_len=1, packing=packing)

    def settings_for(shape: MicroBatchShape) -> Any:
        return base.with_(
            micro_batch=shape.rows,
            seq_len=shape.width,
            packing=shape.packed,
            logit_fraction=shape.trained_fraction,
        )

    def peak(shape: MicroBatchShape) -> int:
        return estimate(arch, settings_for(shape)).total_bytes

    shape = largest_micro_batch(rows, plan, packing=packing, cost=peak)
    est = estimate(arch, settings_for(shape))
    cap = capacity_bytes
    if cap is None:
        cap = device_capacity(placement.device, local_ranks(config))
    where = (
        f"the largest micro-batch of the step plan ({plan.total_steps:,} steps x "
        f"{plan.per_step:,} examples over {len(rows):,} prepared examples)"
    )
    if not shape.packed:
        where += f", padded: {shape.describe()}"
    return Preflight(est, cap, placement.device, shape.positions, placement, "data", where)


def machine_device() -> str:
    """The device `loft train` would use here: cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def placement_reasons(config: TrainConfig, placement: Placement) -> dict[str, str]:
    """Why ``plan_placement`` decided what it did, one phrase per decision."""
    t, cuda = config.training, placement.device == "cuda"
    device = (
        "this machine has a CUDA GPU" if cuda else "this machine has no CUDA GPU (torch sees none)"
    )
    if t.precision != "auto":
        precision = f"training.precision {t.precision} in the config"
    elif cuda:
        why = placement.precision_note or "native on this GPU"
        precision = f"training.precision auto: {placement.precision} ({why})"
    else:
        has = "has" if cpu_supports_bf16() else "has no"
        precision = f"training.precision auto: this CPU {has} native bf16 (AVX512-BF16/AMX)"
    key = "training.gradient_checkpointing"
    if t.gradient_checkpointing == "auto":
        ckpt = f"{key} auto: {'on for cuda' if cuda else 'off for cpu'}"
    else:
        ckpt = f"{key} {str(t.gradient_checkpointing).lower()} in the config"
    return {"device": device, "precision": precision, "gradient_checkpointing": ckpt}


def _prepared_rows(config: TrainConfig, progress: bool) -> tuple[list[dict], Any] | str:
    """The training rows `loft train` would prepare from ``config`` (read from the cache by
    fingerprint when prepared before), or the reason they cannot be had here."""
    missing = [p for p in (config.data.train, config.data.eval) if p and not Path(p).is_file()]
    if missing:
        return f"data file {missing[0]} not found"
    from loft.models import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(config.base_model, verify=False))
        if config.objective == "sft":
            from loft.data import prepare_dataset
            from loft.train.sft import _rows

            dataset = prepare_dataset(config.data, tokenizer, progress=progress)
            rows = _rows(dataset.train)
        else:  # as the preference objective measures its micro-batches: both sequences a pair
            from loft.core.specs import PAIRED_OBJECTIVES
            from loft.data import prepare_preference_dataset
            from loft.train.preference import _as_sft_row
            from loft.train.preference import _rows as preference_rows

            paired = config.objective in PAIRED_OBJECTIVES
            dataset = prepare_preference_dataset(
                config.data, tokenizer, paired=paired, progress=progress
            )
            rows = [_as_sft_row(r, paired) for r in preference_rows(dataset.train, paired)]
    except LoftError as e:
        return f"{config.data.train} could not be prepared here ({str(e).splitlines()[0]})"
    if not rows:
        return f"no trainable examples in {config.data.train} after preparation"
    return rows, dataset


def preflight_config(
    config: TrainConfig,
    *,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    capacity_bytes: int | None = None,
    progress: bool = False,
) -> Preflight:
    """What `loft train CONFIG` would estimate before loading the model on this machine.

    The placement is ``plan_placement``'s (HardwareError where train would refuse). When the
    config's data file exists, it is prepared as `loft train` prepares it (a cache hit by
    fingerprint when it was prepared before) and the estimate is ``run_preflight``'s for the
    trainer's step plan: the same number `loft train` records in run_summary.json. Otherwise
    (or with ``micro_batch``/``seq_len`` given) the micro-batch is ``micro_batch_size`` x
    ``max_seq_len`` tokens, all of them with logits, and ``shape_from`` says why.
    """
    placement = plan_placement(config)
    if micro_batch is None and seq_len is None:
        found = _prepared_rows(config, progress)
        if not isinstance(found, str):
            from loft.train.sft import make_plan

            rows, dataset = found
            pre = run_preflight(
                config, placement, rows, make_plan(config, len(rows)), capacity_bytes=capacity_bytes
            )
            return replace(pre, dataset_fingerprint=dataset.fingerprint)
        why = found
    else:
        given = [f for f, v in (("--micro-batch", micro_batch), ("--seq-len", seq_len)) if v]
        why = f"{' and '.join(given)} given"
    from loft.planner import estimate

    t = config.training
    mbs = micro_batch or t.micro_batch_size
    seq = seq_len or config.data.max_seq_len
    settings = run_settings(
        config, placement, micro_batch=mbs, seq_len=seq, packing=config.data.packing
    )
    est = estimate(_arch(config), settings)
    cap = capacity_bytes
    if cap is None:
        cap = device_capacity(placement.device, local_ranks(config))
    where = (
        f"{'--micro-batch' if micro_batch else 'training.micro_batch_size'} {mbs} x "
        f"{'--seq-len' if seq_len else 'data.max_seq_len'} {seq}, every position with logits "
        f"(the most a micro-batch can hold): {why}"
    )
    return Preflight(est, cap, placement.device, mbs * seq, placement, "config", where)


def suggestions(pre: Preflight, config: TrainConfig) -> list[tuple[str, int]]:
    """Config changes loft's trainer can apply, cumulative, with the new estimated peak each."""
    from loft.planner import estimate

    out: list[tuple[str, int]] = []
    settings, tokens = pre.estimate.settings, pre.micro_batch_tokens
    changes: list[str] = []
    if not settings.gradient_checkpointing:
        settings = settings.with_(gradient_checkpointing=True)
        changes.append("--set training.gradient_checkpointing=true")
        out.append((" ".join(changes), estimate(pre.estimate.arch, settings).total_bytes))
    mbs, accum = config.training.micro_batch_size, config.training.grad_accum
    rows = settings.micro_batch
    while mbs > 1 and (not out or out[-1][1] > pre.capacity_bytes):
        mbs, accum = max(1, mbs // 2), accum * 2
        if pre.shape == "data" and settings.packing:  # one packed row of the micro-batch's tokens
            per = max(1, tokens * mbs // config.training.micro_batch_size)
            settings = settings.with_(seq_len=per)
        else:  # padded rows (or micro_batch x seq_len without data): fewer rows, as long
            settings = settings.with_(micro_batch=min(rows, mbs))
        step = [f"--set training.micro_batch_size={mbs}", f"--set training.grad_accum={accum}"]
        out.append((" ".join([*changes, *step]), estimate(pre.estimate.arch, settings).total_bytes))
    if pre.device == "cuda" and config.method != "qlora":
        settings = settings.with_(method="qlora")
        out.append(("--set method=qlora", estimate(pre.estimate.arch, settings).total_bytes))
    return out


def refuse_if_too_big(pre: Preflight, config: TrainConfig) -> None:
    """HardwareError with the breakdown and the changes that would fit, when it does not fit."""
    if pre.fits:
        return
    gib = 1024**3
    where = "GPU memory" if pre.device == "cuda" else "RAM available"
    s = pre.estimate.settings
    shape = f"{pre.micro_batch_tokens:,} tokens" if s.packing else _padded(s.micro_batch, s.seq_len)
    lines = [
        f"this run needs about {pre.estimate.total_bytes / gib:.1f} GiB at its peak but this "
        f"machine has {pre.capacity_bytes / gib:.1f} GiB of {where}; nothing was loaded.",
        f"estimate for the largest micro-batch ({shape}):",
    ]
    lines += [f"  {k:<16} {v / gib:8.2f} GiB" for k, v in pre.estimate.breakdown.items() if v]
    changes = suggestions(pre, config)
    if changes:
        lines.append("changes, each on top of the ones before, with the new estimate:")
        lines += [
            f"  {change}: {total / gib:.1f} GiB"
            + (" (fits)" if total <= pre.capacity_bytes else "")
            for change, total in changes
        ]
    raise HardwareError(
        "\n".join(lines),
        hint="Apply a change with the --set flags above, check a plan with `loft plan CONFIG`, "
        "or pass --force to run anyway.",
    )
