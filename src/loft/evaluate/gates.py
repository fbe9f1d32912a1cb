"""Gates: metric thresholds a candidate must meet before an alias moves to it. Pure; no torch.

A gate is a list of expressions ``METRIC OP RHS`` with OP one of ``>= <= > < ==`` and RHS a number
(``exact_match >= 0.8``) or relative to the current champion's value of the same metric
(``eval_loss <= champion + 0.02``, ``rouge_l >= champion - 0.01``, ``exact_match >= champion``).
With no champion yet, relative checks pass. A gate file is YAML with ``gate:`` at the top level::

    gate:
      - eval_loss <= champion + 0.02
      - json_exact_match >= 0.8

Every bad expression is reported at once, each with its ``FILE:LINE``.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loft.core.errors import ConfigError, NotFoundError

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
NEGATED = {">=": "<", "<=": ">", ">": "<=", "<": ">=", "==": "!="}

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_EXPR_RE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.\-/]*)\s*(?P<op>>=|<=|==|>|<)\s*(?P<rhs>.*?)\s*$"
)
_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
_CHAMPION_RE = re.compile(rf"^champion(?:\s*(?P<sign>[+-])\s*(?P<offset>{_NUMBER}))?$")

SYNTAX_HINT = (
    "Write each check as `METRIC OP VALUE` with OP one of >=, <=, >, <, ==, and VALUE a number, "
    "`champion`, `champion + X` or `champion - X`; e.g. `exact_match >= 0.8` or "
    "`eval_loss <= champion + 0.02`."
)


@dataclass(frozen=True)
class Check:
    """One parsed gate expression. ``relative``: ``threshold`` = champion value + ``offset``."""

    expr: str
    metric: str
    op: str
    value: float = 0.0
    relative: bool = False
    offset: float = 0.0

    def threshold(self, champion: Mapping[str, float] | None) -> float | None:
        """The number the candidate is compared with; None when it needs an absent champion."""
        if not self.relative:
            return self.value
        if champion is None or self.metric not in champion:
            return None
        return float(champion[self.metric]) + self.offset


@dataclass(frozen=True)
class CheckResult:
    expr: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str


@dataclass
class GateResult:
    """Every check's outcome; ``passed`` when all passed (an empty gate passes)."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def to_dicts(self) -> list[dict[str, Any]]:
        """Rows ``{expr, metric, value, threshold, passed, reason}``, as alias history records."""
        return [asdict(c) for c in self.checks]


def _parse_one(expr: Any) -> tuple[Check | None, str | None]:
    if not isinstance(expr, str):
        return None, f"expected a string like `exact_match >= 0.8`, got {type(expr).__name__}"
    m = _EXPR_RE.match(expr)
    if m is None:
        return None, f"cannot parse {expr!r}: expected `METRIC OP VALUE`"
    metric, op, rhs = m["metric"], m["op"], m["rhs"]
    if _NUMBER_RE.match(rhs):
        value = float(rhs)
        if not math.isfinite(value):
            return None, f"{expr!r}: threshold {rhs!r} is not a finite number"
        return Check(expr=expr.strip(), metric=metric, op=op, value=value), None
    c = _CHAMPION_RE.match(rhs)
    if c is None:
        return None, (
            f"{expr!r}: right-hand side {rhs!r} is neither a number nor "
            "`champion`, `champion + X`, `champion - X`"
        )
    offset = float(c["offset"]) if c["offset"] else 0.0
    if c["sign"] == "-":
        offset = -offset
    return Check(expr=expr.strip(), metric=metric, op=op, relative=True, offset=offset), None


def _raise(problems: list[str], what: str) -> None:
    raise ConfigError(
        f"{what}: {len(problems)} bad gate expression(s):\n" + "\n".join(problems),
        hint=SYNTAX_HINT,
    )


def _parse_all(located: Iterable[tuple[str, Any]], what: str) -> list[Check]:
    """Parse every ``(where, expr)``; report all bad ones together, each at its ``where``."""
    checks: list[Check] = []
    problems: list[str] = []
    for where, expr in located:
        check, why = _parse_one(expr)
        if check is None:
            problems.append(f"  {where}: {why}")
        else:
            checks.append(check)
    if problems:
        _raise(problems, what)
    return checks


