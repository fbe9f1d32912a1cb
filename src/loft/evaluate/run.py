"""``evaluate_model``: measure a model (and optionally a baseline) on one held-out file.

Metrics come in two families. Loss metrics (``eval_loss``, ``perplexity``) score the references
with the training loss. Generation metrics (``exact_match``, ``json_exact_match``, ``rouge_l`` and
any pluggable scorer named ``module.path:function``) score greedy answers: each model generates
once, with its own tokenizer and chat template, and every generation metric reads those same
predictions. Results are logged as a run in the MLflow experiment ``eval`` and, for a registry
reference, recorded on the version.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, DataError
from loft.core.specs import TrackingSpec
from loft.evaluate.loading import Target, load_target
from loft.evaluate.preference_eval import PREFERENCE_METRICS, is_pair
from loft.evaluate.scorers import SCORERS

Scorer = Callable[[str, str], float]
LOSS_METRICS = ("eval_loss", "perplexity")
GENERATION_SCORERS: dict[str, Scorer] = dict(SCORERS)
DEFAULT_METRICS = ("eval_loss", "json_exact_match")
PREFERENCE_DEFAULTS = ("preference_accuracy", "reward_margin", "eval_loss")


@dataclass
class EvalReport:
    """Candidate (and baseline) metrics on ``n`` records, with one comparison row per metric."""

    ref: str
    data: str
    n: int
    candidate: dict[str, float]
    baseline: dict[str, float] | None = None
    baseline_ref: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_scorer(spec: str) -> tuple[str, Scorer]:
    """``module.path:function`` -> (metric name = the function's name, the function)."""
    module_name, sep, attr = spec.partition(":")
    hint = (
        "Name a function as `module.path:function`; the module must be importable (on "
        "PYTHONPATH) and the function must take (prediction, reference) and return a float."
    )
    if not sep or not module_name or not attr:
        raise ConfigError(f"scorer {spec!r} is not of the form `module.path:function`", hint=hint)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        msg = f"scorer {spec!r}: cannot import module {module_name!r} ({e})"
        raise ConfigError(msg, hint=hint) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            f"scorer {spec!r}: module {module_name!r} has no function {attr!r}", hint=hint
        )
    return attr, fn


def _plan(
    metrics: Sequence[str], scorer: str | None
) -> tuple[list[str], dict[str, Scorer], list[str]]:
    """Which loss metrics, named generation scorers and preference metrics to compute; unknown
    names raise."""
    loss: list[str] = []
    gen: dict[str, Scorer] = {}
    pref: list[str] = []
    unknown: list[str] = []
    for m in [*metrics, *([scorer] if scorer else [])]:
        m = m.strip()
        if m in LOSS_METRICS:
            loss.append(m)
        elif m in PREFERENCE_METRICS:
            pref.append(m)
        elif m in GENERATION_SCORERS:
            gen[m] = GENERATION_SCORERS[m]
        elif ":" in m:
            name, fn = import_scorer(m)
            gen[name] = fn
        elif m:
            unknown.append(m)
    if unknown:
        known = ", ".join([*LOSS_METRICS, *sorted(GENERATION_SCORERS), *PREFERENCE_METRICS])
        raise ConfigError(
            f"unknown metric(s): {', '.join(unknown)}",
            hint=f"Choose from: {known}, or a scorer as `module.path:function`.",
        )
    if not loss and not gen and not pref:
        raise ConfigError("no metrics to compute", hint=f"Pass e.g. {','.join(DEFAULT_METRICS)}.")
    return list(dict.fromkeys(loss)), gen, list(dict.fromkeys(pref))


def metric_problem(name: str) -> str | None:
    """Why ``name`` is not a metric ``evaluate_model`` computes, or None."""
    try:
        _plan([name], None)
    except ConfigError as e:
        return f"{e.message}; {e.hint}" if e.hint else e.message
    return None


