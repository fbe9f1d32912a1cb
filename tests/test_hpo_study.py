"""`loft tune` studies on a tiny model (issue 15, item 2): trials are real training runs, the
pruner stops a bad one at an evaluation with fewer steps than a completed one, a new study starts
from the recipe's own values, and the journal under LOFT_HOME resumes a study by name."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import MemoryTracker
from test_train import tiny_config


def _recipe(tmp_path: Path, tiny_model: Path) -> Path:
    cfg = tiny_config(tmp_path, tiny_model, max_steps=8, eval_every=2, save_every=4, lr=5e-3)
    cfg["data"]["eval_fraction"] = 0.2
    cfg.pop("output_dir")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _space(tmp_path: Path, text: str):
    from loft.hpo import load_space

    p = tmp_path / "space.yaml"
    p.write_text(text)
    return load_space(p)


def _good_then_bad(name: str) -> None:
    """Study ``name`` with two trials queued: lr 5e-3 (learns), then 1e-8 (does not)."""
    import optuna

    from loft.hpo.study import storage

    study = optuna.create_study(study_name=name, storage=storage(name))
    study.enqueue_trial({"training.lr": 5e-3})
    study.enqueue_trial({"training.lr": 1e-8})


@pytest.mark.unit
@pytest.mark.slow
def test_a_bad_trial_is_pruned_at_an_evaluation_with_fewer_steps(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import run_study, studies_dir
    from loft.train import rundir

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(tmp_path, "params:\n  training.lr: {choices: [5.0e-3, 1.0e-8]}\n")
    _good_then_bad("prune")  # the second is worse at the first rung
    trials = run_study(
        recipe, space, name="prune", trials=2, pruner="successive_halving",
        tracker_factory=MemoryTracker,
    )  # fmt: skip
    done, pruned = trials
    assert (done.state, pruned.state) == ("COMPLETE", "PRUNED")
    assert done.steps == 8 and pruned.steps is not None and pruned.steps < done.steps
    assert done.value < pruned.value  # Optuna keeps a pruned trial's last reported loss
    assert Path(done.run_dir).parent == Path(pruned.run_dir).parent == studies_dir() / "prune"
    summary = rundir.read_summary(Path(pruned.run_dir))
    assert summary["status"] == "pruned" and summary["steps"] == pruned.steps
    assert (Path(pruned.run_dir) / "checkpoints").is_dir()  # kept, as a stopped run keeps one


@pytest.mark.unit
@pytest.mark.slow
def test_a_new_study_starts_at_the_recipe_and_resumes_by_name(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import load_study, run_study

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(
        tmp_path,
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "  lora.alpha: {multiple_of: lora.r, choices: [1, 2, 4]}\n"
        "fixed:\n  training.max_steps: 4\n  lora.r: 4\n",
    )
    first = run_study(recipe, space, name="warm", trials=1, tracker_factory=MemoryTracker)
    assert first[0].params == {"training.lr": 5e-3, "lora.alpha/lora.r": 2}  # alpha 8 = 2 x r 4
    assert first[0].state == "COMPLETE" and first[0].steps == 4  # the fixed override applied
    again = run_study(recipe, space, name="warm", trials=1, tracker_factory=MemoryTracker)
    assert [t.number for t in again] == [0, 1]  # the journal kept trial 0; one more ran
    assert again[0].value == first[0].value
    assert len(load_study("warm").trials) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_loft_tune_and_tune_status(tmp_path, tiny_model, loft_home, capsys):
    from helpers import run_cli

    recipe = _recipe(tmp_path, tiny_model)
    space = tmp_path / "space.yaml"
    space.write_text(
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "fixed:\n  training.max_steps: 2\n"
    )
    args = ("tune", str(recipe), "--space", str(space), "--trials", "1", "--study", "cli")
    assert run_cli(*args) == 0
    assert "best: trial 0" in capsys.readouterr().out
    assert run_cli("tune", "status", "cli", "--json") == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "cli" and [t["state"] for t in doc["trials"]] == ["COMPLETE"]
    assert doc["trials"][0]["params"] == {"training.lr": 5e-3}  # the recipe's value first
    assert run_cli(*args, "--register") == 0  # one more trial, then the best is registered
    assert "registered as cli:1 (study cli, trial " in capsys.readouterr().err
    from loft import registry

    lineage = registry.get_version("cli:1").card["lineage"]
    assert lineage["study"]["name"] == "cli" and lineage["study"]["trials"] == 2
    best = min(doc["trials"][0]["value"], lineage["study"]["value"])
    assert lineage["study"]["value"] == best and lineage["study"]["objective"] == "eval_loss"
    assert run_cli("registry", "show", "cli:1") == 0
    assert "study:    cli trial" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  training.lrate: {float: [1, 2]}\n")
    assert run_cli("tune", str(recipe), "--space", str(bad)) == 2
    assert "params.training.lrate: training has no key 'lrate'" in capsys.readouterr().err
    assert run_cli("tune", "status", "nope") == 2


@pytest.mark.unit
@pytest.mark.slow
def test_a_token_budget_stops_the_study(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import run_study

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(
        tmp_path,
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "fixed:\n  training.max_steps: 2\nconstraints:\n  budget: {tokens: 1}\n",
    )
    trials = run_study(recipe, space, name="budget", trials=3, tracker_factory=MemoryTracker)
    assert len(trials) == 1 and trials[0].state == "COMPLETE"  # 1 token was spent by trial 0


@pytest.mark.unit
@pytest.mark.slow
def test_each_trial_is_an_mlflow_child_run_of_the_study_run(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import load_study, run_study
    from loft.tracking import mlflow_client

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(tmp_path, "params:\n  training.lr: {choices: [5.0e-3, 1.0e-8]}\n")
    _good_then_bad("tracked")  # the second is pruned at the first rung
    run_study(recipe, space, name="tracked", trials=2)
    parent_id = load_study("tracked").user_attrs["loft"]["mlflow_run_id"]
    client = mlflow_client()
    parent = client.get_run(parent_id)
    assert parent.data.tags["loft.kind"] == "study" and parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["space.training.lr"]
    assert parent.data.metrics["trials/complete"] == 1 and parent.data.metrics["trials/pruned"] == 1
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_trial = {int(r.data.tags["loft.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1]
    assert (by_trial[0].info.status, by_trial[1].info.status) == ("FINISHED", "KILLED")
    for r in by_trial.values():
        assert r.data.params["training.lr"] in ("0.005", "1e-08")
        assert int(r.data.params["planner.estimate_bytes"]) > 0  # the planner's estimate
    evals = client.get_metric_history(by_trial[0].info.run_id, "eval/loss")
    assert [m.step for m in evals] == [2, 4, 6, 8]  # every eval_every steps, not every step
    assert len(client.get_metric_history(by_trial[1].info.run_id, "eval/loss")) == 1


@pytest.mark.unit
@pytest.mark.slow
def test_a_held_out_metric_and_train_time_give_a_pareto_front(tmp_path, tiny_model, loft_home):
    from loft.hpo.report import report
    from loft.hpo.study import run_study

    recipe = _recipe(tmp_path, tiny_model)
    (tmp_path / "heldout.jsonl").write_text((tmp_path / "chat.jsonl").read_text())
    space = _space(
        tmp_path,
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "  lora.r: {choices: [2, 4, 8]}\n"
        "fixed:\n  training.max_steps: 2\n"
        "objective:\n  metric: eval_loss\n  data: heldout.jsonl\n  n: 4\n  also: train_seconds\n",
    )
    said: list[str] = []
    trials = run_study(
        recipe, space, name="pareto", trials=3, sampler="random", tracker_factory=MemoryTracker,
        say=said.append,
    )  # fmt: skip
    assert "not pruning" in said[0]  # Optuna cannot prune a multi-objective study
    assert [t.state for t in trials] == ["COMPLETE"] * 3
    assert all(len(t.values) == 2 and t.values[1] > 0 for t in trials)
    rep = report("pareto")
    assert rep.objective == ["eval_loss", "train_seconds"]
    assert rep.directions == ["minimize", "minimize"] and rep.pareto
    front = [t for t in trials if t.number in rep.pareto]
    for t in front:  # no trial is better on both objectives than a trial on the front
        assert not any(u.values[0] < t.values[0] and u.values[1] < t.values[1] for u in trials)
    assert set(rep.importance) <= {"training.lr", "lora.r"} and rep.importance
    best = yaml.safe_load(Path(rep.best_config).read_text())
    chosen = next(t for t in trials if t.number == rep.best)
    assert best["training"]["lr"] == chosen.params["training.lr"]
    assert best["lora"]["r"] == chosen.params["lora.r"] and best["training"]["max_steps"] == 2
    assert Path(best["data"]["train"]).is_file()  # made absolute: best.yaml lives elsewhere


@pytest.mark.unit
@pytest.mark.slow
def test_a_grid_study_visits_each_point_once(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import run_study

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(
        tmp_path,
        "params:\n  training.lr: {choices: [1.0e-3, 5.0e-3]}\n  lora.r: {int: [2, 4], step: 2}\n"
        "fixed:\n  training.max_steps: 2\n",
    )
    trials = run_study(
        recipe, space, name="grid", trials=4, sampler="grid", pruner="none",
        tracker_factory=MemoryTracker,
    )  # fmt: skip
    points = sorted((t.params["training.lr"], t.params["lora.r"]) for t in trials)
    assert points == [(1e-3, 2), (1e-3, 4), (5e-3, 2), (5e-3, 4)]


def _journal_trials(home: Path, name: str) -> list:
    import optuna

    from loft.hpo.study import storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage(name)).trials


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_share_one_study_without_storage_errors(tmp_path, tiny_model, loft_home):
    from helpers import run_loft

    recipe = _recipe(tmp_path, tiny_model)
    space = tmp_path / "space.yaml"
    space.write_text(
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "fixed:\n  training.max_steps: 4\n"
    )
    r = run_loft(
        "tune", str(recipe), "--space", str(space), "--trials", "4", "--workers", "2",
        "--study", "par", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for bad in ("Traceback", "locked", "error", "Error"):
        assert bad not in r.stderr, r.stderr[-3000:]
    trials = _journal_trials(loft_home, "par")
    assert len(trials) == 4 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    pids = {t.user_attrs["owner"]["pid"] for t in trials}
    assert len(pids) == 2  # both workers ran trials
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    assert "[worker 0]" in r.stderr and "[worker 1]" in r.stderr
    import json

    assert [t["number"] for t in json.loads(r.stdout)["trials"]] == [0, 1, 2, 3]


def _start_long_tune(tmp_path: Path, tiny_model: Path, steps: int, *args: str, **popen):
    """`loft tune` of a long-running space (checkpoints every 3 steps, no pruning) in its own
    process group."""
    from helpers import start_loft

    recipe = _recipe(tmp_path, tiny_model)
    space = tmp_path / "space.yaml"
    space.write_text(
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        f"fixed:\n  training.max_steps: {steps}\n  training.save_every: 3\n"
        f"  training.eval_every: {steps // 2}\n"
    )
    return start_loft(
        "tune", str(recipe), "--space", str(space), "--pruner", "none", *args, **popen
    )


def _wait_until(proc, ready, timeout: float = 600) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the tune process ended before the test could stop it"


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_tune_resumes_without_losing_or_repeating_a_trial(
    tmp_path, tiny_model, loft_home, capsys
):
    import signal

    from helpers import run_cli
    from loft.train import rundir

    proc = _start_long_tune(
        tmp_path, tiny_model, 60, "--trials", "3", "--study", "kill",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    second = loft_home / "studies" / "kill" / "trial-1"

    def trial_1_under_way() -> bool:  # trial 0 is done, trial 1 has a checkpoint, not finished
        ckpts = list((second / "checkpoints").glob("step-*"))
        return bool(ckpts) and rundir.read_summary(second).get("status") == "running"

    try:
        _wait_until(proc, trial_1_under_way)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _journal_trials(loft_home, "kill")
    assert [t.state.name for t in before[:2]] == ["COMPLETE", "RUNNING"]
    first = Path(before[0].user_attrs["run_dir"])
    first_summary = (first / rundir.SUMMARY).read_bytes()

    assert run_cli("tune", "resume", "kill") == 0
    err = capsys.readouterr().err
    assert "trial 1: its process (pid" in err and "died while it ran" in err
    after = _journal_trials(loft_home, "kill")
    assert after[0].state.name == "COMPLETE" and after[0].value == before[0].value
    assert (first / rundir.SUMMARY).read_bytes() == first_summary  # not trained again
    assert after[1].state.name == "FAIL" and "died" in after[1].user_attrs["lost"]
    retry = [t for t in after if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == after[1].params and retry[0].user_attrs["run_dir"] == str(second)
    sessions = rundir.read_summary(second)["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from"].startswith("step-")
    counted = [t for t in after if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3  # the study's 3 trials, none twice
    assert len({t.user_attrs["run_dir"] for t in counted}) == 3
    assert run_cli("tune", "resume", "kill") == 0  # nothing left: no trial added
    assert len(_journal_trials(loft_home, "kill")) == len(after)


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_stops_every_worker_at_a_checkpoint_and_resume_finishes(
    tmp_path, tiny_model, loft_home, capsys
):
    import signal

    from helpers import descendants, run_cli
    from loft.train import rundir

    proc = _start_long_tune(
        tmp_path, tiny_model, 200, "--trials", "2", "--workers", "2", "--study", "stop"
    )
    runs = [loft_home / "studies" / "stop" / f"trial-{n}" for n in (0, 1)]
    workers: list[int] = []
    try:
        _wait_until(proc, lambda: all(list((r / "checkpoints").glob("step-*")) for r in runs))
        workers = descendants(proc.pid)  # in their own sessions: Ctrl-C reaches them via tune
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the tune process's group
        out, err = proc.communicate(timeout=300)
    finally:
        for pid in [proc.pid, *workers]:  # whatever is left if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "study stop stopped: 0 of 2 trials finished" in err
    assert "loft tune resume stop" in err and "Traceback" not in err
    stopped = _journal_trials(loft_home, "stop")
    assert [t.state.name for t in stopped] == ["FAIL", "FAIL"]
    assert all(t.user_attrs.get("interrupted") for t in stopped)
    for r in runs:
        assert rundir.read_summary(r)["status"] == "interrupted"

    assert run_cli("tune", "resume", "stop", "--workers", "2") == 0
    assert "trial 0 was stopped; retrying it from its checkpoint" in capsys.readouterr().err
    after = _journal_trials(loft_home, "stop")
    assert [t.state.name for t in after] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert sorted(t.user_attrs["retry_of"] for t in after[2:]) == [0, 1]
    for r in runs:
        sessions = rundir.read_summary(r)["sessions"]
        assert [s["status"] for s in sessions] == ["interrupted", "completed"]
        assert sessions[1]["resumed_from"].startswith("step-")


@pytest.mark.unit
@pytest.mark.slow
def test_a_generation_metric_is_maximised_and_logged_on_the_trial_run(
    tmp_path, tiny_model, loft_home
):
    from loft.hpo.report import register_best, report
    from loft.hpo.study import run_study
    from loft.tracking import mlflow_client

    recipe = _recipe(tmp_path, tiny_model)
    (tmp_path / "heldout.jsonl").write_text((tmp_path / "chat.jsonl").read_text())
    space = _space(
        tmp_path,
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "fixed:\n  training.max_steps: 4\n"
        "objective: {metric: exact_match, data: heldout.jsonl, n: 2, max_new_tokens: 4}\n",
    )
    trials = run_study(recipe, space, name="gen", trials=2, pruner="hyperband")
    assert all(t.direction == "maximize" for t in trials)
    done = [t for t in trials if t.state == "COMPLETE"]
    assert done and all(0.0 <= t.value <= 1.0 for t in done)
    rep = report("gen")
    assert rep.objective == ["exact_match"] and rep.directions == ["maximize"]
    best = next(t for t in done if t.number == rep.best)
    assert best.value == max(t.value for t in done)
    from loft.train import rundir

    run_id = rundir.read_summary(Path(best.run_dir))["mlflow_run_id"]
    logged = mlflow_client().get_run(run_id).data.metrics
    assert logged["objective/exact_match"] == best.value
    ref, _ = register_best("gen")
    from loft import registry

    study = registry.get_version(ref).card["lineage"]["study"]
    assert study["objective"] == "exact_match" and study["value"] == best.value


@pytest.mark.integration
@pytest.mark.slow
def test_a_study_on_postgresql_shared_by_two_workers(
    tmp_path, tiny_model, loft_home, pg_url, monkeypatch
):
    from loft.hpo.report import register_best
    from loft.hpo.study import load_study, run_study

    monkeypatch.setenv("LOFT_STUDIES_URL", pg_url)  # the workers inherit it
    recipe = _recipe(tmp_path, tiny_model)
    space = _space(
        tmp_path,
        "params:\n  training.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
        "fixed:\n  training.max_steps: 4\n",
    )
    trials = run_study(recipe, space, name="pg", trials=4, workers=2, pruner="none")
    assert [t.state for t in trials] == ["COMPLETE"] * 4
    assert len({t.owner_pid for t in trials}) == 2  # both worker processes ran trials
    assert not (loft_home / "studies" / "pg.journal").exists()  # the study is in the database
    assert len(load_study("pg").trials) == 4
    ref, _ = register_best("pg")
    from loft import registry

    where = registry.get_version(ref).card["lineage"]["study"]["storage"]
    assert where.startswith("postgresql://") and where.endswith("/" + pg_url.rsplit("/", 1)[1])
    monkeypatch.delenv("LOFT_STUDIES_URL")
    with pytest.raises(Exception, match="no study named 'pg'"):
        load_study("pg")  # the journal store knows nothing of it


@pytest.mark.unit
@pytest.mark.slow
def test_a_trial_is_never_pruned_at_its_last_step(tmp_path, tiny_model, loft_home):
    from loft.hpo.study import run_study

    recipe = _recipe(tmp_path, tiny_model)  # 8 steps
    space = _space(
        tmp_path,
        "params:\n  training.lr: {choices: [5.0e-3, 1.0e-8]}\nfixed:\n  training.eval_every: 8\n",
    )
    _good_then_bad("last")  # the second is worse at its only evaluation, the last step
    trials = run_study(recipe, space, name="last", trials=2, pruner="successive_halving",
                       tracker_factory=MemoryTracker)  # fmt: skip
    assert [t.state for t in trials] == ["COMPLETE", "COMPLETE"]  # its tokens were spent anyway
    assert trials[0].value < trials[1].value and trials[1].steps == 8
