"""Gradual rollout: a candidate version takes a growing share of a model's live traffic, one step
at a time, while a gate holds on the live comparison with the champion.

``start`` puts the candidate on the first step's share (a weighted, sticky split of the bare
model name, see :mod:`loft.registry.splits`); the champion keeps the rest. ``tick`` (run on a
schedule by ``loft worker``, or by hand) decides once each step's interval has passed:

- both arms' live metrics over the step's window come from the server's audit log: ``requests``,
  ``errors`` and ``error_rate`` (status >= 500), ``latency_p50_ms`` and ``latency_p95_ms``,
  ``feedback`` and ``feedback_score`` (the mean of scores posted to ``/v1/feedback``), and with
  ``log_prompts`` on, ``json_valid`` (the share of completions holding a JSON object) and the mean
  of any scorer given (``module.path:function``, called as ``function(completion, prompt)``,
  named after the function);
- the gate (``loft.evaluate.gates`` expressions: ``error_rate <= champion + 0.01``,
  ``requests >= 50``) runs on them, the candidate against the champion;
- while either arm has fewer than ``min_requests`` requests, or a metric the gate names is not
  measured yet (no feedback so far), the step waits; after ``max_wait`` intervals without data it
  is aborted, since a rollout nobody uses must not hold a split forever;
- a failing gate aborts: the split is cleared, every request goes to the champion again;
- a passing gate moves to the next step; passing the step before 100 % promotes the candidate to
  ``champion`` through the normal gated promotion (:func:`loft.evaluate.promotion.promote`) and
  clears the split. A refused promotion ends the rollout with the champion in place.

Every step and decision is an entry of the model's alias history (``loft registry history``),
with the gate's rows. The plan lives in the split's ``meta``, so every machine that shares the
tracking store sees the same rollout.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, GateRefused, NotFoundError
from loft.evaluate.gates import evaluate_gate, load_gate, parse_gate

GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FEEDBACK_ENDPOINT = "/v1/feedback"
LIVE_METRICS = (
    "requests",
    "errors",
    "error_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "feedback",
    "feedback_score",
    "json_valid",
)


@dataclass
class Plan:
    """A running rollout, as stored in the split's ``meta``."""

    candidate: int
    champion: int | None
    steps: list[float]  # percent of traffic to the candidate, increasing, the last one 100
    every_s: float
    gate: list[str]  # the gate's expressions, copied at start: editing the file changes nothing
    gate_source: str
    audit: list[str]
    min_requests: int = 20
    max_wait: int = 4
    promote_gate: str | None = None
    scorers: list[str] = field(default_factory=list)  # module.path:function, over logged outputs
    step: int = 0
    step_started: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    waited: int = 0  # intervals this step has waited for data
    next_decision: float | None = None  # default: step_started + every_s

    @property
    def due(self) -> float:
        return (
            self.next_decision
            if self.next_decision is not None
            else (self.step_started + self.every_s)
        )

    @property
    def share(self) -> float:
        return self.steps[self.step] / 100.0

    def to_meta(self) -> dict[str, Any]:
        return {"rollout": asdict(self)}

    @classmethod
    def from_split(cls, split: Mapping[str, Any] | None) -> Plan | None:
        meta = (split or {}).get("meta") or {}
        doc = meta.get("rollout")
        return cls(**doc) if isinstance(doc, dict) else None