def _as_chat(record: dict[str, Any]) -> dict[str, Any]:
    """A preference pair as the chat record its chosen reply makes (for loss and generation)."""
    if not is_pair(record):
        return record
    prompt = record["prompt"]
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    chosen = record["chosen"]
    chosen = chosen if isinstance(chosen, list) else [{"role": "assistant", "content": chosen}]
    return {"messages": [*prompt, *chosen]}


def read_eval_records(path: str | Path, n: int | None = None) -> list[dict[str, Any]]:
    """Canonical records of a held-out file (jsonl/json/csv/parquet); any bad record raises."""
    from loft.data import read_records

    records, problems = read_records(path)
    if problems:
        raise DataError(
            f"{path}: {len(problems)} invalid record(s):\n"
            + "\n".join(f"  {p}" for p in problems[:20]),
            problems=problems,
            hint="Fix or remove them (`loft data validate FILE` lists every one).",
        )
    if not records:
        raise DataError(f"{path} has no records", hint="Pass a file with held-out chat records.")
    data = [r.data for r in records]
    return data[:n] if n else data


def _measure(
    target: Target,
    records: list[dict[str, Any]],
    loss: list[str],
    gen: dict[str, Scorer],
    gen_kwargs: dict[str, Any],
    pref: bool = False,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    from loft.evaluate.harness import generate, split_record
    from loft.evaluate.loss_eval import eval_loss

    out: dict[str, float] = {}
    samples: list[dict[str, str]] = []
    if pref:
        from loft.evaluate.preference_eval import pair_logps

        target.pair_logps = pair_logps(target.model, target.tokenizer, records)
    records = [_as_chat(r) for r in records]
    if loss:
        result = eval_loss(target.model, target.tokenizer, records)
        out.update({m: float(result[m]) for m in loss})
    if gen:
        pairs = [split_record(r, i) for i, r in enumerate(records)]
        preds = generate(target.model, target.tokenizer, [p for p, _ in pairs], **gen_kwargs)
        refs = [ref for _, ref in pairs]
        for name, fn in gen.items():
            scores = [float(fn(p, r)) for p, r in zip(preds, refs, strict=True)]
            out[name] = sum(scores) / len(scores)
        samples = [
            {"prompt": str(pairs[i][0][-1].get("content", "")), "pred": preds[i], "ref": refs[i]}
            for i in range(min(3, len(preds)))
        ]
    return out, samples


def _load_and_measure(
    ref: str, records, loss, gen, gen_kwargs, pref: bool = False
) -> tuple[Target, dict, list]:
    from loft.evaluate.harness import say

    say(f"loading {ref} to score {len(records)} records", gen_kwargs.get("progress", False))
    target = load_target(ref)
    try:
        metrics, samples = _measure(target, records, loss, gen, gen_kwargs, pref)
    finally:
        model, target.model = target.model, None
        del model
        gc.collect()
    return target, metrics, samples


def _preference(
    cand: Target,
    base: Target | None,
    records: list[dict[str, Any]],
    pref: list[str],
    metrics: dict[str, float],
    progress: bool,
) -> tuple[str, dict[str, float]]:
    """(the reference's name, ``metrics`` with the preference metrics): the log-ratios of the
    candidate against the baseline, or else against the candidate's base model."""
    from loft.evaluate.preference_eval import preference_metrics

    if base is not None:
        ref_name, ref_logps = base.name, base.pair_logps
    else:
        if cand.kind == "base" or not cand.base_model:
            raise ConfigError(
                f"{', '.join(pref)} compare {cand.name} with a reference, and it has no base "
                "model of its own to compare with.",
                hint="Pass --baseline MODEL_REF (e.g. the SFT version a DPO model started from).",
            )
        ref_name = cand.base_model
        ref, _, _ = _load_and_measure(ref_name, records, [], {}, {"progress": progress}, True)
        ref_logps = ref.pair_logps
    got = preference_metrics(cand.pair_logps, ref_logps)
    return ref_name, {**metrics, **{m: got[m] for m in pref}}


def compare_rows(
    candidate: dict[str, float], baseline: dict[str, float] | None
) -> list[dict[str, Any]]:
    rows = []
    for metric, value in candidate.items():
        base = baseline.get(metric) if baseline is not None else None
        delta = value - base if base is not None else None
        rows.append({"metric": metric, "candidate": value, "baseline": base, "delta": delta})
    return rows


def _log(
    report: EvalReport, cand: Target, base: Target | None, tracking: TrackingSpec
) -> str | None:
    from loft.tracking import open_tracker

    tracker = open_tracker(tracking, run_name=f"eval {cand.name}")
    with tracker:
        tracker.log_params(
            {
                "ref": cand.name,
                "kind": cand.kind,
                "sha256": cand.sha256,
                "data": report.data,
                "n": report.n,
                "metrics": ",".join(report.candidate),
                "baseline": base.name if base else "",
            }
        )
        tracker.set_tags({"loft.eval.ref": cand.name, "loft.eval.kind": cand.kind})
        metrics = dict(report.candidate)
        metrics.update({f"baseline/{k}": v for k, v in (report.baseline or {}).items()})
        tracker.log_metrics(metrics, step=0)
    return tracker.run_id


def evaluate_model(
    ref: str,
    data_path: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
    scorer: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    n: int | None = None,
    progress: bool = True,
    tracking: TrackingSpec | None = None,
    source: str = "eval",
) -> EvalReport:
    """Evaluate ``ref`` (and ``baseline``) on ``data_path``; log to MLflow; return the report.

    For a registry reference every metric is recorded on the version as an evaluation entry
    naming exactly what was scored (the records' fingerprint, their count, ``max_new_tokens``
    for generation metrics), so gates compare it only with numbers measured the same way."""
    records = read_eval_records(data_path, n)
    if metrics is None:  # a preference file is scored as pairs, anything else as chats
        metrics = PREFERENCE_DEFAULTS if records and is_pair(records[0]) else DEFAULT_METRICS
    loss, gen, pref = _plan(metrics, scorer)  # bad metric names fail before any model is loaded
    if pref:
        bad = [i for i, r in enumerate(records) if not is_pair(r)]
        if bad:
            raise DataError(
                f"{data_path}: {', '.join(pref)} need preference pairs (prompt, chosen, "
                f"rejected); record {bad[0]} is not one ({len(bad)} of {len(records)} are not).",
                hint="Pass a held-out preference file, or drop the preference metrics.",
            )
    gen_kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
    measure = (loss, gen, gen_kwargs, bool(pref))
    cand, cand_metrics, samples = _load_and_measure(ref, records, *measure)
    base: Target | None = None
    base_metrics: dict[str, float] | None = None
    if baseline:
        base, base_metrics, _ = _load_and_measure(baseline, records, *measure)
    reference = None
    if pref:
        reference, cand_metrics = _preference(cand, base, records, pref, cand_metrics, progress)
    report = EvalReport(
        ref=cand.name,
        data=str(Path(data_path)),
        n=len(records),
        candidate=cand_metrics,
        baseline=base_metrics,
        baseline_ref=base.name if base else None,
        rows=compare_rows(cand_metrics, base_metrics),
        samples=samples,
    )
    report.mlflow_run_id = _log(report, cand, base, tracking or TrackingSpec(experiment="eval"))
    if cand.registry_ref:
        from loft import registry
        from loft.registry.evaluations import make_entries, on_data, records_fingerprint

        path, fp = str(Path(data_path).resolve()), records_fingerprint(records)
        settings = {"max_new_tokens": max_new_tokens, "reference": reference}

        def on_for(m: str) -> dict[str, Any]:
            return on_data(path, fp, len(records), m, settings)

        entries = make_entries(
            cand_metrics,
            on=None,
            source=source,
            mlflow_run_id=report.mlflow_run_id,
            on_for=on_for,
        )
        registry.record_evaluation(cand.registry_ref, entries)
    return report
