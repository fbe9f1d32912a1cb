"""Continuous evaluation: re-measure the version an alias points at and act when it fails its gate.

``check_alias("bot@champion", data, gate)`` evaluates the version behind the alias on ``data``
(metrics: the ones the gate names that ``loft eval`` can measure, unless given), records the
results on the version, then runs the gate on them:

- **absolute** checks (``exact_match >= 0.8``) are evaluated on the fresh results;
- **relative** checks (``eval_loss <= champion + 0.02``) compare with the version the alias pointed
  at before its latest move (the one a rollback would restore), measured on the same records with
  the same settings: its entry for this data when it has one, else it is evaluated on ``data``
  now. With no such version the check is skipped and says why; a skipped check never marks a
  version degraded;
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
from loft.evaluate.gates import Check, CheckResult, load_gate
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


def _previous(name: str, alias: str) -> tuple[int | None, Any]:
    """The version the alias pointed at before its latest move (and its ModelVersion, None when
    it is no longer in the registry)."""
    from loft.registry.aliases import previous_version

    previous = previous_version(name, alias)
    if previous is None:
        return None, None
    try:
        return previous, _registry().get_version(f"{name}:{previous}", verify=False)
    except NotFoundError:
        return previous, None


def skip_reason(check: Check, measured: Sequence[str], previous: int | None, found: bool) -> str:
    """Why ``check`` is not judged by this watch run ('' when it is)."""
    if check.metric not in measured:
        return f"{check.metric!r} was not measured by this run"
    if check.relative and previous is None:
        return "no previous version of the alias to compare with"
    if check.relative and not found:
        return f"the previous version {previous} is no longer in the registry"
    return ""


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
    from loft.evaluate.promotion import gate_on_entries

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
    wanted = list(dict.fromkeys(wanted))
    report = evaluate_model(label, data, metrics=wanted, progress=progress, source="watch")
    current = registry.get_version(label, verify=False)  # now holding the fresh entries
    previous, before = _previous(name, alias)
    skips = [skip_reason(c, list(report.candidate), previous, before is not None) for c in checks]
    judged = [c for c, why in zip(checks, skips, strict=True) if not why]
    rows = iter(gate_on_entries(judged, current, before, progress=progress, source="watch").checks)
    results = [
        CheckResult(c.expr, c.metric, report.candidate.get(c.metric), None, True, f"skipped: {why}")
        if why
        else next(rows)
        for c, why in zip(checks, skips, strict=True)
    ]
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