def parse_steps(text: str | Sequence[float]) -> list[float]:
    """``"5,25,50,100"`` -> [5.0, 25.0, 50.0, 100.0]: increasing percentages ending at 100."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    try:
        steps = [float(str(s).strip().rstrip("%")) for s in raw if str(s).strip()]
    except ValueError:
        raise ConfigError(
            f"--steps {text!r}: write percentages separated by commas, e.g. 5,25,50,100"
        ) from None
    problems = []
    if len(steps) < 2:
        problems.append("give at least one share below 100 and then 100")
    if any(not 0 < s <= 100 for s in steps):
        problems.append("every share must be above 0 and at most 100")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        problems.append("shares must increase")
    if steps and steps[-1] != 100:
        problems.append("the last step must be 100 (it promotes the candidate)")
    if problems:
        raise ConfigError(
            f"--steps {text!r}: " + "; ".join(problems), hint="e.g. --steps 5,25,50,100"
        )
    return steps


def default_audit() -> str:
    from loft.core.specs import ServeConfig
    from loft.serve.audit import default_audit_path

    return str(default_audit_path(ServeConfig()))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _champion(name: str) -> int | None:
    from loft.registry import get_version

    try:
        return get_version(f"{name}@champion", verify=False).version
    except NotFoundError:
        return None


def start(
    name: str,
    candidate: int,
    *,
    steps: Sequence[float],
    gate: str | Path,
    every_s: float,
    audit: Sequence[str | Path] | None = None,
    min_requests: int = 20,
    max_wait: int = 4,
    promote_gate: str | Path | None = None,
    scorers: Sequence[str] = (),
    actor: str | None = None,
) -> Plan:
    """Start rolling ``name:candidate`` out: its first step's share of ``name``'s traffic."""
    from loft.evaluate.run import import_scorer
    from loft.registry import get_split, get_version, set_split

    checks = load_gate(gate)  # every bad expression at once, before anything changes
    for spec in scorers:
        import_scorer(spec)  # importable now, or refused before traffic moves
    if promote_gate is not None:
        load_gate(promote_gate)
    if every_s < 0 or min_requests < 0 or max_wait < 1:
        raise ConfigError("--every and --min-requests must be >= 0, --max-wait >= 1")
    current = get_split(name)
    if current is not None:
        raise ConfigError(
            f"{name} already splits its traffic ({name}:{current['candidate']} has "
            f"{current['share']:.0%}); one rollout at a time.",
            hint=f"See it with `loft rollout status {name}`; end it with "
            f"`loft rollout abort {name}`.",
        )
    get_version(f"{name}:{candidate}", verify=True)  # a tampered candidate never takes traffic
    champion = _champion(name)
    if champion is None:
        raise ConfigError(
            f"{name} has no champion to compare {name}:{candidate} with.",
            hint=f"A first version needs no rollout: `loft registry promote {name}:{candidate}`.",
        )
    plan = Plan(
        candidate=candidate,
        champion=champion,
        steps=list(parse_steps(list(steps))),
        every_s=float(every_s),
        gate=[c.expr for c in checks],
        gate_source=str(gate),
        audit=[str(Path(p).expanduser().resolve()) for p in (audit or [default_audit()])],
        min_requests=min_requests,
        max_wait=max_wait,
        # resolved now: the decisions run later, as jobs, from another directory
        promote_gate=str(Path(promote_gate).resolve()) if promote_gate is not None else None,
        scorers=list(scorers),
    )
    set_split(
        name, candidate, plan.share, actor=actor, meta=plan.to_meta(),
        reason=f"rollout started: step 1/{len(plan.steps)}, {plan.steps[0]:g}% to the candidate",
    )  # fmt: skip
    return plan


# ----------------------------------------------------------------------------- live metrics


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[k]


def _records(paths: Iterable[str | Path], since: str, until: str) -> Iterable[dict[str, Any]]:
    for path in paths:
        try:
            f = open(path, encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                when = str(rec.get("time") or "")
                if since <= when < until:
                    yield rec


def live_metrics(
    paths: Iterable[str | Path],
    refs: Sequence[str],
    since: float,
    until: float,
    scorers: Sequence[str] = (),
) -> dict[str, dict[str, float]]:
    """Each of ``refs``' (``name:version``) metrics from the audit logs over [since, until);
    ``scorers`` (``module.path:function``) score each logged completion."""
    from loft.evaluate.run import import_scorer

    fns = dict(import_scorer(spec) for spec in scorers)
    lat: dict[str, list[float]] = {r: [] for r in refs}
    errors = dict.fromkeys(refs, 0)
    scores: dict[str, list[float]] = {r: [] for r in refs}
    valid: dict[str, list[float]] = {r: [] for r in refs}
    scored: dict[str, dict[str, list[float]]] = {r: {m: [] for m in fns} for r in refs}
    for rec in _records(paths, _iso(since), _iso(until)):
        ref = rec.get("resolved")
        if ref not in lat:
            continue
        endpoint = rec.get("endpoint")
        if endpoint == FEEDBACK_ENDPOINT:
            if isinstance(rec.get("score"), int | float):
                scores[ref].append(float(rec["score"]))
            continue
        if endpoint not in GENERATION_ENDPOINTS or rec.get("status") == 499:
            continue  # a client that went away says nothing about the model
        lat[ref].append(float(rec.get("latency_ms") or 0.0))
        if int(rec.get("status") or 0) >= 500:
            errors[ref] += 1
        if isinstance(rec.get("completion"), str):
            from loft.evaluate.scorers import parse_json_object

            valid[ref].append(float(parse_json_object(rec["completion"]) is not None))
            for metric, fn in fns.items():
                try:
                    value = float(fn(rec["completion"], rec.get("prompt") or ""))
                except Exception as e:
                    raise ConfigError(
                        f"scorer {metric!r} failed on request {rec.get('request_id')} "
                        f"({type(e).__name__}: {e})",
                        hint="Make it return a number for every completion, then run "
                        "`loft rollout tick` again.",
                    ) from None
                scored[ref][metric].append(value)
    out: dict[str, dict[str, float]] = {}
    for ref in refs:
        n = len(lat[ref])
        m: dict[str, float] = {"requests": n, "errors": errors[ref], "feedback": len(scores[ref])}
        if n:
            m["error_rate"] = errors[ref] / n
            m["latency_p50_ms"] = _percentile(lat[ref], 0.5)
            m["latency_p95_ms"] = _percentile(lat[ref], 0.95)
        if scores[ref]:
            m["feedback_score"] = sum(scores[ref]) / len(scores[ref])
        if valid[ref]:
            m["json_valid"] = sum(valid[ref]) / len(valid[ref])
        for metric, values in scored[ref].items():
            if values:
                m[metric] = sum(values) / len(values)
        out[ref] = m
    return out


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decision:
    """What one ``tick`` did: ``action`` is none | waiting | advanced | aborted | promoted |
    refused."""

    name: str
    action: str
    reason: str
    step: int | None = None
    share: float | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.action in ("aborted", "promoted", "refused", "none")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ended": self.ended}


def _arms(name: str, plan: Plan) -> tuple[str, str]:
    champion = _champion(name)
    return f"{name}:{plan.candidate}", f"{name}:{champion if champion is not None else '?'}"


def _missing(plan: Plan, cand: Mapping[str, float], champ: Mapping[str, float]) -> str:
    """Why the step cannot be judged yet ('' when it can)."""
    short = [
        f"{arm} has {int(m['requests'])} of {plan.min_requests} requests"
        for arm, m in (("the candidate", cand), ("the champion", champ))
        if m["requests"] < plan.min_requests
    ]
    if short:
        return "; ".join(short)
    live = {*LIVE_METRICS, *(spec.rpartition(":")[2] for spec in plan.scorers)}
    for check in parse_gate(plan.gate, source="rollout gate"):
        for arm, m in (("the candidate", cand), ("the champion", champ)):
            if check.metric in live and check.metric not in m:
                if arm == "the champion" and not check.relative:
                    continue
                return f"no {check.metric} measured for {arm} yet"
    return ""


def tick(name: str, *, now: float | None = None, actor: str | None = None) -> Decision:
    """Decide the current step of ``name``'s rollout if its interval has passed (idempotent:
    before that, or with no rollout running, nothing changes)."""
    from loft.registry import clear_split, get_split, set_split

    now = time.time() if now is None else now
    plan = Plan.from_split(get_split(name))
    if plan is None:
        return Decision(name, "none", f"no rollout of {name} is running")
    if now < plan.due:
        return Decision(
            name, "waiting", f"next decision in {plan.due - now:.0f} s", plan.step, plan.share
        )
    cand_ref, champ_ref = _arms(name, plan)
    metrics = live_metrics(plan.audit, [cand_ref, champ_ref], plan.step_started, now, plan.scorers)
    cand, champ = metrics[cand_ref], metrics[champ_ref]
    step_no = f"step {plan.step + 1}/{len(plan.steps)} ({plan.steps[plan.step]:g}%)"
    missing = _missing(plan, cand, champ)
    if missing:
        plan.waited += 1
        plan.next_decision = now + plan.every_s
        if plan.waited >= plan.max_wait:
            why = f"rollout aborted at {step_no}: not enough data after {plan.waited} intervals"
            clear_split(name, reason=f"{why} ({missing})", actor=actor)
            return Decision(name, "aborted", f"{why} ({missing})", plan.step, 0.0, metrics)
        set_split(name, plan.candidate, plan.share, actor=actor, meta=plan.to_meta(),
                  reason=f"rollout waiting at {step_no}: {missing}")  # fmt: skip
        return Decision(name, "waiting", missing, plan.step, plan.share, metrics)
    result = evaluate_gate(parse_gate(plan.gate, source="rollout gate"), cand, champ)
    rows = result.to_dicts()
    if not result.passed:
        failed = "; ".join(f"{c.expr} ({c.reason})" for c in result.failed)
        why = f"rollout aborted at {step_no}: {failed}"
        clear_split(name, reason=why, gate=rows, actor=actor)
        return Decision(name, "aborted", why, plan.step, 0.0, metrics, rows)
    if plan.step + 1 < len(plan.steps) - 1:
        plan.step, plan.step_started, plan.waited, plan.next_decision = plan.step + 1, now, 0, None
        why = (
            f"rollout step {plan.step + 1}/{len(plan.steps)}: gate passed, "
            f"{plan.steps[plan.step]:g}% to the candidate"
        )
        set_split(name, plan.candidate, plan.share, reason=why, gate=rows, actor=actor,
                  meta=plan.to_meta())  # fmt: skip
        return Decision(name, "advanced", why, plan.step, plan.share, metrics, rows)
    return _finish(name, plan, step_no, metrics, rows, actor)


def _finish(
    name: str, plan: Plan, step_no: str, metrics: dict[str, dict[str, float]],
    rows: list[dict[str, Any]], actor: str | None,
) -> Decision:  # fmt: skip
    from loft.evaluate.promotion import promote
    from loft.registry import clear_split

    try:
        promote(
            f"{name}:{plan.candidate}", gate_path=plan.promote_gate,
            reason=f"rollout complete: the live gate passed at {step_no}", actor=actor,
        )  # fmt: skip
    except GateRefused as e:
        why = f"rollout ended at {step_no}: the live gate passed but promotion refused: {e.message}"
        clear_split(name, reason=why, gate=rows, actor=actor)
        return Decision(name, "refused", why, plan.step, 0.0, metrics, rows)
    why = f"rollout complete: {name}:{plan.candidate} promoted to champion"
    clear_split(name, reason=why, gate=rows, actor=actor)
    return Decision(name, "promoted", why, len(plan.steps) - 1, 1.0, metrics, rows)


def abort(name: str, *, reason: str = "", actor: str | None = None) -> Decision:
    """End ``name``'s rollout now: every request goes to the champion again."""
    from loft.registry import clear_split, get_split

    split = get_split(name)
    if split is None:
        raise NotFoundError(
            f"no rollout of {name} is running (its traffic is not split).",
            hint=f"See its past moves with `loft registry history {name}`.",
        )
    plan = Plan.from_split(split)  # None for a split set by hand: cleared all the same
    why = "rollout aborted" + (f": {reason}" if reason else " by hand")
    clear_split(name, reason=why, actor=actor)
    return Decision(name, "aborted", why, plan.step if plan else None, 0.0)


