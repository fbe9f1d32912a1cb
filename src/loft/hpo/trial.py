"""One trial of a study: train a config, then score it on the study's objective.

A plain function of (config, objective): the study calls it in-process, a worker process calls
it, and a job queue can call it as it runs any training job. It knows nothing of Optuna; the
pruner reaches it only through ``on_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError
from loft.core.specs import TrainConfig
from loft.hpo.space import Objective


@dataclass
class TrialOutcome:
    values: list[float]  # the objective(s), in Objective.names order
    run_dir: str
    summary: dict[str, Any]  # the run's summary.json

    @property
    def steps(self) -> int | None:
        return self.summary.get("steps")

    @property
    def train_tokens(self) -> int:
        return int(self.summary.get("train_tokens") or 0)


def run_trial(
    config: TrainConfig,
    objective: Objective,
    *,
    on_eval: Callable[[int, float], None] | None = None,
    resume: bool = False,
    tags: dict[str, str] | None = None,
    tracker: Any = None,
    force: bool = False,
) -> TrialOutcome:
    """Train ``config`` (into its ``output_dir``) and score it.

    ``resume``: the run in ``output_dir`` was started by a process that died; continue it from
    its last checkpoint, or, when it had already completed, score it without training again."""
    from loft.train import rundir, train

    run_dir = Path(str(config.output_dir))
    summary = rundir.read_summary(run_dir) if resume else {}
    if summary.get("status") != "completed":
        started = resume and (run_dir / rundir.RESOLVED).is_file()
        result = train(
            config, resume=started, progress=False, tracker=tracker, on_eval=on_eval,
            force=force, tags=tags,
        )  # fmt: skip
        summary = result.summary
    values = [_primary(config, objective, summary), *_second(objective, summary)]
    return TrialOutcome(values, str(run_dir), summary)


def _primary(config: TrainConfig, objective: Objective, summary: dict[str, Any]) -> float:
    if not objective.needs_eval:
        loss = summary.get("eval_loss")
        if loss is None or not math.isfinite(loss):
            raise ConfigError(
                f"{summary.get('run_dir')}: the run reported no eval loss (data.eval_fraction 0?)",
                hint="A study minimises eval loss: give the recipe an eval split, or name a "
                "held-out file under the space's objective.data.",
            )
        return float(loss)
    from loft.core.specs import TrackingSpec
    from loft.evaluate.run import evaluate_model

    report = evaluate_model(
        str(summary["output_path"]),
        str(objective.data),
        metrics=[objective.metric],
        n=objective.n,
        max_new_tokens=objective.max_new_tokens,
        progress=False,
        tracking=TrackingSpec(uri=config.tracking.uri, experiment="eval"),
        source="tune",
    )
    value = float(report.candidate[objective.metric])
    _log_on_run(config, summary.get("mlflow_run_id"), {f"objective/{objective.metric}": value})
    return value


def _second(objective: Objective, summary: dict[str, Any]) -> list[float]:
    if objective.also == "train_seconds":
        return [float(summary.get("train_s") or 0.0)]
    if objective.also == "planner_bytes":
        return [float((summary.get("memory_estimate") or {}).get("total_bytes") or 0)]
    return []


def _log_on_run(config: TrainConfig, run_id: str | None, metrics: dict[str, float]) -> None:
    """Add metrics to the trial's (finished) MLflow run, where it has one."""
    if not run_id:
        return
    from loft.tracking import mlflow_client, resolve_tracking_uri

    client = mlflow_client(resolve_tracking_uri(config.tracking.uri))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


__all__ = ["TrialOutcome", "run_trial"]
