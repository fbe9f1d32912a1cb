"""An Optuna study whose trials are loft training runs, pruned on their live eval loss.

Each trial samples the space (``loft.hpo.space``), builds the recipe with those values, and runs
``loft.train.train`` on it with an ``on_eval`` hook: at every evaluation (every ``eval_every``
steps, not every step) the eval loss is reported to the trial, and the pruner may stop the run
there (``RunPruned``: the run keeps its checkpoint and ends ``pruned``; the trial is PRUNED). The
objective is the run's final eval loss. The first trial of a new study is the recipe's own values
(a warm start), so a study never does worse than the recipe it starts from.

Storage is Optuna's journal file under ``LOFT_HOME/studies/NAME.journal`` (the Optuna FAQ warns
against SQLite for concurrent workers; the journal appends with a lock), so a study is resumed by
running it again under the same name. Trial runs live in ``LOFT_HOME/studies/NAME/trial-N``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, HardwareError, RunPruned
from loft.core.paths import loft_home
from loft.hpo.space import Space

SAMPLERS = ("tpe", "random")
PRUNERS = ("successive_halving", "median", "none")


def studies_dir() -> Path:
    return loft_home() / "studies"


def storage(name: str) -> Any:
    """The study's journal-file storage under LOFT_HOME."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    studies_dir().mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(studies_dir() / f"{name}.journal")))


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler {name!r}: one of {', '.join(SAMPLERS)}")


def _pruner(name: str, first_eval: int) -> Any:
    """``first_eval``: the step of a trial's first evaluation (the recipe's eval_every), the
    successive-halving rungs' smallest resource; Optuna's "auto" would leave the first trial out
    of every rung."""
    import optuna

    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval)
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: one of {', '.join(PRUNERS)}")


@dataclass
class TrialResult:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    steps: int | None
    run_dir: str | None


def run_study(
    recipe: Path,
    space: Space,
    *,
    name: str,
    trials: int,
    sampler: str = "tpe",
    pruner: str = "successive_halving",
    seed: int = 0,
    tracker_factory: Callable[[], Any] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> list[TrialResult]:
    """Run ``trials`` more trials of study ``name`` (created if new) and return every trial."""
    import optuna

    from loft.train import train

    if trials < 1:
        raise ConfigError(f"--trials {trials}: at least 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage(name),
        sampler=_sampler(sampler, seed),
        pruner=_pruner(pruner, space.trial_config(recipe, {}).training.eval_every),
        direction="minimize",
        load_if_exists=True,
    )
    if not study.trials:
        warm = _recipe_point(recipe, space)
        if warm:
            study.enqueue_trial(warm, user_attrs={"warm_start": True})

    def objective(trial: Any) -> float:
        values = space.sample(trial)
        config = space.trial_config(recipe, values)
        config = config.model_copy(
            update={"output_dir": str(studies_dir() / name / f"trial-{trial.number}"),
                    "register": False}
        )  # fmt: skip
        evals = 0

        def report(step: int, loss: float) -> None:
            nonlocal evals
            evals += 1
            trial.report(loss, step)
            if trial.should_prune():
                trial.set_user_attr("steps", step)
                raise RunPruned(
                    f"trial {trial.number} pruned at step {step} (eval loss {loss:.4f})"
                )

        say(
            f"trial {trial.number}: "
            + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
            )
        )
        tracker = tracker_factory() if tracker_factory else None
        try:
            result = train(
                config, progress=False, tracker=tracker, on_eval=report, force=not space.fits_device
            )
        except HardwareError as e:  # the planner's pre-flight: refused before the model loads
            trial.set_user_attr("refused", str(e).splitlines()[0])
            say(f"trial {trial.number} does not fit this device; not started: {e}")
            raise optuna.TrialPruned("does not fit the device") from None
        except RunPruned as e:
            trial.set_user_attr("run_dir", _run_dir(config))
            trial.set_user_attr("train_tokens", _tokens(config))
            say(str(e))
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("train_tokens", result.summary.get("train_tokens") or 0)
        loss = result.summary.get("eval_loss")
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("steps", result.summary.get("steps"))
        if loss is None or not math.isfinite(loss):
            raise ConfigError(
                f"trial {trial.number}: the run reported no eval loss (data.eval_fraction 0?)",
                hint="A study minimises eval loss: give the recipe an eval split.",
            )
        say(f"trial {trial.number}: eval loss {loss:.4f} after {evals} evaluation(s)")
        return float(loss)

    started = time.time()

    def budget(study: Any, _trial: Any) -> None:
        """Stop the study once its trained tokens (every trial, all calls) or this call's wall
        time reach the space's budget."""
        if "tokens" in space.budget:
            spent = sum(t.user_attrs.get("train_tokens", 0) for t in study.trials)
            if spent >= space.budget["tokens"]:
                say(f"budget: {spent:,} trained tokens >= {space.budget['tokens']:,.0f}; stopping")
                study.stop()
        if "seconds" in space.budget and time.time() - started >= space.budget["seconds"]:
            say(f"budget: {space.budget['seconds']:.0f} s of wall time spent; stopping")
            study.stop()

    study.optimize(objective, n_trials=trials, catch=(), callbacks=[budget])
    return summarize(study)


def _tokens(config: Any) -> int:
    from loft.train import rundir

    return int(rundir.read_summary(Path(config.output_dir)).get("train_tokens") or 0)


def _run_dir(config: Any) -> str:
    return str(config.output_dir)


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


def summarize(study: Any) -> list[TrialResult]:
    out = []
    for t in study.trials:
        out.append(
            TrialResult(
                t.number,
                t.state.name,
                t.value,
                dict(t.params),
                t.user_attrs.get("steps"),
                t.user_attrs.get("run_dir"),
            )  # fmt: skip
        )
    return out


def register_best(name: str, model_name: str | None = None) -> tuple[str, TrialResult]:
    """Register the best completed trial's model; its lineage names the study and the trial."""
    from loft import registry

    results = summarize(load_study(name))
    done = [r for r in results if r.state == "COMPLETE" and r.value is not None and r.run_dir]
    if not done:
        raise ConfigError(f"study {name!r} has no completed trial to register")
    best = min(done, key=lambda r: r.value)
    study = {
        "name": name,
        "trial": best.number,
        "eval_loss": best.value,
        "params": best.params,
        "trials": len(results),
        "storage": str(studies_dir() / f"{name}.journal"),
    }
    mv = registry.register(best.run_dir, name=model_name or name, study=study)
    return f"{mv.name}:{mv.version}", best


def load_study(name: str) -> Any:
    import optuna

    if not (studies_dir() / f"{name}.journal").is_file():
        raise ConfigError(f"no study named {name!r} in {studies_dir()}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage(name))


__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "TrialResult",
    "load_study",
    "register_best",
    "run_study",
    "summarize",
]