def status(name: str, *, now: float | None = None) -> dict[str, Any]:
    """The running rollout of ``name`` (None fields when there is none): plan, share, live metrics
    of the current step's window and what the gate would say on them now."""
    from loft.registry import get_split

    now = time.time() if now is None else now
    split = get_split(name)
    plan = Plan.from_split(split)
    if plan is None:
        return {"name": name, "running": False, "split": split}
    cand_ref, champ_ref = _arms(name, plan)
    metrics = live_metrics(plan.audit, [cand_ref, champ_ref], plan.step_started, now, plan.scorers)
    missing = _missing(plan, metrics[cand_ref], metrics[champ_ref])
    checks = parse_gate(plan.gate, source="rollout gate")
    verdict = evaluate_gate(checks, metrics[cand_ref], metrics[champ_ref])
    return {
        "name": name,
        "running": True,
        "candidate": cand_ref,
        "champion": champ_ref,
        "step": plan.step + 1,
        "steps": plan.steps,
        "share": plan.share,
        "started": _iso(plan.started),
        "step_started": _iso(plan.step_started),
        "next_decision_in_s": max(0.0, plan.due - now),
        "metrics": metrics,
        "waiting_for": missing or None,
        "verdict": None if missing else ("pass" if verdict.passed else "fail"),
        "checks": verdict.to_dicts(),
        "plan": asdict(plan),
    }


__all__ = [
    "LIVE_METRICS",
    "Decision",
    "Plan",
    "abort",
    "live_metrics",
    "parse_steps",
    "start",
    "status",
    "tick",
]
