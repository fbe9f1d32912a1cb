"""A training job from a config document (the portal's new-job form and ``POST /api/jobs``):
validate it as `loft train` does, estimate it with the planner, and queue it through the same
admission as `loft jobs submit` (``kinds.admit_train``).

The document becomes a YAML file under ``LOFT_HOME/jobs/configs/`` (written atomically) that the
job's spec names, exactly as a config file a user submits from the command line. No torch here:
``estimate`` is the planner's arithmetic for a target (a catalogue GPU, or a CPU worker's
memory), the numbers the form shows while it is filled in; admission itself runs ``loft plan``
in a child, as the CLI does.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loft.core.config import format_validation_error
from loft.core.errors import ConfigError
from loft.core.paths import atomic_write_text
from loft.core.specs import TrainConfig
from loft.jobs import kinds
from loft.jobs.store import Job, JobStore, jobs_root

CPU = "cpu"
_PROBLEM = re.compile(r"^\s+(\S+): (.*)$")


def configs_dir() -> Path:
    """Where submitted config documents are kept (``LOFT_HOME/jobs/configs``)."""
    return jobs_root() / "configs"


def problems(doc: dict[str, Any]) -> tuple[TrainConfig | None, list[tuple[str, str]]]:
    """The validated config, or None and every problem as ``(key path, message)`` in the words
    `loft train` uses (``(top level)`` for a problem with no key)."""
    try:
        return TrainConfig.model_validate(doc), []
    except ValidationError as e:
        return None, keyed_problems(format_validation_error(e, TrainConfig, "config"))


def keyed_problems(message: str) -> list[tuple[str, str]]:
    """``(key path, problem)`` for each ``  key.path: problem`` line of a config error."""
    found = []
    for line in message.splitlines()[1:]:
        m = _PROBLEM.match(line)
        if m:
            found.append((m[1], m[2]))
    return found


def validate(
    doc: dict[str, Any], source: str = "the job's config", *, check_files: bool = True
) -> TrainConfig:
    """The config, or a ConfigError listing every problem with its key path; with
    ``check_files``, the data files must exist on this machine (the workers read them by the
    same path)."""
    cfg, found = problems(doc)
    if cfg is None:
        n = len(found)
        raise ConfigError(
            f"{source}: {n} problem{'s' if n > 1 else ''} in config:\n"
            + "\n".join(f"  {path}: {msg}" for path, msg in found),
            hint="Fix the keys above; `loft train --help` lists the config reference.",
        )
    if not check_files:
        return cfg
    missing = [
        f"  data.{key}: "
        + (f"no file {value}" if Path(value).is_absolute() else f"{value!r} is not absolute")
        for key, value in (("train", cfg.data.train), ("eval", cfg.data.eval))
        if value and not (Path(value).is_absolute() and Path(value).is_file())
    ]
    if missing:
        raise ConfigError(
            f"{source}: {len(missing)} problem{'s' if len(missing) > 1 else ''} in config:\n"
            + "\n".join(missing),
            hint="Give the path of a file on the machine the portal and the workers share, or a "
            "dataset version from the catalog.",
        )
    return cfg


def write_config(doc: dict[str, Any], owner: str) -> Path:
    """The document as a YAML file of its own under ``configs_dir()`` (never overwritten)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = configs_dir() / f"{stamp}-{owner}-{secrets.token_hex(3)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def submit_train(
    doc: dict[str, Any],
    *,
    owner: str,
    store: JobStore | None = None,
    priority: int = 0,
    max_attempts: int = 3,
    dataset: str | None = None,
    actor: str | None = None,
    context: dict[str, Any] | None = None,
) -> Job:
    """Validate ``doc``, save it, admit it as `loft jobs submit CONFIG` does (the planner's memory
    estimate against the workers), and queue it. ``dataset`` (a catalog ref the document's
    ``data.train`` came from) is kept in the job's spec for its lineage, with a one-line
    ``label`` for lists (kinds.argv reads neither). Audited as ``job.submit`` by ``actor``
    (default ``owner``) with ``context``."""
    store = store or JobStore()
    cfg = validate(doc)
    path = write_config(doc, owner)
    capacities = [c for _, c in store.worker_capacities()]
    try:
        adm = kinds.admit_train(path, [], capacities=capacities)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    data = dataset or Path(cfg.data.train).name
    label = f"{cfg.method} {cfg.objective} of {Path(cfg.base_model).name} on {data}"
    spec = {**adm.spec, "label": label, **({"dataset": dataset} if dataset else {})}
    return store.submit("train", spec, owner=owner, priority=priority, resources=adm.resources,
                        max_attempts=max_attempts, actor=actor, context=context)  # fmt: skip


def worker_capacity(store: JobStore | None = None) -> tuple[int, str]:
    """The memory a CPU job may use: the largest registered worker's, else this machine's RAM;
    and where that number came from."""
    from loft.core.procs import ram_bytes

    caps = [c for _, c in (store or JobStore()).worker_capacities()]
    if caps:
        return max(caps), f"the largest of {len(caps)} worker{'s' if len(caps) > 1 else ''}"
    return int(ram_bytes() or 0), "this machine's RAM (no worker has registered)"


def estimate(cfg: TrainConfig, target: str = CPU, *, capacity: int | None = None) -> dict:
    """The planner's estimate of ``cfg`` on ``target`` (a catalogue GPU key, or ``cpu`` against
    ``capacity`` bytes): peak memory itemised, whether it fits, the smallest fitting GPU, changes
    that would make it fit and, on a GPU with ``training.max_steps`` set, time and cost for at
    most that many steps of full micro-batches."""
    from loft.planner import (
        get_gpu,
        recommend,
        resolve_arch,
        settings_from_train_config,
        time_and_cost,
    )

    def model_path(ref: str) -> str:
        from loft.models import resolve_model

        return str(resolve_model(ref, verify=False).path)

    arch = resolve_arch(cfg.base_model, resolve_path=model_path)
    if target == CPU:
        settings = settings_from_train_config(cfg, device="cpu")
        plan = recommend(arch, settings, capacity_bytes=capacity or None)
        gpu = None
    else:
        gpu = get_gpu(target)
        settings = settings_from_train_config(cfg, device="cuda")
        plan = recommend(arch, settings, gpu=gpu)
    est = plan.estimate
    t = cfg.training
    tokens = None
    if t.max_steps:
        tokens = t.max_steps * t.micro_batch_size * t.grad_accum * cfg.data.max_seq_len
    tc = time_and_cost(est, gpu, tokens=tokens) if gpu is not None and tokens else None
    return {
        "model": arch.name or cfg.base_model,
        "target": target,
        "settings": est.settings.to_dict(),
        "n_params": est.n_params,
        "trainable_params": est.trainable_params,
        "total_bytes": est.total_bytes,
        "breakdown": dict(est.breakdown),
        "notes": list(est.notes),
        "fit": plan.target.to_dict() if plan.target else None,
        "recommended_gpu": plan.recommended_gpu,
        "suggestions": [s.to_dict() for s in plan.suggestions],
        "tokens": tokens,
        "time_cost": tc.to_dict() if tc else None,
    }


__all__ = [
    "CPU",
    "configs_dir",
    "estimate",
    "problems",
    "submit_train",
    "validate",
    "worker_capacity",
    "write_config",
]
