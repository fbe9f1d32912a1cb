"""What a study found: its trials, the best one (or the Pareto front), which parameters mattered,
the best trial's config as a ready YAML, and registering the best trial's model."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loft.core.errors import ConfigError
from loft.hpo.storage import SPEC, load_study, studies_dir, where


@dataclass
class TrialResult:
    number: int
    state: str
    value: float | None  # the first objective
    params: dict[str, Any]
    steps: int | None
    run_dir: str | None
    values: list[float] | None = None
    direction: str = "minimize"
    note: str = ""  # why it was pruned, failed or retried
    retry_of: int | None = None
    owner_pid: int | None = None
    train_tokens: int = 0


@dataclass
class StudyReport:
    name: str
    objective: list[str]
    directions: list[str]
    target: int
    trials: list[TrialResult]
    best: int | None = None  # the best trial on the first objective
    pareto: list[int] = field(default_factory=list)  # multi-objective: the front's trials
    importance: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""
    best_config: str | None = None  # the file written with the best trial's config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(study: Any) -> list[TrialResult]:
    directions = [d.name.lower() for d in study.directions]
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        note = (
            a.get("lost") or a.get("refused") or a.get("error")
            or ("stopped (Ctrl-C)" if a.get("interrupted") else "")
            or ("warm start: the recipe's values" if a.get("warm_start") else "")
        )  # fmt: skip
        values = list(t.values) if t.values is not None else None
        if values is None and t.state.name == "PRUNED" and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            values = [-last if directions[0] == "maximize" else last]  # back to eval loss sign
        out.append(
            TrialResult(
                t.number,
                t.state.name,
                values[0] if values else None,
                dict(t.params),
                a.get("steps"),
                a.get("run_dir"),
                values,
                directions[0],
                str(note),
                a.get("retry_of"),
                (a.get("owner") or {}).get("pid"),
                int(a.get("train_tokens") or 0),
            )
        )
    return out


def best_trial(results: list[TrialResult]) -> TrialResult | None:
    done = [r for r in results if r.state == "COMPLETE" and r.value is not None and r.run_dir]
    if not done:
        return None
    sign = -1.0 if done[0].direction == "maximize" else 1.0
    return min(done, key=lambda r: sign * r.value)


def report(name: str) -> StudyReport:
    """The study's table, best trial (and Pareto front), importance, and the best config file."""
    study = load_study(name)
    spec = study.user_attrs.get(SPEC) or {}
    results = summarize(study)
    directions = [d.name.lower() for d in study.directions]
    out = StudyReport(name, spec.get("objective", ["eval_loss"]), directions,
                      spec.get("target", len(results)), results)  # fmt: skip
    best = best_trial(results)
    if best is not None:
        out.best = best.number
        out.best_config = str(write_best_config(name, spec, best))
    if len(directions) > 1:
        out.pareto = sorted(t.number for t in study.best_trials)
    out.importance, out.importance_note = _importance(study)
    return out


def _importance(study: Any) -> tuple[dict[str, float], str]:
    """Parameter importance (Optuna's default evaluator, PED-ANOVA in 5.x) on the first
    objective, over completed trials."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 3:
        return {}, f"importance needs 3 completed trials; the study has {len(done)}"
    varied = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
    if not varied:
        return {}, "no parameter took two values among the completed trials"
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0  # lower is better to it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its note that lower is better
            imp = optuna.importance.get_param_importances(
                study, target=lambda t: sign * t.values[0], params=sorted(varied)
            )
    except (RuntimeError, ValueError) as e:
        return {}, f"importance: {e}"
    return {k: round(float(v), 4) for k, v in imp.items()}, ""


def trial_values(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's config values {key path: value} from its Optuna params."""
    import optuna

    from loft.hpo.space import load_space

    space = load_space(spec["space"])
    return space.sample(optuna.trial.FixedTrial(params))


def write_best_config(name: str, spec: dict[str, Any], best: TrialResult) -> Path:
    """The recipe file as written, with the space's fixed values and the best trial's values set:
    ``studies/NAME/best.yaml``, ready for ``loft train``."""
    from loft.core.config import read_yaml
    from loft.hpo.space import load_space

    space = load_space(spec["space"])
    doc = read_yaml(Path(spec["recipe"]))
    for key, value in {**space.fixed, **trial_values(spec, best.params)}.items():
        node = doc
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    _absolute_paths(doc, Path(spec["recipe"]).parent)
    path = studies_dir() / name / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"# study {name}, trial {best.number}: {spec.get('objective', ['eval_loss'])[0]} "
        f"{best.value:.6g}\n# the recipe {spec['recipe']} with the trial's values\n"
    )
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False))
    return path


def _absolute_paths(doc: dict[str, Any], base: Path) -> None:
    """Data paths in the recipe are relative to its folder; best.yaml lives elsewhere."""
    data = doc.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str((base / data[key]).resolve())


def register_best(name: str, model_name: str | None = None) -> tuple[str, TrialResult]:
    """Register the best completed trial's model; its lineage names the study and the trial."""
    from loft import registry

    study = load_study(name)
    results = summarize(study)
    best = best_trial(results)
    if best is None:
        raise ConfigError(f"study {name!r} has no completed trial to register")
    spec = study.user_attrs.get(SPEC) or {}
    objective = spec.get("objective", ["eval_loss"])
    lineage = {
        "name": name,
        "trial": best.number,
        "objective": objective[0],
        "value": best.value,
        "params": best.params,
        "trials": len(results),
        "storage": where(name),
    }
    if spec.get("mlflow_run_id"):
        lineage["mlflow_run_id"] = spec["mlflow_run_id"]
    mv = registry.register(best.run_dir, name=model_name or name, study=lineage)
    return f"{mv.name}:{mv.version}", best


__all__ = [
    "StudyReport",
    "TrialResult",
    "best_trial",
    "register_best",
    "report",
    "summarize",
    "trial_values",
    "write_best_config",
]
