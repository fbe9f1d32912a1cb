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
"""

from __future__ import annotations

import argparse
import json
import os
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
        "trials": len(trials),
        "completed": len(done),
        "pruned": sum(t.state == "PRUNED" for t in trials),
        "best_eval_loss": round(best.value, 5),
        "best_params": best.params,
        "train_tokens": sum(t.train_tokens for t in trials),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-json", type=Path, help="Reuse the grid of an earlier run's JSON.")
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
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
