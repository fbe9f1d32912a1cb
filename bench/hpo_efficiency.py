"""What a study saves over a grid: an exhaustive grid vs a 12-trial TPE + successive-halving study.

    .venv/bin/python bench/hpo_efficiency.py [--records 300] [--steps 12] [--trials 12] [--json]

The task is the support-ticket recipe (examples/support_tickets/lora.yaml: LoRA on the builtin
SmolLM2-135M-Instruct) on the first ``--records`` tickets (10% of them held out as the eval split
every trial is scored on), ``--steps`` optimizer steps of 8 examples, evaluated every quarter of
the run. Both searches cover the same ranges and give every trial that runs to the end the same
budget (the same steps):

- the grid: every one of lr {3e-4, 1e-3, 3e-3} x r {4, 8, 16} x warm-up ratio {0, 0.1} (18
  points), each trained to the end (``--sampler grid --pruner none``);
- the study: ``--trials`` trials of TPE (lr sampled on a log scale between the grid's ends, r and
  warm-up from the grid's values) with successive halving on the eval loss at each evaluation
  (loft's defaults: ``--sampler tpe --pruner successive_halving``), seed ``--seed``.

Both run through ``loft.hpo.run_study``, as ``loft tune`` runs them, in one process, one after the
other, in a temporary LOFT_HOME. It prints each one's best eval loss, trained tokens (every trial,
pruned ones' steps included) and wall time, and the ratios. The target (issue 15): the study's
best within 1% of the grid's using <= 40% of its trained tokens. Trained tokens do not depend on
the machine's load; wall times do (quote idle runs).

``--grid-json FILE`` takes the grid from an earlier run's result JSON (the last line it prints on
stderr) instead of training it again: on CPU the grid's losses and tokens are the same every run
(fixed seeds, deterministic kernels), so only its wall time is then from another run, which the
output says.

One study is one draw of its sampler: ``--replay N`` (default 100) also replays the same study
(loft's sampler and pruner, seeds 0 to N-1) against a surrogate built from every learning curve
measured in this run (the grid's, the study's completed trials', and those of ``--grid-json``):
at each evaluation step, the eval loss of a (rank, warm-up) pair is interpolated linearly in
log(lr) between the measured curves of that pair, and a trained step costs the grid's mean tokens
per step. It prints how often the target holds over the seeds and the median loss gap and token
share: the distribution the single trained study is one sample of. The replay takes seconds; it
is an estimate (the loss between measured learning rates is interpolated, not trained).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "support_tickets"

GRID = """params:
  training.lr: {choices: [3.0e-4, 1.0e-3, 3.0e-3]}
  lora.r: {choices: [4, 8, 16]}
  training.warmup_ratio: {choices: [0.0, 0.1]}
"""
STUDY = """params:
  training.lr: {float: [3.0e-4, 3.0e-3], log: true}
  lora.r: {choices: [4, 8, 16]}
  training.warmup_ratio: {choices: [0.0, 0.1]}
"""


def _recipe(work: Path, records: int, steps: int) -> Path:
    import yaml

    lines = (TICKETS / "train.jsonl").read_text().splitlines()[:records]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    doc = yaml.safe_load((TICKETS / "lora.yaml").read_text())
    doc["data"].update(train="train.jsonl", eval_fraction=0.1)
    every = max(1, steps // 4)
    doc["training"].update(max_steps=steps, eval_every=every, save_every=every)
    doc["tracking"] = {"uri": "none"}  # the searches, not MLflow, are measured
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _search(recipe: Path, work: Path, name: str, text: str, **kw) -> dict:
    from loft.hpo import load_space
    from loft.hpo.study import run_study

    space_file = work / f"{name}.yaml"
    space_file.write_text(text)
    space = load_space(space_file, recipe)
    t0 = time.time()
    trials = run_study(recipe, space, name=name, say=lambda m: print(f"  {m}", file=sys.stderr),
                       **kw)  # fmt: skip
    wall = time.time() - t0
    done = [t for t in trials if t.state == "COMPLETE"]
    best = min(done, key=lambda t: t.value)
    return {
        "curves": _curves(name),
        "trials": len(trials),
        "completed": len(done),
        "pruned": sum(t.state == "PRUNED" for t in trials),
        "best_eval_loss": round(best.value, 5),
        "best_params": best.params,
        "train_tokens": sum(t.train_tokens for t in trials),
        "wall_s": round(wall, 1),
    }


def _curves(name: str) -> list[dict]:
    """Each completed trial's params and eval loss at every evaluation step."""
    from loft.hpo.storage import load_study

    return [
        {"params": t.params, "eval_loss": {str(k): v for k, v in t.intermediate_values.items()}}
        for t in load_study(name).get_trials(deepcopy=False)
        if t.state.name == "COMPLETE"
    ]


