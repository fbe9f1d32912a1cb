"""What a training run leaves behind: its tracker run, its output folder (adapter or model with
lineage), its registry version. Called by ``loft.train.sft.train`` once the loop ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loft import __version__
from loft.core.errors import LoftError
from loft.core.paths import atomic_dir, atomic_write_json
from loft.core.specs import RegisterSpec, TrainConfig
from loft.train import rundir
from loft.train.progress import TrainProgress


def open_tracker(
    config: TrainConfig, run_id: str, mlflow_run_id: str | None, tags: dict[str, str] | None = None
):
    from loft.tracking import open_tracker

    tags = {
        "loft.run_id": run_id,
        "loft.method": str(config.method),
        "loft.version": __version__,
        **(tags or {}),
    }
    return open_tracker(config.tracking, run_name=run_id, tags=tags, resume_run_id=mlflow_run_id)


def planner_params(pre: Any) -> dict[str, Any]:
    """The planner's pre-flight estimate as run params: what the run was expected to need."""
    return {
        "planner.estimate_bytes": pre.estimate.total_bytes,
        "planner.capacity_bytes": pre.capacity_bytes,
        "planner.micro_batch_tokens": pre.micro_batch_tokens,
        "planner.device": pre.device,
    }


def privacy_params(dp: Any) -> dict[str, Any]:
    """The privacy parameters the run resolved (loft.train.privacy.PrivacyPlan) as run params."""
    from loft.train.privacy import ACCOUNTANT, SAMPLING

    return {
        "dp.noise_multiplier": dp.noise_multiplier,
        "dp.sample_rate": dp.sample_rate,
        "dp.delta": dp.delta,
        "dp.steps": dp.steps,
        "dp.expected_batch_size": dp.expected_batch_size,
        "dp.accountant": ACCOUNTANT,
        "dp.sampling": SAMPLING,
    }


def log_privacy(tracker: Any, report: dict[str, Any], bar: TrainProgress, main: bool) -> None:
    """The epsilon a private run spent, as metrics at its last step, and on the terminal."""
    keys = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "max_grad_norm")
    tracker.log_metrics({f"privacy/{k}": float(report[k]) for k in keys}, step=report["steps"])
    if main:
        bar.note(
            f"privacy: epsilon {report['epsilon']:.3f} at delta {report['delta']:.3g} over "
            f"{report['steps']} steps (noise multiplier {report['noise_multiplier']:.4g}, "
            f"sampling rate {report['sample_rate']:.4g}, {report['accountant']} accountant)",
            always=True,
        )


def data_params(dataset: Any) -> dict[str, Any]:
    r = dataset.report
    keep = (
        "format",
        "records",
        "train_records",
        "eval_records",
        "exact_dups",
        "near_dups",
        "truncated",
    )
    return {
        "dataset.fingerprint": dataset.fingerprint,
        **{f"dataset.{k}": r[k] for k in keep if k in r},
    }


def save_output(
    config, model, tokenizer, run_dir, info, dataset, metrics, state_dict=None, privacy=None
) -> Path:
    """The adapter (or full model) with its tokenizer, chat template and lineage.json.
    ``state_dict``: the trained weights gathered whole (a sharded run), instead of the model's.
    ``privacy``: a private run's report (the epsilon it spent), recorded in the lineage."""
    final = run_dir / ("model" if config.method == "full" else "adapter")
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        tokenizer.save_pretrained(tmp)
        lineage = rundir.lineage(config=config, model_info=info, dataset=dataset, metrics=metrics)
        if privacy is not None:
            lineage["privacy"] = privacy
        atomic_write_json(tmp / "lineage.json", lineage)
    return final


def registered_name(config: TrainConfig) -> str:
    """``register.name``, else ``run_name``, else ``<train file's folder>-<method>`` (for
    preference objectives ``-<objective>``: support_tickets-dpo)."""
    import re

    reg = config.register
    if isinstance(reg, RegisterSpec) and reg.name:
        return reg.name
    what = config.method if config.objective == "sft" else config.objective
    base = config.run_name or f"{Path(config.data.train).resolve().parent.name}-{what}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:64] or "model"


def register_run(config: TrainConfig, run_dir: Path, bar: TrainProgress) -> dict[str, Any]:
    """Register the finished run as a new model version (unless ``register: false``).

    The run is complete on disk before this; a registry failure is reported, not fatal."""
    if config.register is False:
        return {}
    from loft.registry import register

    parent = config.register.parent if isinstance(config.register, RegisterSpec) else None
    parent = parent or config.init_from  # continuing a version makes it the parent
    try:
        mv = register(run_dir, name=registered_name(config), parent=parent)
    except LoftError as e:
        bar.note(f"[yellow]warning:[/] not registered: {e.message}", always=True)
        return {"registered": None, "registry_error": e.message}
    bar.note(f"registered as {mv.name}:{mv.version}", always=True)
    return {"registered": f"{mv.name}:{mv.version}"}


def finish_tracker(tracker: Any, run_dir: Path, dataset: Any, status: str) -> None:
    for name in (rundir.RESOLVED, rundir.SUMMARY):
        tracker.log_artifact(run_dir / name)
    report = Path(dataset.path) / "report.json"
    if report.is_file():
        tracker.log_artifact(report, "data")
    lineage = run_dir / "adapter" / "lineage.json"
    if not lineage.is_file():
        lineage = run_dir / "model" / "lineage.json"
    if lineage.is_file():
        tracker.log_artifact(lineage)
    ends = {"completed": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}
    tracker.finish(ends.get(status, "FAILED"))
