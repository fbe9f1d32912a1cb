"""`loft tune` studies on a tiny model (issue 15, item 2): trials are real training runs, the
pruner stops a bad one at an evaluation with fewer steps than a completed one, a new study starts
from the recipe's own values, and the journal under LOFT_HOME resumes a study by name."""

from __future__ import annotations

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


@pytest.mark.unit
@pytest.mark.slow
def test_a_bad_trial_is_pruned_at_an_evaluation_with_fewer_steps(tmp_path, tiny_model, loft_home):
    import optuna

    from loft.hpo.study import run_study, storage, studies_dir
    from loft.train import rundir

    recipe = _recipe(tmp_path, tiny_model)
    space = _space(tmp_path, "params:\n  training.lr: {choices: [5.0e-3, 1.0e-8]}\n")
    study = optuna.create_study(study_name="prune", storage=storage("prune"))
    study.enqueue_trial({"training.lr": 5e-3})  # learns
    study.enqueue_trial({"training.lr": 1e-8})  # does not: worse at the first rung
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
    assert doc["study"] == "cli" and [t["state"] for t in doc["trials"]] == ["COMPLETE"]
    assert doc["trials"][0]["params"] == {"training.lr": 5e-3}  # the recipe's value first
    assert run_cli(*args, "--register") == 0  # one more trial, then the best is registered
    assert "registered as cli:1 (study cli, trial " in capsys.readouterr().err
    from loft import registry

    lineage = registry.get_version("cli:1").card["lineage"]
    assert lineage["study"]["name"] == "cli" and lineage["study"]["trials"] == 2
    best = min(doc["trials"][0]["value"], lineage["study"]["eval_loss"])
    assert lineage["study"]["eval_loss"] == best
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