class Surrogate:
    """Eval loss at each evaluation step for any (lr, r, warm-up) of the study's space: per (r,
    warm-up), linear in log(lr) between the measured learning curves (held flat beyond them)."""

    def __init__(self, curves: list[dict]) -> None:
        self.by_pair: dict[tuple, dict[float, dict[int, float]]] = {}
        for c in curves:
            p = c["params"]
            pair = (p["lora.r"], p["training.warmup_ratio"])
            self.by_pair.setdefault(pair, {})[p["training.lr"]] = {
                int(k): v for k, v in c["eval_loss"].items()
            }
        steps = {tuple(sorted(v)) for d in self.by_pair.values() for v in d.values()}
        if len(steps) != 1:
            raise SystemExit(f"replay: curves evaluated at different steps: {sorted(steps)}")
        (self.steps,) = steps

    def __call__(self, lr: float, r: int, warmup: float) -> list[float]:
        import numpy as np

        measured = sorted(self.by_pair[(r, warmup)].items())
        xs = [math.log(x) for x, _ in measured]
        return [float(np.interp(math.log(lr), xs, [c[s] for _, c in measured])) for s in self.steps]


def replay(curves: list[dict], seeds: int, trials: int, grid: dict, steps: int) -> dict:
    """The study (loft's TPE + successive halving, as `loft tune` builds them) run ``seeds``
    times against the surrogate of ``curves``; how often it meets the target."""
    import optuna
    import yaml

    from loft.hpo.space import Space
    from loft.hpo.storage import quiet_optuna
    from loft.hpo.study import _pruner, _sampler

    quiet_optuna()
    loss = Surrogate(curves)
    space_doc = yaml.safe_load(STUDY)["params"]
    lr_low, lr_high = space_doc["training.lr"]["float"]
    ranks, warmups = space_doc["lora.r"]["choices"], space_doc["training.warmup_ratio"]["choices"]
    grid_steps = grid["trials"] * steps
    tokens_per_step = grid["train_tokens"] / grid_steps
    gaps, shares = [], []
    for seed in range(seeds):
        study = optuna.create_study(
            sampler=_sampler("tpe", seed, Space([]), trials),
            pruner=_pruner("successive_halving", loss.steps[0], steps),
        )
        trained = 0
        for _ in range(trials):
            t = study.ask()
            lr = t.suggest_float("training.lr", lr_low, lr_high, log=True)
            r = t.suggest_categorical("lora.r", ranks)
            w = t.suggest_categorical("training.warmup_ratio", warmups)
            prev, state = 0, None
            for step, value in zip(loss.steps, loss(lr, r, w), strict=True):
                trained, prev = trained + step - prev, step
                t.report(value, step)
                if step < steps and t.should_prune():  # loft never prunes at the last step
                    study.tell(t, state=optuna.trial.TrialState.PRUNED)
                    state = "pruned"
                    break
            if state is None:
                study.tell(t, value)
        gaps.append(study.best_value / grid["best_eval_loss"] - 1)
        shares.append(trained / grid_steps)
    both = sum(g <= 0.01 and s <= 0.40 for g, s in zip(gaps, shares, strict=True))
    return {
        "seeds": seeds,
        "curves": len(curves),
        "tokens_per_step": round(tokens_per_step),
        "target_met": round(both / seeds, 3),
        "within_1pct": round(sum(g <= 0.01 for g in gaps) / seeds, 3),
        "tokens_within_40pct": round(sum(s <= 0.40 for s in shares) / seeds, 3),
        "loss_gap_median": round(statistics.median(gaps), 4),
        "loss_gap_p90": round(sorted(gaps)[int(0.9 * (seeds - 1))], 4),
        "token_ratio_median": round(statistics.median(shares), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-json", type=Path, help="Reuse the grid of an earlier run's JSON.")
    ap.add_argument(
        "--replay",
        type=int,
        default=100,
        metavar="N",
        help="Also replay the study on N seeds against the measured curves (0: no).",
    )
    ap.add_argument("--json", action="store_true", help="Print only the result JSON.")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="loft-bench-hpo-"))
    os.environ["LOFT_HOME"] = str(work / "home")
    recipe = _recipe(work, args.records, args.steps)

    if args.grid_json:
        earlier = json.loads(args.grid_json.read_text().strip().splitlines()[-1])
        if (earlier["records"], earlier["steps"]) != (args.records, args.steps):
            sys.exit(
                f"{args.grid_json}: a grid of {earlier['records']} records x "
                f"{earlier['steps']} steps, not {args.records} x {args.steps}"
            )
        grid = {**earlier["grid"], "from": str(args.grid_json)}
        if args.replay and "curves" not in grid:
            sys.exit(f"{args.grid_json}: no learning curves to replay (an older run); --replay 0")
    else:
        print("grid: 18 points, each trained to the end", file=sys.stderr)
        grid = _search(recipe, work, "grid", GRID, trials=18, sampler="grid", pruner="none")
    print(f"study: {args.trials} trials, TPE + successive halving", file=sys.stderr)
    study = _search(
        recipe, work, "study", STUDY, trials=args.trials, sampler="tpe",
        pruner="successive_halving", seed=args.seed,
    )  # fmt: skip
    result = {
        "records": args.records,
        "steps": args.steps,
        "grid": grid,
        "study": study,
        "loss_gap": round(study["best_eval_loss"] / grid["best_eval_loss"] - 1, 4),
        "token_ratio": round(study["train_tokens"] / grid["train_tokens"], 3),
        "time_ratio": round(study["wall_s"] / grid["wall_s"], 3),
    }
    if args.replay:
        curves = grid["curves"] + study["curves"]
        result["replay"] = replay(curves, args.replay, args.trials, grid, args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'search':6} {'trials':>6} {'done':>5} {'pruned':>6} {'best loss':>9} {'tokens':>9} "
          f"{'wall s':>7}  best params")  # fmt: skip
    for label, r in (("grid", grid), ("study", study)):
        print(
            f"{label:6} {r['trials']:>6} {r['completed']:>5} {r['pruned']:>6} "
            f"{r['best_eval_loss']:>9.4f} {r['train_tokens']:>9,} {r['wall_s']:>7.0f}  "
            f"{r['best_params']}"
        )
    if "from" in grid:
        print(f"(the grid's figures are from {grid['from']}: its wall time is that run's)")
    print(
        f"study / grid: best eval loss {result['loss_gap']:+.2%}, trained tokens "
        f"{result['token_ratio']:.0%}, wall time {result['time_ratio']:.0%} "
        "(target: within 1%, <= 40% of the tokens)"
    )
    if "replay" in result:
        r = result["replay"]
        print(
            f"replayed on {r['seeds']} seeds against {r['curves']} measured curves: target met "
            f"{r['target_met']:.0%} (within 1%: {r['within_1pct']:.0%}, <= 40% of the tokens: "
            f"{r['tokens_within_40pct']:.0%}); median best eval loss {r['loss_gap_median']:+.1%} "
            f"(90th percentile {r['loss_gap_p90']:+.1%}) for {r['token_ratio_median']:.0%} of the "
            "grid's tokens"
        )
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
