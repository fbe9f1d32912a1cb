"""The search space of a study: ranges over training-config key paths, read from a YAML file.

    params:                                   # what the study samples, by config key path
      training.lr: {float: [1.0e-4, 3.0e-3], log: true}
      lora.r: {int: [4, 32], step: 4}
      training.warmup_ratio: {choices: [0.0, 0.05, 0.1]}
      lora.alpha: {multiple_of: lora.r, choices: [1, 2]}   # alpha = r x a sampled factor
    fixed:                                    # overrides every trial gets
      training.max_steps: 60
    constraints:
      fits_device: true                       # the planner's estimate must fit (default)
      budget: {tokens: 2000000}               # or {seconds: 3600}: the study stops there
    objective:                                # default: the run's own eval loss, minimised
      metric: json_exact_match                # any `loft eval` metric, on `data`
      data: heldout.jsonl                     # relative to this file
      n: 50                                   # records scored (default all)
      also: train_seconds                     # a second objective (minimised): Pareto front

Each entry samples through Optuna's ``suggest_*`` API (any object with ``suggest_float``,
``suggest_int`` and ``suggest_categorical``: an ``optuna.Trial``, or ``optuna.trial.FixedTrial``
to replay a point). A trial's config is the recipe with ``fixed`` and the sampled values applied as
``--set`` overrides, validated like any training config.

:func:`load_space` reports every problem at once, each with its key path: unknown keys, a config
key path the training config does not have, a bad range, a ``multiple_of`` naming a parameter
that is not sampled, and a range whose ends the training config itself refuses (checked by
validating the recipe at each end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loft.core.config import load_config, read_yaml
from loft.core.errors import ConfigError
from loft.core.specs import TrainConfig

KINDS = ("float", "int", "choices", "multiple_of")
BUDGETS = ("tokens", "seconds")
SECOND_OBJECTIVES = ("train_seconds", "planner_bytes")
SECTIONS = ("params", "fixed", "constraints", "objective")


@dataclass(frozen=True)
class Objective:
    """What a trial is scored on. ``eval_loss`` without ``data`` is the run's own eval split (the
    pruner's signal too); any other metric is ``loft eval`` of the trained model on ``data``."""

    metric: str = "eval_loss"
    data: str | None = None
    direction: str = "minimize"
    n: int | None = None
    max_new_tokens: int = 64
    also: str | None = None  # a second objective, minimised: train_seconds | planner_bytes

    @property
    def directions(self) -> list[str]:
        return [self.direction, *(["minimize"] if self.also else [])]

    @property
    def names(self) -> list[str]:
        return [self.metric, *([self.also] if self.also else [])]

    @property
    def needs_eval(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class Param:
    path: str  # config key path, e.g. training.lr
    kind: str  # float | int | choices | multiple_of
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    of: str | None = None  # multiple_of: the sampled parameter this one multiplies

    def ends(self) -> list[Any]:
        """The extreme values this entry can give on its own (for validation)."""
        if self.kind in ("float", "int"):
            return [self.low, self.high]
        return list(self.choices)


@dataclass
class Space:
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    fits_device: bool = True
    budget: dict[str, float] = field(default_factory=dict)
    source: str = "space"
    objective: Objective = field(default_factory=Objective)

    def sample(self, trial: Any) -> dict[str, Any]:
        """{key path: value} for one trial, in the file's order (a multiple after its base)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "float":
                out[p.path] = trial.suggest_float(p.path, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                out[p.path] = trial.suggest_int(
                    p.path, int(p.low), int(p.high), log=p.log, step=int(p.step or 1)
                )
            elif p.kind == "choices":
                out[p.path] = trial.suggest_categorical(p.path, list(p.choices))
            else:
                factor = trial.suggest_categorical(f"{p.path}/{p.of}", list(p.choices))
                out[p.path] = out.get(p.of, self.fixed.get(p.of)) * factor
        return out

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """``--set`` strings: the fixed overrides, then the sampled values."""
        merged = {**self.fixed, **values}
        return [f"{k}={_flow(v)}" for k, v in merged.items()]

    def trial_config(self, recipe: Path, values: dict[str, Any]) -> TrainConfig:
        return load_config(recipe, self.overrides(values))

    def grid(self) -> dict[str, list[Any]]:
        """Every point's values by Optuna parameter name, for a grid search: choices as they are,
        int ranges by their step, float ranges only with a step."""
        out: dict[str, list[Any]] = {}
        bad: list[str] = []
        for p in self.params:
            if p.kind == "choices":
                out[p.path] = list(p.choices)
            elif p.kind == "multiple_of":
                out[f"{p.path}/{p.of}"] = list(p.choices)
            elif p.kind == "int" and not p.log:
                out[p.path] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
            elif p.kind == "float" and p.step and not p.log:
                n = int(math.floor((p.high - p.low) / p.step + 1e-9))
                out[p.path] = [round(p.low + i * p.step, 12) for i in range(n + 1)]
            else:
                bad.append(f"params.{p.path}: a {'log ' if p.log else ''}{p.kind} range")
        if bad:
            raise ConfigError(
                f"{self.source}: a grid needs a finite set of values; "
                + "; ".join(bad)
                + " has none.",
                hint="Give those entries {choices: [...]} (or a step, without log) for "
                "--sampler grid, or use tpe, gp or random.",
            )
        return out


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**9)
        .strip()
        .removesuffix("...")
        .strip()
    )


def config_key_problem(path: str) -> str | None:
    """Why ``path`` is not a key path of the training config, or None."""
    from pydantic import BaseModel

    model: type[BaseModel] = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            return f"{where} has no key {part!r} (keys: {', '.join(sorted(fields))})"
        if i < len(parts) - 1:
            ann = fields[part].annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return f"{'.'.join(parts[: i + 1])} is not a mapping"
            model = ann
    return None


def load_space(path: str | Path, recipe: str | Path | None = None) -> Space:
    """Read and check a space file; with ``recipe``, also check each range's ends against it."""
    path = Path(path)
    doc = read_yaml(path)
    problems: list[str] = []
    for key in doc:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown key (keys: {', '.join(SECTIONS)})")
    raw = doc.get("params") or {}
    if not isinstance(raw, dict) or not raw:
        problems.append("params: expected a mapping of config key paths to ranges")
        raw = {}
    params: list[Param] = []
    for key, spec in raw.items():
        p, bad = _param(str(key), spec)
        problems += [f"params.{key}: {b}" for b in bad]
        if p is not None:
            params.append(p)
    sampled = [p.path for p in params]
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        problems.append("fixed: expected a mapping of config key paths to values")
        fixed = {}
    for key in fixed:
        why = config_key_problem(str(key))
        if why:
            problems.append(f"fixed.{key}: {why}")
        if key in sampled:
            problems.append(f"fixed.{key}: also under params; a key is either sampled or fixed")
    for p in params:  # a multiple of a key sampled before it, or of a fixed one
        if p.kind == "multiple_of" and not (
            p.of in sampled[: sampled.index(p.path)] or _number(fixed.get(p.of))
        ):
            problems.append(
                f"params.{p.path}.multiple_of: {p.of!r} is neither sampled before it nor a fixed "
                "number"
            )
    cons = doc.get("constraints") or {}
    fits, budget = True, {}
    if not isinstance(cons, dict):
        problems.append("constraints: expected a mapping (fits_device, budget)")
        cons = {}
    for key, value in cons.items():
        if key == "fits_device":
            if not isinstance(value, bool):
                problems.append(f"constraints.fits_device: got {value!r}: true or false")
            fits = bool(value)
        elif key == "budget":
            budget, bad = _budget(value)
            problems += [f"constraints.budget{b}" for b in bad]
        else:
            problems.append(f"constraints.{key}: unknown key (keys: fits_device, budget)")
    objective, bad = _objective(doc.get("objective"), path)
    problems += bad
    space = Space(params, {str(k): v for k, v in fixed.items()}, fits, budget, str(path), objective)
    if recipe is not None and not problems:
        problems += _against_recipe(space, Path(recipe))
    if problems:
        raise ConfigError(
            f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the search "
            "space:\n" + "\n".join(f"  {p}" for p in problems),
            hint="Each params entry is {float: [low, high]}, {int: [low, high]}, {choices: [...]}"
            " or {multiple_of: KEY, choices: [...]}; see README 'Hyperparameter search'.",
        )
    return space


def _param(path: str, spec: Any) -> tuple[Param | None, list[str]]:
    bad: list[str] = []
    why = config_key_problem(path)
    if why:
        bad.append(why)
    if not isinstance(spec, dict):
        return None, [
            *bad,
            f"expected a mapping such as {{float: [1e-4, 1e-3], log: true}}, got {spec!r}",
        ]
    kinds = ["multiple_of"] if "multiple_of" in spec else [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        return None, [
            *bad,
            f"name exactly one of {', '.join(KINDS)} (got {sorted(spec) or 'none'})",
        ]
    kind = kinds[0]
    allowed = {"float": {"float", "log", "step"}, "int": {"int", "log", "step"},
               "choices": {"choices"}, "multiple_of": {"multiple_of", "choices"}}[kind]  # fmt: skip
    bad += [
        f"{k}: unknown key for a {kind} entry (keys: {', '.join(sorted(allowed))})"
        for k in spec
        if k not in allowed
    ]
    log, step = spec.get("log", False), _as_number(spec.get("step"))
    if not isinstance(log, bool):
        bad.append(f"log: got {log!r}: true or false")
    if kind in ("float", "int"):
        rng = spec[kind]
        if isinstance(rng, list):  # PyYAML reads 1e-4 (no dot) as a string: take it as meant
            rng = [_as_number(x) for x in rng]
        if not (isinstance(rng, list) and len(rng) == 2 and all(_number(x) for x in rng)):
            return None, [*bad, f"{kind}: expected [low, high], got {spec[kind]!r}"]
        low, high = rng
        if kind == "int" and not all(float(x).is_integer() for x in rng):
            bad.append(f"int: [low, high] must be integers, got {rng!r}")
        if not low < high:
            bad.append(f"{kind}: low {low} must be below high {high}")
        if log and low <= 0:
            bad.append(f"{kind}: a log range needs low > 0, got {low}")
        if step is not None and (not _number(step) or step <= 0 or log):
            bad.append(f"step: got {step!r}: a positive number, and not with log: true")
        return Param(path, kind, float(low), float(high), bool(log), step), bad
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        return None, [*bad, "choices: expected a non-empty list"]
    if kind == "multiple_of":
        of = spec["multiple_of"]
        if not all(_number(c) for c in choices):
            bad.append(f"choices: factors must be numbers, got {choices!r}")
        return Param(path, kind, choices=tuple(choices), of=str(of)), bad
    return Param(path, kind, choices=tuple(choices)), bad


def _as_number(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _budget(value: Any) -> tuple[dict[str, float], list[str]]:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGETS:
        return {}, [f": expected {{tokens: N}} or {{seconds: N}}, got {value!r}"]
    ((kind, n),) = value.items()
    if not _number(n) or n <= 0:
        return {}, [f".{kind}: got {n!r}: a positive number"]
    return {kind: float(n)}, []


def _objective(doc: Any, path: Path) -> tuple[Objective, list[str]]:
    if doc is None:
        return Objective(), []
    keys = ("metric", "data", "direction", "n", "max_new_tokens", "also")
    if not isinstance(doc, dict):
        return Objective(), [f"objective: expected a mapping ({', '.join(keys)}), got {doc!r}"]
    bad = [f"objective.{k}: unknown key (keys: {', '.join(keys)})" for k in doc if k not in keys]
    metric = str(doc.get("metric", "eval_loss"))
    if metric != "eval_loss":
        from loft.evaluate.run import metric_problem

        if why := metric_problem(metric):
            bad.append(f"objective.metric: {why}")
    data = doc.get("data")
    if data is not None:
        p = Path(str(data))
        p = p if p.is_absolute() else (path.resolve().parent / p)
        if not p.is_file():
            bad.append(f"objective.data: {p} is not a file")
        data = str(p.resolve())
    elif metric != "eval_loss":
        bad.append(f"objective.data: metric {metric!r} is measured on a held-out file; name it")
    lower = metric in ("eval_loss", "perplexity")
    direction = doc.get("direction", "minimize" if lower else "maximize")
    if direction not in ("minimize", "maximize"):
        bad.append(f"objective.direction: got {direction!r}: minimize or maximize")
    n = doc.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        bad.append(f"objective.n: got {n!r}: a positive whole number of records")
    mnt = doc.get("max_new_tokens", 64)
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
        bad.append(f"objective.max_new_tokens: got {mnt!r}: a positive whole number")
    also = doc.get("also")
    if also is not None and also not in SECOND_OBJECTIVES:
        bad.append(f"objective.also: got {also!r}: one of {', '.join(SECOND_OBJECTIVES)}")
    return Objective(metric, data, str(direction), n, int(mnt) if isinstance(mnt, int) else 64,
                     also), bad  # fmt: skip


def _against_recipe(space: Space, recipe: Path) -> list[str]:
    """Each range's ends applied to the recipe one at a time, validated as a training config."""
    problems = []
    base = {p.path: _first(p) for p in space.params}
    for p in space.params:
        if p.kind == "multiple_of":
            continue
        for end in p.ends():
            values = {**base, p.path: int(end) if p.kind == "int" else end}
            for q in space.params:
                if q.kind == "multiple_of":
                    values[q.path] = values.get(q.of, space.fixed.get(q.of)) * q.choices[0]
            try:
                space.trial_config(recipe, values)
            except ConfigError as e:
                lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
                detail = (
                    "; ".join(ln for ln in lines if ln.startswith(p.path)) or lines[0]
                    if lines
                    else str(e)
                )
                problems.append(
                    f"params.{p.path}: at {end!r} the training config refuses it ({detail})"
                )
    return problems


def _first(p: Param) -> Any:
    if p.kind == "float":
        return p.low
    if p.kind == "int":
        return int(p.low)
    return p.choices[0]


__all__ = ["Objective", "Param", "Space", "config_key_problem", "load_space"]
