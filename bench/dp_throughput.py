"""Differentially private LoRA (issue 20): DP-SGD throughput vs non-DP, and what DP buys.

    python bench/dp_throughput.py                 # tokens/s, DP vs non-DP, same data and steps
    python bench/dp_throughput.py --quality       # + canary exposure and the demo metric
    python bench/dp_throughput.py --quality --skip-throughput --out results.json

Every run trains SmolLM2-135M-Instruct with LoRA through ``loft.train.train`` in a temporary
LOFT_HOME (the converted base model is linked from yours), with ``data.packing: false`` for DP and
non-DP alike (DP needs one example per row), so the only difference is ``privacy:``.

``--quality`` measures:
  (a) canary exposure: a small support-ticket set with ``data.canaries`` inserted, trained for many
      epochs so that without DP the canaries are memorised, then the same with ``privacy.epsilon``;
      ``loft.evaluate.audit.audit_canaries`` ranks each true secret among ``--candidates`` random
      ones (chance: mean exposure about 1.4 bits; memorised: rank 1 or 2);
  (b) the demo task (examples/support_tickets): held-out JSON exact match after the same training
      with and without DP at ``--epsilon``, as a fraction of the non-DP score.
The last line printed is one JSON object with every number.
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


def _home(tmp: Path) -> Path:
    """A fresh LOFT_HOME whose models/ is the user's (the converted SmolLM2 is reused)."""
    from loft.core.paths import loft_home

    mine = loft_home()
    home = tmp / "home"
    home.mkdir()
    (mine / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(mine / "models", target_is_directory=True)
    return home


def _subset(src: Path, dest: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(True)[:n]
    dest.write_text("".join(lines), encoding="utf-8")
    return dest


def _train(cfg: dict, tag: str) -> dict:
    from loft.core.config import validate_config
    from loft.train import train

    t0 = time.perf_counter()
    result = train(validate_config(cfg, tag), progress=False)
    s = result.summary
    return {
        "tag": tag,
        "run_dir": str(result.run_dir),
        "adapter": str(result.output_path),
        "tokens_per_s": s.get("tokens_per_s"),
        "train_s": s.get("train_s"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "final_train_loss": s.get("final_train_loss"),
        "privacy": s.get("privacy"),
    }


def _base_cfg(
    train_file: Path, out: Path, *, steps: int | None, epochs: float | None, **kw
) -> dict:
    training = {
        "micro_batch_size": kw.get("mbs", 8),
        "grad_accum": kw.get("accum", 1),
        "lr": kw.get("lr", 1e-3),
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "save_every": 10_000,
        "eval_every": 10_000,
        "precision": "fp32",
        "seed": kw.get("seed", 0),
    }
    if steps:
        training["max_steps"] = steps
    if epochs:
        training["epochs"] = epochs
    return {
        "base_model": kw.get("base_model", "smollm2-135m-instruct"),
        "method": "lora",
        "data": {
            "train": str(train_file),
            "eval_fraction": 0.0,
            "max_seq_len": kw.get("max_seq_len", 256),
            "packing": False,
            "canaries": kw.get("canaries", 0),
            "dedup": False,
            "pii": "off",
        },
        "lora": {
            "r": kw.get("r", 16),
            "alpha": kw.get("alpha", 32),
            "dropout": 0.0,
            "target_modules": kw.get("targets", "all-linear"),
        },
        "training": training,
        "output_dir": str(out),
        "register": False,
    }


def throughput(tmp: Path, args) -> dict:
    data = _subset(TICKETS / "train.jsonl", tmp / "tp.jsonl", 400)
    out = {}
    for tag, privacy in (("non_dp", None), ("dp", {"noise_multiplier": 1.0})):
        cfg = _base_cfg(data, tmp / f"tp-{tag}", steps=args.tp_steps, epochs=None)
        if privacy:
            cfg["privacy"] = privacy
        out[tag] = _train(cfg, f"throughput-{tag}")
        print(f"throughput {tag}: {out[tag]['tokens_per_s']} tok/s", file=sys.stderr)
    out["dp_over_non_dp"] = round(out["dp"]["tokens_per_s"] / out["non_dp"]["tokens_per_s"], 3)
    return out


def canaries(tmp: Path, args) -> dict:
    from loft.evaluate.audit import audit_canaries

    data = _subset(TICKETS / "train.jsonl", tmp / "canary.jsonl", args.canary_rows)
    out: dict = {"rows": args.canary_rows, "canaries": args.n_canaries, "epochs": args.epochs}
    for tag, privacy in _variants(args):
        cfg = _base_cfg(
            data, tmp / f"canary-{tag}", steps=None, epochs=args.epochs, mbs=args.canary_mbs,
            canaries=args.n_canaries, lr=args.canary_lr, max_seq_len=160, r=args.canary_r,
            alpha=2 * args.canary_r, base_model=args.base_model,
        )  # fmt: skip
        if privacy:
            cfg["privacy"] = privacy
        run = _train(cfg, f"canary-{tag}")
        rep = audit_canaries(run["adapter"], candidates=args.candidates, seed=0)
        out[tag] = {
            **run,
            "mean_exposure": round(rep["mean_exposure"], 3),
            "max_exposure": round(rep["max_exposure"], 3),
            "memorised": rep["n_memorised"],
            "ranks": [c["rank"] for c in rep["canaries"]],
            "max_possible_exposure": round(rep["max_possible_exposure"], 3),
        }
        print(f"canaries {tag}: {json.dumps(out[tag])}", file=sys.stderr)
    return out


def demo_metric(tmp: Path, args) -> dict:
    from loft.evaluate import evaluate_generation, load_jsonl_records
    from loft.evaluate.loading import load_target

    records = load_jsonl_records(TICKETS / "heldout.jsonl")[: args.heldout]
    out: dict = {"heldout": len(records), "steps": args.demo_steps, "batch": args.demo_batch}
    for tag, privacy in _variants(args):
        cfg = _base_cfg(
            TICKETS / "train.jsonl", tmp / f"demo-{tag}", steps=args.demo_steps, epochs=None,
            mbs=8, accum=args.demo_batch // 8, lr=args.demo_lr,
        )  # fmt: skip
        if privacy:
            cfg["privacy"] = privacy
        run = _train(cfg, f"demo-{tag}")
        target = load_target(run["adapter"])
        scored = evaluate_generation(
            target.model, target.tokenizer, records, max_new_tokens=32, progress=False
        )
        out[tag] = {**run, "json_exact_match": round(scored.score, 4)}
        print(f"demo {tag}: {json.dumps(out[tag])}", file=sys.stderr)
    if "non_dp" in out and "dp" in out:
        base = out["non_dp"]["json_exact_match"]
        out["dp_fraction_of_non_dp"] = (
            round(out["dp"]["json_exact_match"] / base, 3) if base else None
        )
    return out


def _variants(args) -> list[tuple[str, dict | None]]:
    """(tag, privacy section) of the quality runs ``--variants`` names."""
    known = {"non_dp": None, "dp": {"epsilon": args.epsilon}}
    return [(v, known[v]) for v in args.variants.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", action="store_true", help="Also canary exposure + demo metric.")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-canaries", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--tp-steps", type=int, default=6, help="Steps per throughput run.")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument(
        "--variants", default="non_dp,dp", help="Quality runs to make (e.g. dp alone, to run the "
        "two halves as separate processes).",
    )  # fmt: skip
    ap.add_argument("--canary-rows", type=int, default=24, help="Support tickets beside them.")
    ap.add_argument("--n-canaries", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--canary-lr", type=float, default=2e-3)
    ap.add_argument("--canary-mbs", type=int, default=4, help="Global batch of canary runs.")
    ap.add_argument("--canary-r", type=int, default=16, help="LoRA rank of canary runs.")
    ap.add_argument(
        "--base-model", default="smollm2-135m-instruct",
        help="Base of the canary runs (a folder works: e.g. a tiny model for a quick check).",
    )  # fmt: skip
    ap.add_argument("--demo-steps", type=int, default=30)
    ap.add_argument("--demo-batch", type=int, default=32, help="Global batch (multiple of 8).")
    ap.add_argument("--demo-lr", type=float, default=2e-3)
    ap.add_argument("--heldout", type=int, default=50, help="Held-out tickets scored.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict = {"cpu_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="loft-dp-bench-") as d:
        tmp = Path(d)
        os.environ["LOFT_HOME"] = str(_home(tmp))
        if not args.skip_throughput:
            results["throughput"] = throughput(tmp, args)
        if args.quality and not args.skip_canaries:
            results["canaries"] = canaries(tmp, args)
        if args.quality and not args.skip_demo:
            results["demo"] = demo_metric(tmp, args)
    line = json.dumps(results)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
