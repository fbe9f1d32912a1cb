"""Gated promotion: move an alias only when the candidate passes the gate on like-for-like numbers.

The gate comes from a file (``gate:`` list) or, when none is given, from the candidate's own
training config (``gate:`` key). Numbers come from the versions' evaluation entries (see
:mod:`loft.registry.evaluations`):

- an absolute check (``json_exact_match >= 0.8``) reads the candidate's newest value of the metric
  and says what it was measured on;
- a relative check (``eval_loss <= champion + 0.02``) takes the candidate's newest value of the
  metric and needs the version the alias points at now measured on the same basis (same records,
  same settings). When the champion has no such entry and the candidate's was scored on a file
  that is still there unchanged, the champion is evaluated on it now (and the entry recorded);
  otherwise the check fails and says why. With no champion yet, relative checks pass.

``force`` moves the alias whatever the gate says and is recorded as forced, with the gate's
results (when it has checks) and whether they passed. Every outcome is in the model's history
and the audit trail: ``registry.promote`` (``forced``, ``passed``, the checks) or
``registry.promote_refused`` (the checks; nothing moved).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, GateRefused, LoftError, NotFoundError
from loft.evaluate.gates import (
    Check,
    CheckResult,
    GateResult,
    evaluate_gate,
    load_gate,
    parse_gate,
)
from loft.registry.evaluations import describe

NO_MEASURING = (
    "this promotion does not load models (the portal never does); run `loft registry promote` "
    "or `loft eval` on the champion first"
)


@dataclass
class Promotion:
    name: str
    alias: str
    version: int
    previous: int | None
    moved: bool
    forced: bool
    gate: GateResult
    source: str
    entry: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "version": self.version,
            "previous": self.previous,
            "moved": self.moved,
            "forced": self.forced,
            "passed": self.gate.passed,
            "gate_source": self.source,
            "checks": self.gate.to_dicts(),
        }


def _checks_for(
    mv: Any, gate_path: str | Path | None, gate: list[str] | None = None
) -> tuple[list[Check], str]:
    if gate is not None:
        return parse_gate(list(gate), source="gate"), "given"
    if gate_path is not None:
        return load_gate(gate_path), str(gate_path)
    exprs = ((mv.card.get("lineage") or {}).get("config") or {}).get("gate") or []
    return parse_gate(list(exprs), source=f"{mv.name}:{mv.version} config gate"), "config"


def promote(
    ref: str,
    *,
    to: str = "champion",
    gate_path: str | Path | None = None,
    force: bool = False,
    reason: str = "",
    progress: bool = False,
    gate: list[str] | None = None,
    actor: str | None = None,
    measure: bool = True,
    context: dict | None = None,
) -> Promotion:
    """Run the gate on ``ref`` against the version holding ``to``; move ``to`` when it passes
    (or ``force``).

    ``gate`` (expressions, as a gate file's ``gate:`` list) replaces ``gate_path`` and the
    config gate; ``actor`` is who the history and audit trail record (default the OS user) and
    ``context`` goes into the audit entry (the portal's ``{"via", "ip"}``); ``measure=False``
    never loads a model to measure the champion (the portal, which imports no torch): such a
    check fails as not comparable, saying what to evaluate. ``force`` moves the alias even when
    the gate fails, recorded as forced (with the checks, when there are any).

    Raises GateRefused (exit code 3) when the gate fails and ``force`` is not set; the refusal
    carries the result so callers can print every check. A bare NAME (no version) or a version
    that already holds the alias is refused (ConfigError): that move would change nothing.
    """
    from loft.registry import get_version, move_alias, parse_ref
    from loft.registry.aliases import record_refusal

    name, alias, version = parse_ref(ref)
    if alias is None and version is None:
        raise ConfigError(
            f"{ref!r} names no version; promote moves @{to} to one specific version.",
            hint=f"Name it: `loft registry promote {name}:VERSION` (versions: "
            f"`loft registry show {name}`).",
        )
    mv = get_version(ref, verify=True)  # a tampered candidate is never promoted
    checks, source = _checks_for(mv, gate_path, gate)
    try:
        current = get_version(f"{name}@{to}", verify=False)
    except NotFoundError:  # no version holds the alias yet
        current = None
    if current is not None and current.version == mv.version:
        raise ConfigError(
            f"{name}:{mv.version} already holds @{to}; there is nothing to promote.",
            hint=f"See the history with `loft registry history {name}`.",
        )
    result = gate_on_entries(checks, mv, current, progress=progress, measure=measure)
    previous = current.version if current is not None else None
    promo = Promotion(name, to, mv.version, previous, False, False, result, source)
    if not result.passed and not force:
        promo.entry = record_refusal(
            name, to, mv.version, previous, reason=reason, gate=result.to_dicts(),
            gate_source=source, actor=actor, context=context,
        )  # fmt: skip
        raise GateRefused(
            f"gate refused {name}:{mv.version} → @{to}: "
            + "; ".join(f"{c.expr} ({c.reason})" for c in result.failed),
            promotion=promo,
            hint="Improve the candidate, or pass --force to move the alias anyway (recorded).",
        )
    promo.entry = move_alias(
        name, to, mv.version, reason=reason or _why(result, force), gate=result.to_dicts(),
        forced=force, actor=actor, context=context,
        extra={"passed": result.passed, "gate_source": source},
    )  # fmt: skip
    promo.moved, promo.forced = True, force
    return promo


def _why(result: GateResult, force: bool) -> str:
    """What the history says when the user gave no reason."""
    if not force:
        return "gate passed" if result.checks else "gate passed (it has no checks)"
    if not result.checks:
        return "forced (the gate has no checks)"
    return "forced (the gate passed)" if result.passed else "forced past a failing gate"


# ----------------------------------------------------------------------------- like with like


def _label(mv: Any) -> str:
    return f"{mv.name}:{mv.version}"


def reproducible(on: Mapping[str, Any]) -> str | None:
    """Why a held-out measurement cannot be repeated now (None when it can): its file must
    still hold the same records."""
    from loft.evaluate.run import read_eval_records
    from loft.registry.evaluations import records_fingerprint

    if on.get("kind") != "data":
        return f"it was measured on the {describe(on)}, which only training produces"
    path = Path(str(on.get("path")))
    if not path.is_file():
        return f"{path} is gone"
    try:
        records = read_eval_records(path, int(on["records"]))
    except LoftError as e:
        return f"{path} no longer reads ({e.message})"
    if len(records) != on["records"] or records_fingerprint(records) != on["fingerprint"]:
        return f"{path} has changed since"
    return None


def measure_missing(
    candidate: list[Mapping[str, Any]],
    other: Any,
    metrics: list[str],
    *,
    source: str,
    progress: bool = False,
) -> dict[str, str]:
    """Evaluate ``other`` (a registry version) on the data of the candidate's newest entry of
    each metric it has no comparable entry for; returns {metric: why not} for what it could not
    measure. Metrics scored on the same records share one evaluation (one model load)."""
    from loft.evaluate.run import evaluate_model
    from loft.registry.evaluations import comparable, entries_of, latest

    have = entries_of(other.card)
    # (path, fingerprint, records, max_new_tokens or None for loss metrics) -> metrics
    groups: dict[tuple[str, str, int, int | None], list[str]] = {}
    why_not: dict[str, str] = {}
    for metric in dict.fromkeys(metrics):
        newest = latest(candidate, metric)
        if newest is None or comparable(newest, have) is not None:
            continue
        on = newest["on"]
        why = reproducible(on)
        if why is not None:
            why_not[metric] = why
            continue
        tokens = (on.get("settings") or {}).get("max_new_tokens")
        groups.setdefault((on["path"], on["fingerprint"], on["records"], tokens), []).append(metric)
    for key in [k for k in groups if k[3] is None]:  # loss metrics ride with a generation run
        ride = next((k for k in groups if k[:3] == key[:3] and k[3] is not None), None)
        if ride is not None:
            groups[ride] += groups.pop(key)
    for (path, _fp, n, tokens), wanted in groups.items():
        evaluate_model(
            _label(other), path, metrics=wanted, n=n, max_new_tokens=tokens or 64,
            progress=progress, source=source,
        )  # fmt: skip
    return why_not


def gate_on_entries(
    checks: list[Check],
    candidate: Any,
    champion: Any | None,
    *,
    progress: bool = False,
    source: str = "gate",
    measure: bool = True,
) -> GateResult:
    """Every check on evaluation entries (see the module docstring); champion measurements this
    needs are recorded with ``source`` (with ``measure=False`` none are taken)."""
    from loft.registry import get_version
    from loft.registry.evaluations import comparable, entries_of, latest

    cand = entries_of(candidate.card)
    champ: list[Mapping[str, Any]] | None = None
    why_not: dict[str, str] = {}
    if champion is not None:
        relative = [c.metric for c in checks if c.relative and latest(cand, c.metric)]
        if measure:
            why_not = measure_missing(cand, champion, relative, source=source, progress=progress)
        else:
            why_not = dict.fromkeys(relative, NO_MEASURING)
        champ = entries_of(get_version(_label(champion), verify=False).card)
    rows: list[CheckResult] = []
    for check in checks:
        newest = latest(cand, check.metric)
        if newest is None or not check.relative or champ is None:
            values = {check.metric: newest["value"]} if newest is not None else {}
            (row,) = evaluate_gate([check], values, None).checks
            rows.append(_on(row, newest))
            continue
        theirs = comparable(newest, champ)
        if theirs is None:
            rows.append(_not_comparable(check, newest, champ, champion, why_not))
            continue
        (row,) = evaluate_gate(
            [check], {check.metric: newest["value"]}, {check.metric: theirs["value"]}
        ).checks
        rows.append(_on(row, newest))
    return GateResult(rows)


def _on(row: CheckResult, entry: Mapping[str, Any] | None) -> CheckResult:
    if entry is None:
        return row
    return replace(row, reason=f"{row.reason} on {describe(entry['on'])}")


def _not_comparable(
    check: Check,
    newest: Mapping[str, Any],
    champ: list[Mapping[str, Any]],
    champion: Any,
    why_not: dict[str, str],
) -> CheckResult:
    theirs = [describe(e["on"]) for e in champ if e["metric"] == check.metric]
    has = f"only on {'; '.join(dict.fromkeys(theirs))}" if theirs else "no measurement"
    reason = (
        f"not comparable: the candidate's {check.metric} was measured on "
        f"{describe(newest['on'])}; {_label(champion)} has {has}"
    )
    if check.metric in why_not:
        reason += f", and it cannot be measured there now: {why_not[check.metric]}"
    reason += (
        f". Evaluate both on the same file: `loft eval {_label(champion)} --data FILE "
        f"--metrics {check.metric}` and the same for the candidate"
    )
    return CheckResult(check.expr, check.metric, float(newest["value"]), None, False, reason)
