"""An Optuna study whose trials are loft training runs, pruned on their live eval loss.

Each trial samples the space (``loft.hpo.space``), builds the recipe with those values, and runs
it (``loft.hpo.trial.run_trial``) with an ``on_eval`` hook: at every evaluation (every
``eval_every`` steps, not every step) the eval loss is reported to the trial, and the pruner may
stop the run there (``RunPruned``: the run keeps its checkpoint and ends ``pruned``; the trial is
PRUNED). The objective is the run's final eval loss, or a ``loft eval`` metric on a held-out file,
optionally with a second objective (train time or the planner's memory estimate): the Pareto
front. The first trial of a new study is the recipe's own values (a warm start).

Storage is Optuna's journal file under ``LOFT_HOME/studies/NAME.journal`` (the Optuna FAQ warns
against SQLite for concurrent workers; the journal appends under a lock), shared by ``--workers``
processes. The study's settings (recipe, space, sampler, pruner, seed, how many trials it is to
have, its MLflow parent run) live in the journal too, so ``loft tune resume NAME`` needs nothing
else. Every trial records its owner process (host, pid, start time): a trial left RUNNING by a
process that died, or stopped by Ctrl-C, is marked failed and retried from its own checkpoint as
a new trial (``retry_of``); completed trials are never re-run. Trial runs live in
``LOFT_HOME/studies/NAME/trial-N``.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loft.core.errors import (
    ConfigError,
    HardwareError,
    LoftError,
    RunPruned,
    TrainingDiverged,
    TrainingInterrupted,
)
from loft.core.procs import owner, owner_alive
from loft.hpo.space import Space, load_space
from loft.hpo.storage import SPEC, journal_path, load_study, quiet_optuna, storage, studies_dir

SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("successive_halving", "hyperband", "median", "none")
Say = Callable[[str], None]


def startup_trials(target: int) -> int:
    """TPE's random start, sized to the study: Optuna's default of 10 would leave a 12-trial study
    two model-guided trials (bench/hpo_efficiency.py); a third of the study, 4 to 10."""
    return max(4, min(10, target // 3))


def _sampler(name: str, seed: int, space: Space, target: int = 30) -> Any:
    import optuna

    if name == "tpe":  # constant_liar (Optuna's default): parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(target))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=4)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise ConfigError(f"--sampler {name!r}: one of {', '.join(SAMPLERS)}")


def _pruner(name: str, first_eval: int, max_steps: int | None) -> Any:
    """``first_eval``: the step of a trial's first evaluation (the recipe's eval_every), the
    smallest rung; Optuna's "auto" would leave the first trial out of every rung. Successive
    halving keeps the best half at each rung, not Optuna's quarter: with a dozen trials a quarter
    judged on the first evaluation pruned the grid's winning region in bench/hpo_efficiency.py
    (+5.7% eval loss against the grid; keeping half: -2.0%, at 40% of the grid's tokens)."""
    import optuna

    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first_eval, max_resource=max_steps or "auto"
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: one of {', '.join(PRUNERS)}")


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_study(
    recipe: Path,
    space: Space,
    *,
    name: str,
    trials: int,
    sampler: str = "tpe",
    pruner: str = "successive_halving",
    seed: int = 0,
    workers: int = 1,
    tracker_factory: Callable[[], Any] | None = None,
    say: Say = lambda _m: None,
) -> list[Any]:
    """Add ``trials`` trials to study ``name`` (created if new), run them on ``workers``
    processes, and return every trial of the study (``loft.hpo.report.TrialResult``)."""
    import optuna

    if trials < 1:
        raise ConfigError(f"--trials {trials}: at least 1")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: at least 1")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
    if sampler == "grid":
        space.grid()  # a range without a finite set of values is refused before anything runs
    objective = space.objective
    if len(objective.directions) > 1 and pruner != "none":
        say(f"pruner {pruner}: Optuna prunes single-objective studies only; not pruning")
        pruner = "none"
    _pruner(pruner, 1, None)  # an unknown name fails here
    quiet_optuna()
    study = optuna.create_study(
        study_name=name, storage=storage(name), directions=objective.directions,
        load_if_exists=True,
    )  # fmt: skip
    if [d.name.lower() for d in study.directions] != objective.directions:
        raise ConfigError(
            f"study {name!r} was created to {', '.join(d.name.lower() for d in study.directions)}"
            f"; this space's objective would {', '.join(objective.directions)}",
            hint="Name a new study with --study.",
        )
    old = study.user_attrs.get(SPEC) or {}
    recipe = recipe.resolve()
    if old and old["recipe_sha"] != _digest(recipe):
        raise ConfigError(
            f"study {name!r} tunes {old['recipe']} as it was; {recipe} differs from it, and "
            "trials of two recipes are not comparable",
            hint="Name a new study with --study, or `loft tune resume` the old one.",
        )
    spec = {
        "recipe": str(recipe),
        "recipe_sha": _digest(recipe),
        "space": str(Path(space.source).resolve()),
        "space_sha": _digest(space.source),
        "sampler": sampler,
        "pruner": pruner,
        "seed": seed,
        "objective": objective.names,
        "target": _counted(study) + trials,
        "mlflow_run_id": old.get("mlflow_run_id"),
    }
    study.set_user_attr(SPEC, spec)
    return _drive(name, workers, tracker_factory, say)


def resume_study(
    name: str,
    *,
    workers: int = 1,
    tracker_factory: Callable[[], Any] | None = None,
    say: Say = lambda _m: None,
) -> list[Any]:
    """Run study ``name`` on to the number of trials it was given, after Ctrl-C or a crash: trials
    its dead processes left are retried from their checkpoints; finished ones stay as they are."""
    spec = _spec(load_study(name))
    for key in ("recipe", "space"):
        if not Path(spec[key]).is_file():
            raise ConfigError(f"study {name!r}: its {key} {spec[key]} is gone")
        if _digest(spec[key]) != spec[f"{key}_sha"]:
            raise ConfigError(
                f"study {name!r}: {spec[key]} changed since the study started",
                hint="Restore it, or start a new study (`loft tune RECIPE --space FILE --study "
                "NEW`).",
            )
    return _drive(name, workers, tracker_factory, say)


def _spec(study: Any) -> dict[str, Any]:
    spec = study.user_attrs.get(SPEC)
    if not spec:
        raise ConfigError(f"study {study.study_name!r} was not made by loft tune")
    return spec


def _load(name: str) -> tuple[Any, dict[str, Any], Path, Space]:
    study = load_study(name)
    spec = _spec(study)
    return study, spec, Path(spec["recipe"]), load_space(spec["space"], spec["recipe"])


def _drive(name: str, workers: int, tracker_factory: Any, say: Say) -> list[Any]:
    from loft.hpo.report import summarize

    study, spec, recipe, space = _load(name)
    reclaim(study, say)
    if not study.trials and spec["sampler"] != "grid":
        warm = _recipe_point(recipe, space)
        if warm:
            study.enqueue_trial(warm, user_attrs={"warm_start": True})
    live = sum(1 for t in study.trials if t.state.name == "RUNNING")
    remaining = spec["target"] - _counted(study) - live
    if remaining <= 0:
        say(f"study {name}: {spec['target']} trials finished or running; nothing to add")
        return summarize(load_study(name))
    parent = _parent_run(study, spec, recipe, space, tracker_factory)
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    try:
        if workers == 1:
            work(name, remaining, 0, tracker_factory=tracker_factory, say=say)
        else:
            _spawn(name, quotas, say)
    except (KeyboardInterrupt, TrainingInterrupted):
        parent.finish("KILLED")
        done = _counted(load_study(name))
        raise TrainingInterrupted(
            f"study {name} stopped: {done} of {spec['target']} trials finished",
            hint=f"`loft tune resume {name}` continues it; a stopped trial resumes from its "
            "checkpoint.",
        ) from None
    except BaseException:
        parent.finish("FAILED")
        raise
    results = summarize(load_study(name))
    _log_parent(parent, results)
    parent.finish("FINISHED")
    return results


def _counted(study: Any) -> int:
    """Trials that count towards the study's number: complete, pruned, or failed for good (a
    trial stopped by Ctrl-C or left by a dead process counts through its retry)."""
    return sum(
        t.state.name in ("COMPLETE", "PRUNED")
        or (t.state.name == "FAIL" and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def reclaim(study: Any, say: Say = lambda _m: None) -> list[int]:
    """Retry the trials no process will finish: RUNNING ones whose owner process is dead
    (marked FAIL, ``lost``) and ones stopped by Ctrl-C (``interrupted``). Each is enqueued again
    with its params and run dir, to resume from its checkpoint. Returns the retried numbers."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    out = []
    for t in trials:
        if t.number in retried:
            continue
        if t.state == TrialState.RUNNING:
            alive = owner_alive(t.user_attrs.get("owner"))
            fresh = t.datetime_start and time.time() - t.datetime_start.timestamp() < 60
            if alive or alive is None or ("owner" not in t.user_attrs and fresh):
                continue  # alive, on another host, or just starting
            study._storage.set_trial_user_attr(t._trial_id, "lost", _lost(t))
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            say(f"trial {t.number}: {_lost(t)}; retrying it from its checkpoint")
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        else:
            say(f"trial {t.number} was stopped; retrying it from its checkpoint")
        attrs = {"retry_of": t.number, "run_dir": t.user_attrs.get("run_dir")}
        study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
        out.append(t.number)
    return out


def _lost(t: Any) -> str:
    o = t.user_attrs.get("owner") or {}
    return f"its process (pid {o.get('pid', '?')} on {o.get('host', '?')}) died while it ran"


def work(
    name: str,
    quota: int,
    index: int = 0,
    *,
    tracker_factory: Callable[[], Any] | None = None,
    say: Say = lambda _m: None,
) -> None:
    """One process's share of a study: run ``quota`` trials (waiting ones first). ``index``
    offsets the sampler's seed, so parallel workers do not propose the same points."""
    import optuna

    from loft.hpo.trial import run_trial

    quiet_optuna()
    _, spec, recipe, space = _load(name)
    first = space.trial_config(recipe, {}).training
    study = optuna.load_study(
        study_name=name,
        storage=storage(name),
        sampler=_sampler(spec["sampler"], spec["seed"] + index, space, spec["target"]),
        pruner=_pruner(spec["pruner"], first.eval_every, first.max_steps),
    )
    objective = space.objective
    multi = len(objective.directions) > 1
    sign = -1.0 if objective.direction == "maximize" else 1.0  # pruned on eval loss, signed

    def fn(trial: Any) -> Any:
        retry = trial.user_attrs.get("retry_of")
        values = space.sample(trial)
        run_dir = trial.user_attrs.get("run_dir") if retry is not None else None
        run_dir = run_dir or str(studies_dir() / name / f"trial-{trial.number}")
        config = space.trial_config(recipe, values).model_copy(
            update={"output_dir": run_dir, "register": False}
        )
        trial.set_user_attr("owner", owner())
        trial.set_user_attr("run_dir", run_dir)
        say(
            f"trial {trial.number}"
            + (f" (retry of {retry})" if retry is not None else "")
            + ": "
            + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
            )
        )

        last = config.training.max_steps  # None: epochs, the last step is not known here

        def report(step: int, loss: float) -> None:
            trial.set_user_attr("steps", step)
            if multi:
                return
            trial.report(sign * loss, step)
            if last is not None and step >= last:
                return  # the run is done: stopping it now would save nothing and lose it
            if trial.should_prune():
                raise RunPruned(
                    f"trial {trial.number} pruned at step {step} (eval loss {loss:.4f})"
                )

        tags = {"loft.study": name, "loft.trial": str(trial.number)}
        if spec.get("mlflow_run_id"):
            tags["mlflow.parentRunId"] = spec["mlflow_run_id"]
        tracker = tracker_factory() if tracker_factory else None
        try:
            out = run_trial(
                config, objective, on_eval=report, resume=retry is not None, tags=tags,
                tracker=tracker, force=not space.fits_device,
            )  # fmt: skip
        except HardwareError as e:  # the planner's pre-flight: refused before the model loads
            trial.set_user_attr("refused", str(e).splitlines()[0])
            say(f"trial {trial.number} does not fit this device; not started: {e}")
            raise optuna.TrialPruned("does not fit the device") from None
        except RunPruned as e:
            trial.set_user_attr("train_tokens", _tokens(run_dir))
            say(str(e))
            raise optuna.TrialPruned(str(e)) from None
        except (TrainingInterrupted, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0]}"[:500])
            raise
        trial.set_user_attr("train_tokens", out.train_tokens)
        trial.set_user_attr("steps", out.steps)
        trial.set_user_attr("train_s", out.summary.get("train_s"))
        say(
            f"trial {trial.number}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in zip(objective.names, out.values, strict=True))
        )
        return out.values if multi else out.values[0]

    started = time.time()

    def budget(study: Any, _trial: Any) -> None:
        """Stop once the study's trained tokens (every trial, every process) or this process's
        wall time reach the space's budget."""
        if "tokens" in space.budget:
            spent = sum(t.user_attrs.get("train_tokens", 0) for t in study.trials)
            if spent >= space.budget["tokens"]:
                say(f"budget: {spent:,} trained tokens >= {space.budget['tokens']:,.0f}; stopping")
                study.stop()
        if "seconds" in space.budget and time.time() - started >= space.budget["seconds"]:
            say(f"budget: {space.budget['seconds']:.0f} s of wall time spent; stopping")
            study.stop()

    study.optimize(fn, n_trials=quota, catch=(TrainingDiverged,), callbacks=[budget])


def _spawn(name: str, quotas: list[int], say: Say) -> None:
    """Run ``work`` in one process per quota, sharing the journal; Ctrl-C is passed on to each
    (each stops its trial at a checkpoint)."""
    threads = max(1, (os.cpu_count() or 1) // len(quotas))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "loft.hpo.worker", name, str(q), str(i)],
            env=env,
            start_new_session=True,  # Ctrl-C reaches them through us, once
        )  # fmt: skip
        for i, q in enumerate(quotas)
        if q > 0
    ]
    say(f"study {name}: {len(procs)} worker processes ({threads} thread(s) each)")
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        raise
    failed = [f"worker {i} exited {c}" for i, c in enumerate(codes) if c != 0]
    if any(c == 130 for c in codes):
        raise TrainingInterrupted(f"study {name}: a worker was stopped")
    if failed:
        raise LoftError(
            f"study {name}: {', '.join(failed)} (its output is above)",
            hint=f"Fix the cause, then `loft tune resume {name}`: finished trials are kept.",
        )


