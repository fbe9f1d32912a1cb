"""Search-space files for `loft tune` (issue 15, item 1): sampled through Optuna's own trial API,
applied to the recipe as --set overrides, and every problem reported at once with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

TICKETS = Path(__file__).resolve().parents[1] / "examples" / "support_tickets"

GOOD = """
params:
  training.lr: {float: [1.0e-4, 3.0e-3], log: true}
  lora.r: {int: [4, 32], step: 4}
  training.warmup_ratio: {choices: [0.0, 0.05, 0.1]}
  lora.alpha: {multiple_of: lora.r, choices: [1, 2]}
fixed:
  training.max_steps: 12
constraints:
  budget: {tokens: 200000}
"""


def _space(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.unit
def test_a_trial_samples_every_entry_and_builds_a_valid_config(tmp_path):
    import optuna

    from loft.hpo import load_space

    space = load_space(_space(tmp_path, GOOD), TICKETS / "lora.yaml")
    assert [p.path for p in space.params] == [
        "training.lr", "lora.r", "training.warmup_ratio", "lora.alpha",
    ]  # fmt: skip
    assert space.budget == {"tokens": 200000.0} and space.fits_device
    fixed = optuna.trial.FixedTrial(
        {"training.lr": 5e-4, "lora.r": 8, "training.warmup_ratio": 0.05, "lora.alpha/lora.r": 2}
    )
    values = space.sample(fixed)
    assert values == {
        "training.lr": 5e-4, "lora.r": 8, "training.warmup_ratio": 0.05, "lora.alpha": 16,
    }  # fmt: skip
    cfg = space.trial_config(TICKETS / "lora.yaml", values)
    assert (cfg.training.lr, cfg.lora.r, cfg.lora.alpha) == (5e-4, 8, 16)
    assert cfg.training.max_steps == 12  # fixed
    assert Path(cfg.data.train) == TICKETS / "train.jsonl"  # the recipe's paths still resolve

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # a real sampler stays inside the ranges, alpha a multiple of r
        v = space.sample(study.ask())
        assert 1e-4 <= v["training.lr"] <= 3e-3 and v["lora.r"] % 4 == 0
        assert v["lora.alpha"] in (v["lora.r"], 2 * v["lora.r"])


@pytest.mark.unit
def test_every_space_problem_is_reported_at_once_with_its_key_path(tmp_path):
    from loft.core.errors import ConfigError
    from loft.hpo import load_space

    bad = """
params:
  training.lrate: {float: [1e-4, 1e-3]}
  training.lr: {float: [0.0, 1e-3], log: true}
  lora.r: {int: [32, 4]}
  lora.dropout: {choices: []}
  lora.alpha: {multiple_of: lora.rank, choices: [2]}
  training.warmup_ratio: {float: [0, 0.1], choices: [0.1]}
fixed:
  training.max_step: 10
constraints:
  budget: {hours: 2}
  gpus: 2
extra: 1
"""
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, bad))
    msg = str(e.value)
    for want in (
        "params.training.lrate: training has no key 'lrate'",
        "params.training.lr: float: a log range needs low > 0",
        "params.lora.r: int: low 32 must be below high 4",
        "params.lora.dropout: choices: expected a non-empty list",
        "params.lora.alpha.multiple_of: 'lora.rank' is neither sampled before it nor a fixed",
        "params.training.warmup_ratio: name exactly one of",
        "fixed.training.max_step: training has no key 'max_step'",
        "constraints.budget: expected {tokens: N} or {seconds: N}",
        "constraints.gpus: unknown key",
        "extra: unknown key",
    ):
        assert want in msg, want
    assert "10 problems" in msg


@pytest.mark.unit
def test_range_ends_the_training_config_refuses_are_named(tmp_path):
    from loft.core.errors import ConfigError
    from loft.hpo import load_space

    text = "params:\n  lora.dropout: {float: [0.0, 1.5]}\n  training.lr: {float: [1e-4, 1e-3]}\n"
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, text), TICKETS / "lora.yaml")
    msg = str(e.value)
    assert "params.lora.dropout: at 1.5 the training config refuses it" in msg
    assert "training.lr" not in msg.split("refuses it")[1].splitlines()[0]  # lr's ends are fine
    assert "1 problem" in msg


@pytest.mark.unit
def test_objective_problems_are_named_with_their_key_paths(tmp_path):
    from loft.core.errors import ConfigError
    from loft.hpo import load_space

    text = (
        "params:\n  training.lr: {float: [1.0e-4, 1.0e-3]}\n"
        "objective:\n  metric: json_exact\n  direction: up\n  n: 0\n  also: cost\n  k: 1\n"
    )
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, text))
    msg = str(e.value)
    for want in (
        "objective.metric: unknown metric(s): json_exact",
        "objective.data: metric 'json_exact' is measured on a held-out file; name it",
        "objective.direction: got 'up': minimize or maximize",
        "objective.n: got 0: a positive whole number",
        "objective.also: got 'cost': one of train_seconds, planner_bytes",
        "objective.k: unknown key",
    ):
        assert want in msg, want
    (tmp_path / "held.jsonl").write_text("{}\n")
    good = load_space(
        _space(
            tmp_path,
            "params:\n  training.lr: {float: [1.0e-4, 1.0e-3]}\n"
            "objective: {metric: json_exact_match, data: held.jsonl, also: train_seconds}\n",
        )
    )
    o = good.objective
    assert o.data == str(tmp_path / "held.jsonl")  # relative to the space file
    assert o.directions == ["maximize", "minimize"] and o.names[1] == "train_seconds"
    missing = "params:\n  training.lr: {float: [1.0e-4, 1.0e-3]}\nobjective: {data: nope.jsonl}\n"
    with pytest.raises(ConfigError, match=r"objective.data: .*nope.jsonl is not a file"):
        load_space(_space(tmp_path, missing))


@pytest.mark.unit
def test_a_grid_needs_finite_values_for_every_entry(tmp_path):
    from loft.core.errors import ConfigError
    from loft.hpo import load_space

    space = load_space(_space(tmp_path, GOOD))
    with pytest.raises(ConfigError) as e:
        space.grid()
    assert "params.training.lr: a log float range has none" in str(e.value)
    text = (
        "params:\n  training.lr: {float: [1.0e-4, 3.0e-4], step: 1.0e-4}\n"
        "  lora.r: {int: [4, 12], step: 4}\n  lora.alpha: {multiple_of: lora.r, choices: [1, 2]}\n"
    )
    grid = load_space(_space(tmp_path, text)).grid()
    assert grid == {
        "training.lr": [1e-4, 2e-4, 3e-4], "lora.r": [4, 8, 12], "lora.alpha/lora.r": [1, 2],
    }  # fmt: skip
