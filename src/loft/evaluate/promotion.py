"""Gated promotion: move an alias only when the candidate's recorded metrics pass the gate.

The gate comes from a file (``gate:`` list) or, when none is given, from the candidate's own
training config (``gate:`` key). Relative checks compare with the version the alias points at now;
with no such version yet they pass. ``force`` moves the alias anyway and is recorded as forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import GateRefused
from loft.evaluate.gates import Check, GateResult, evaluate_gate, load_gate, parse_gate


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


def _checks_for(mv: Any, gate_path: str | Path | None) -> tuple[list[Check], str]:
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
) -> Promotion:
    """Run the gate on ``ref``'s recorded metrics; move ``to`` when it passes (or ``force``).

    Raises GateRefused (exit code 3) when the gate fails and ``force`` is not set; the refusal
    carries the result so callers can print every check.
    """
    from loft.registry import get_version, move_alias, parse_ref

    name, _, _ = parse_ref(ref)
    mv = get_version(ref, verify=True)  # a tampered candidate is never promoted
    checks, source = _checks_for(mv, gate_path)
    try:
        current = get_version(f"{name}@{to}", verify=False)
    except Exception:  # no version holds the alias yet
        current = None
    champion = dict(current.card.get("metrics") or {}) if current is not None else None
    result = evaluate_gate(checks, dict(mv.card.get("metrics") or {}), champion)
    previous = current.version if current is not None else None
    promo = Promotion(name, to, mv.version, previous, False, False, result, source)
    if not result.passed and not force:
        raise GateRefused(
            f"gate refused {name}:{mv.version} → @{to}: "
            + "; ".join(f"{c.expr} ({c.reason})" for c in result.failed),
            promotion=promo,
            hint="Improve the candidate, or pass --force to move the alias anyway (recorded).",
        )
    why = reason or ("forced past a failing gate" if not result.passed else "gate passed")
    promo.entry = move_alias(
        name, to, mv.version, reason=why, gate=result.to_dicts(), forced=not result.passed
    )
    promo.moved, promo.forced = True, not result.passed
    return promo