def _parent_run(study: Any, spec: dict, recipe: Path, space: Space, tracker_factory: Any) -> Any:
    """The study's MLflow run, parent of every trial's run: opened once, continued on resume."""
    if tracker_factory is not None:
        return tracker_factory()
    from loft.tracking import open_tracker

    config = space.trial_config(recipe, {})
    tags = {"loft.study": study.study_name, "loft.kind": "study"}
    tracker = open_tracker(
        config.tracking, run_name=f"study-{study.study_name}", tags=tags,
        resume_run_id=spec.get("mlflow_run_id"),
    )  # fmt: skip
    if tracker.run_id and not spec.get("mlflow_run_id"):
        tracker.log_params(
            {
                "study": study.study_name,
                "recipe": spec["recipe"],
                "space": spec["space"],
                "sampler": spec["sampler"],
                "pruner": spec["pruner"],
                "seed": spec["seed"],
                "objective": ",".join(spec["objective"]),
                **{f"space.{p.path}": p.kind for p in space.params},
            }
        )
        study.set_user_attr(SPEC, {**spec, "mlflow_run_id": tracker.run_id})
    return tracker


def _log_parent(parent: Any, results: list[Any]) -> None:
    from loft.hpo.report import best_trial

    states = [r.state for r in results]
    metrics = {f"trials/{s.lower()}": float(states.count(s)) for s in set(states)}
    if (best := best_trial(results)) is not None:
        metrics["best/value"] = best.value
    parent.log_metrics(metrics, step=len(results))


def _tokens(run_dir: str) -> int:
    from loft.train import rundir

    return int(rundir.read_summary(Path(run_dir)).get("train_tokens") or 0)


def _recipe_point(recipe: Path, space: Space) -> dict[str, Any]:
    """The recipe's own values (with the space's fixed overrides) for the sampled keys, when each
    lies in its range; {} when one does not (no warm start then)."""
    doc = space.trial_config(recipe, {}).model_dump(mode="json")
    point: dict[str, Any] = {}
    for p in space.params:
        value = _get(doc, p.path)
        if p.kind in ("float", "int"):
            if value is None or not p.low <= value <= p.high:
                return {}
            point[p.path] = value
        elif p.kind == "choices":
            if value not in p.choices:
                return {}
            point[p.path] = value
        else:
            base = _get(doc, p.of)
            factor = value / base if value is not None and base else None
            match = [c for c in p.choices if factor is not None and math.isclose(c, factor)]
            if not match:
                return {}
            point[f"{p.path}/{p.of}"] = match[0]
    return point


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "journal_path",
    "load_study",
    "reclaim",
    "resume_study",
    "run_study",
    "storage",
    "studies_dir",
    "work",
]
