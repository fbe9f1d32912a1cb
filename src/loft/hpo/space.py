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
        if key not in ("params", "fixed", "constraints"):
            problems.append(f"{key}: unknown key (keys: params, fixed, constraints)")
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
    space = Space(params, {str(k): v for k, v in fixed.items()}, fits, budget, str(path))
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


__all__ = ["Param", "Space", "config_key_problem", "load_space"]