def parse_gate(exprs: list[str], source: str = "gate") -> list[Check]:
    """Parse gate expressions; all bad ones are reported together as ``source[i]: why``."""
    if not isinstance(exprs, list):
        raise ConfigError(
            f"{source}: a gate is a list of expressions, got {type(exprs).__name__}",
            hint=SYNTAX_HINT,
        )
    return _parse_all(((f"{source}[{i}]", e) for i, e in enumerate(exprs)), source)


def load_gate(path: str | Path) -> list[Check]:
    """Read ``gate:`` from a YAML file (a standalone gate or a config that holds one)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(
            f"gate file not found: {path}",
            hint="Pass a YAML file whose top level has `gate:` with a list of expressions.",
        )
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({e})", hint="Fix the YAML syntax.") from None
    gate_node = None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "gate":
                gate_node = value
    if gate_node is None:
        raise ConfigError(
            f"{path}: no top-level `gate:` key",
            hint="Write `gate:` followed by a list, e.g.\ngate:\n  - exact_match >= 0.8",
        )
    where = f"{path}:{gate_node.start_mark.line + 1}"
    if not isinstance(gate_node, yaml.SequenceNode):
        raise ConfigError(f"{where}: `gate:` must be a list of expressions", hint=SYNTAX_HINT)
    values = yaml.safe_load(text)["gate"]  # the same document, as Python values
    located = (
        (f"{path}:{item.start_mark.line + 1}", expr)
        for item, expr in zip(gate_node.value, values, strict=True)
    )
    return _parse_all(located, str(path))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _evaluate_one(
    check: Check, candidate: Mapping[str, float], champion: Mapping[str, float] | None
) -> CheckResult:
    def row(value: float | None, threshold: float | None, passed: bool, reason: str):
        return CheckResult(check.expr, check.metric, value, threshold, passed, reason)

    if check.metric not in candidate:
        return row(None, check.threshold(champion), False, unmeasured(check.metric, candidate))
    value = float(candidate[check.metric])
    if check.relative and champion is None:
        return row(value, None, True, "no champion yet")
    threshold = check.threshold(champion)
    if threshold is None:
        present = ", ".join(sorted(champion or {})) or "none"
        return row(
            value,
            None,
            False,
            f"the champion has no recorded {check.metric!r} (metrics present: {present}); "
            f"evaluate the champion with --metrics {check.metric}",
        )
    passed = not math.isnan(value) and OPS[check.op](value, threshold)
    shown_op = check.op if passed else NEGATED[check.op]
    basis = f" (champion {_fmt(threshold - check.offset)}" if check.relative else ""
    if basis:
        basis += f" {'+' if check.offset >= 0 else '-'} {_fmt(abs(check.offset))})"
    reason = f"{_fmt(value)} {shown_op} {_fmt(threshold)}{basis}"
    return row(value, threshold, passed, reason)


# what loft can measure, for did-you-mean and for naming the command that measures a metric
LOSS_METRICS = ("eval_loss", "perplexity")
AUDIT_METRICS = ("canary_exposure_mean", "canary_exposure_max", "canaries_memorised")


def unmeasured(metric: str, present: Iterable[str]) -> str:
    """Why a gate metric has no value, and what would give it one (or what was meant)."""
    from loft.evaluate.scorers import SCORERS

    present = sorted(present)
    measurable = (*LOSS_METRICS, *SCORERS)
    known = sorted({*present, *measurable, *AUDIT_METRICS})
    shown = ", ".join(present) or "none"
    close = difflib.get_close_matches(metric, [k for k in known if k != metric], n=1, cutoff=0.75)
    if close and metric not in known:
        return (
            f"{metric!r} was not measured for the candidate — did you mean {close[0]!r}? "
            f"(metrics present: {shown})"
        )
    if metric in measurable:
        how = f"run `loft eval REF --data FILE --metrics {metric}`"
    elif metric in AUDIT_METRICS:
        how = "run `loft audit canaries REF`"
    elif "/" in metric:
        how = f"run `loft eval REF --data FILE --lm-eval {metric.split('/')[0]}`"
    else:
        how = (
            f"it is none of loft's metrics ({', '.join(measurable)}); a custom scorer's metric "
            f"comes from `loft eval REF --data FILE --scorer MODULE:{metric}`"
        )
    return f"{metric!r} was not measured for the candidate (metrics present: {shown}); {how}"


def evaluate_gate(
    checks: list[Check],
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
) -> GateResult:
    """Run every check against ``candidate``'s metrics (``champion``: None when there is none)."""
    return GateResult([_evaluate_one(c, candidate, champion) for c in checks])
