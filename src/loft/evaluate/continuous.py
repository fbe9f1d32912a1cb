"""Continuous evaluation: re-measure the version an alias points at and act when it fails its gate.

``check_alias("bot@champion", data, gate)`` evaluates the version behind the alias on ``data``
(metrics: the ones the gate names that ``loft eval`` can measure, unless given), then runs the gate:

- **absolute** checks (``exact_match >= 0.8``) are evaluated on the fresh results;
- **relative** checks (``eval_loss <= champion + 0.02``) compare with the *recorded* metrics of the
  version the alias pointed at before its latest move (the one a rollback would restore). When
  there is no such version, or it has no recorded value for the metric, the check is skipped and
  says why; a skipped check never marks a version degraded;
- a check on a metric this run did not measure (e.g. an lm-eval task) is skipped the same way.

When a check fails the version is marked degraded (``registry.mark_degraded``, reason listing the
failing checks) and, with ``rollback``, the alias moves back to the previous version. Scheduling is
not done here: loft's job system (or cron) calls this periodically; ``loft watch`` is its CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, NotFoundError
from loft.evaluate.gates import Check, CheckResult, evaluate_gate, load_gate
from loft.evaluate.run import GENERATION_SCORERS, LOSS_METRICS, evaluate_model

MEASURABLE = (*LOSS_METRICS, *GENERATION_SCORERS)


def _registry() -> Any:
    import loft.registry as registry

    return registry


def _split_ref(ref: str) -> tuple[str, str]:
    """(name, alias) of ``name@alias``; anything else is refused (a watch follows an alias)."""
    name, sep, alias = ref.partition("@")
    if not sep or not name or not alias:
        raise ConfigError(
            f"{ref!r} is not an alias reference; `loft watch` follows an alias such as "
            "name@champion, so that it can roll that alias back",
            hint="Pass NAME@ALIAS, e.g. bot@champion (see `loft registry show NAME`).",
        )
    return name, alias


def _baseline(name: str, alias: str) -> tuple[int | None, dict[str, float] | None]:
    """The version the alias pointed at before its latest move, and its recorded metrics."""
    from loft.registry.aliases import previous_version

    previous = previous_version(name, alias)
    if previous is None:
        return None, None
    try:
        mv = _registry().get_version(f"{name}:{previous}", verify=False)
    except NotFoundError:
        return previous, None
    return previous, dict(mv.card.get("metrics") or {})


def _skip(check: Check, value: float | None, reason: str) -> CheckResult:
    return CheckResult(check.expr, check.metric, value, None, True, f"skipped: {reason}")


def run_checks(
    checks: list[Check],
    fresh: dict[str, float],
    baseline: dict[str, float] | None,
    baseline_label: str,
) -> list[CheckResult]:
    """Absolute checks on ``fresh``; relative ones against ``baseline`` or skipped (see module)."""
    out: list[CheckResult] = []
    for check in checks:
        value = fresh.get(check.metric)
        if value is None:
            out.append(_skip(check, None, f"{check.metric!r} was not measured by this run"))
        elif check.relative and (baseline is None or check.metric not in baseline):
            why = (
                "no previous version of the alias to compare with"
                if baseline is None
                else f"{baseline_label} has no recorded {check.metric!r}"
            )
            out.append(_skip(check, value, why))
        else:
            out.extend(evaluate_gate([check], fresh, baseline if check.relative else None).checks)
    return out


def check_alias(
    ref: str,
    data: str | Path,
    gate_path: str | Path,
    *,
    rollback: bool = False,
    metrics: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``ref`` (``name@alias``) on ``data`` against the gate in ``gate_path``.

    Returns ``{ref, version, passed, checks, degraded, rolled_back_to, metrics}``: ``degraded`` is
    the reason recorded on the version (None when healthy), ``rolled_back_to`` the version the
    alias now points at after a rollback (None when it did not move).
    """
    name, alias = _split_ref(ref)
    checks = load_gate(gate_path)  # a bad gate fails before any model is loaded
    registry = _registry()
    current = registry.get_version(ref, verify=False)
    label = f"{current.name}:{current.version}"
    wanted = list(metrics) if metrics else [c.metric for c in checks if c.metric in MEASURABLE]
    if not wanted:
        named = ", ".join(sorted({c.metric for c in checks})) or "none"
        raise ConfigError(
            f"{gate_path}: the gate names no metric `loft eval` can measure (it names: {named})",
            hint=f"Gate on one of {', '.join(MEASURABLE)}, or pass metrics explicitly.",
        )
    report = evaluate_model(label, data, metrics=list(dict.fromkeys(wanted)), progress=progress)
    previous, baseline = _baseline(name, alias)
    results = run_checks(checks, report.candidate, baseline, f"{name}:{previous}")
    failed = [c for c in results if not c.passed]
    degraded: str | None = None
    rolled_back_to: int | None = None
    if failed:
        degraded = f"`loft watch {ref}` on {data}: " + "; ".join(
            f"{c.expr} ({c.reason})" for c in failed
        )
        registry.mark_degraded(label, degraded)
        if rollback:
            entry = registry.rollback(name, alias, reason=f"degraded: {degraded}")
            rolled_back_to = int(entry["to"])
    return {
        "ref": ref,
        "version": current.version,
        "passed": not failed,
        "checks": [asdict(c) for c in results],
        "metrics": dict(report.candidate),
        "degraded": degraded,
        "rolled_back_to": rolled_back_to,
    }
