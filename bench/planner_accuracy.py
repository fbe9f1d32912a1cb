"""Planner accuracy: the pre-flight memory estimate of `loft train` vs the measured peak.

    .venv/bin/python bench/planner_accuracy.py [--quick] [--json PATH] [--only NAME ...]

Every case is a real `loft train CONFIG -q` in a fresh subprocess (a temp LOFT_HOME whose models/
links to the real one, so the builtin SmolLM2 conversion is reused), 2-3 optimizer steps on
synthetic chat data of controlled length. The run records its own estimate
(`memory_estimate.total_bytes`, for the largest micro-batch the step plan draws) beside its
measured peak (`peak_mem_bytes`: ru_maxrss of the training process on CPU,
torch.cuda.max_memory_allocated on a GPU) in run_summary.json; this prints both and the error,
and checks that `loft plan CONFIG --json` on the same machine prints the same estimate (column
"plan": "=" when it does).

Cases on CPU: a tiny random 2-layer Llama (SmolLM2 vocabulary) and SmolLM2-135M; LoRA, DoRA and
full fine-tuning; micro-batch 1/4/8; short (~64-token) and long (~250-token) examples; gradient
checkpointing on and off; fp32, and bf16 autocast where the CPU has native bf16. GPU cases
(QLoRA, LoRA on SmolLM2) run only when torch sees a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024**2
TOLERANCE = 0.15
SMOLLM2 = "smollm2-135m-instruct"

# words of filler per assistant reply -> about 64 and 250 tokens per example with the template
LENGTHS = {"short": 24, "long": 205}
WORDS = " ".join(
    [
        "ticket order refund account login password shipping invoice delivery warehouse printer",
        "update install network server battery screen charger cable router firmware subscription",
        "payment receipt address customer support agent schedule meeting report summary",
    ]
).split()


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "tiny" or "smollm2"
    method: str = "lora"
    micro_batch: int = 4
    length: str = "short"  # key of LENGTHS
    max_seq_len: int = 256
    checkpointing: bool = False
    precision: str = "fp32"  # "fp32" | "bf16"
    steps: int = 2
    device: str = "cpu"

    def overrides(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "data.max_seq_len": self.max_seq_len,
            "training.micro_batch_size": self.micro_batch,
            "training.max_steps": self.steps,
            "training.gradient_checkpointing": self.checkpointing,
            "training.precision": self.precision,
        }


def cpu_cases() -> list[Case]:
    t, s = "tiny", "smollm2"
    return [
        Case("tiny-lora-mb1-short", t, "lora", 1, "short"),
        Case("tiny-lora-mb8-long", t, "lora", 8, "long", 512),
        Case("tiny-dora-mb4-short", t, "dora", 4, "short"),
        Case("tiny-full-mb4-short", t, "full", 4, "short"),
        Case("tiny-full-mb4-long-ckpt", t, "full", 4, "long", 512, True),
        Case("smol-lora-mb1-short", s, "lora", 1, "short"),
        Case("smol-lora-mb4-short", s, "lora", 4, "short"),
        Case("smol-lora-mb8-short", s, "lora", 8, "short"),
        Case("smol-lora-mb4-long", s, "lora", 4, "long", 512),
        Case("smol-lora-mb4-long-ckpt", s, "lora", 4, "long", 512, True),
        Case("smol-lora-mb8-long-bf16", s, "lora", 8, "long", 512, False, "bf16"),
        Case("smol-dora-mb4-long", s, "dora", 4, "long", 512),
        Case("smol-full-mb1-short", s, "full", 1, "short"),
        Case("smol-full-mb4-long", s, "full", 4, "long", 512),
        Case("smol-full-mb4-long-ckpt", s, "full", 4, "long", 512, True),
    ]


QUICK = ("tiny-lora-mb1-short", "tiny-full-mb4-short", "smol-lora-mb4-short")


def gpu_cases() -> list[Case]:
    s = "smollm2"
    return [
        Case("gpu-smol-qlora-mb8-long", s, "qlora", 8, "long", 512, True, "bf16", device="cuda"),
        Case("gpu-smol-lora-mb8-long", s, "lora", 8, "long", 512, True, "bf16", device="cuda"),
        Case("gpu-smol-lora-mb8-nockpt", s, "lora", 8, "long", 512, False, "bf16", device="cuda"),
    ]


def available(case: Case) -> tuple[bool, str]:
    """Whether this machine can run ``case``, and why not."""
    if case.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if case.method == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                return False, "bitsandbytes is not installed"
        return True, ""
    if case.precision == "bf16":
        from loft.train.device import cpu_supports_bf16

        if not cpu_supports_bf16():
            return False, "this CPU has no native bf16"
    return True, ""


def write_chat(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """``n`` single-turn chats whose reply is ``words`` words of varied filler (all trained)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(words))
        msgs = [
            {"role": "user", "content": f"Case {i}: summarise the ticket."},
            {"role": "assistant", "content": reply},
        ]
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_home(root: Path) -> Path:
    """A LOFT_HOME under ``root`` whose models/ is the real one (conversions are shared)."""
    from loft.core.paths import models_dir

    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    real = models_dir()
    real.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(real, target_is_directory=True)
    return home


def tiny_model(root: Path) -> Path:
    from loft.models.tiny import make_tiny_model

    return make_tiny_model(root / "tiny-llama", seed=0)


def run_case(case: Case, root: Path, *, timeout: float = 900) -> dict[str, Any]:
    """Train ``case`` in a fresh `loft train` subprocess; its estimate, measured peak and error."""
    import yaml

    work = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=root))
    home = make_home(root)
    base = str(tiny_model(root)) if case.model == "tiny" else SMOLLM2
    n_examples = case.micro_batch * case.steps
    data = write_chat(work / "train.jsonl", n_examples, LENGTHS[case.length])
    cfg = {
        "base_model": base,
        "data": {"train": str(data), "eval_fraction": 0.0, "dedup": False, "pii": "off"},
        "lora": {"r": 16, "alpha": 32},
        "training": {"save_every": 10_000, "eval_every": 10_000},
        "output_dir": str(work / "run"),
        "register": False,
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    sets: list[str] = []
    for key, value in case.overrides().items():
        sets += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    cmd = [sys.executable, "-m", "loft.cli.main", "train", str(cfg_path), "-q", *sets]
    env = {
        **os.environ,
        "LOFT_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    summary_path = work / "run" / "run_summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{case.name}: loft train exited {proc.returncode}\n{tail}")
    s = json.loads(summary_path.read_text())
    est = s["memory_estimate"]
    # `loft plan CONFIG` on the same machine runs the same pre-flight: it must print this number
    plan_cmd = [sys.executable, "-m", "loft.cli.main", "plan", str(cfg_path), "--json", *sets]
    plan = subprocess.run(plan_cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if plan.returncode != 0:
        raise RuntimeError(f"{case.name}: loft plan exited {plan.returncode}\n{plan.stderr}")
    measured = int(s["peak_mem_bytes"])
    total = int(est["total_bytes"])
    return {
        **asdict(case),
        "micro_batch_tokens": int(est["micro_batch_tokens"]),
        "estimate_bytes": total,
        "plan_bytes": int(json.loads(plan.stdout)["total_bytes"]),
        "measured_bytes": measured,
        "error": (total - measured) / measured,
        "breakdown": est["breakdown"],
        "placement": s.get("placement"),
        "seconds": round(seconds, 1),
    }


def print_table(rows: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> float:
    head = f"{'case':<30} {'method':<6} {'ckpt':<4} {'prec':<4} {'mb tokens':>9} "
    head += f"{'estimate MiB':>12} {'plan':>5} {'measured MiB':>12} {'error':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<30} {r['method']:<6} {'on' if r['checkpointing'] else 'off':<4} "
            f"{r['precision']:<4} {r['micro_batch_tokens']:>9} "
            f"{r['estimate_bytes'] / MIB:>12.0f} "
            f"{'=' if r['plan_bytes'] == r['estimate_bytes'] else 'DIFF':>5} "
            f"{r['measured_bytes'] / MIB:>12.0f} "
            f"{100 * r['error']:>+6.1f}%"
        )
    for name, why in skipped:
        print(f"{name:<30} skipped: {why}")
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    print(f"max |error| {100 * worst:.1f}% over {len(rows)} cases (target {100 * TOLERANCE:.0f}%)")
    differ = [r["name"] for r in rows if r["plan_bytes"] != r["estimate_bytes"]]
    print(
        "`loft plan CONFIG` printed the pre-flight estimate in every case"
        if not differ
        else f"`loft plan CONFIG` differs from the pre-flight in: {', '.join(differ)}"
    )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", nargs="+", default=None, help="case names to run")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--breakdown", action="store_true", help="print each estimate's breakdown")
    args = ap.parse_args()

    cases = cpu_cases() + gpu_cases()
    if args.quick:
        cases = [c for c in cases if c.name in QUICK or c.device == "cuda"]
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="loft-planner-acc-") as tmp:
        root = Path(tmp)
        for case in cases:
            ok, why = available(case)
            if not ok:
                skipped.append((case.name, why))
                print(f"skip {case.name}: {why}", file=sys.stderr)
                continue
            r = run_case(case, root)
            rows.append(r)
            print(
                f"{case.name}: estimate {r['estimate_bytes'] / MIB:.0f} MiB, measured "
                f"{r['measured_bytes'] / MIB:.0f} MiB ({100 * r['error']:+.1f}%, {r['seconds']}s)",
                file=sys.stderr,
            )
            if args.breakdown:
                parts = ", ".join(f"{k} {v / MIB:.0f}" for k, v in r["breakdown"].items() if v)
                print(f"  {parts} MiB", file=sys.stderr)
    worst = print_table(rows, skipped)
    if args.json:
        args.json.write_text(
            json.dumps({"cases": rows, "skipped": skipped, "max_abs_error": worst}, indent=2)
        )


if __name__ == "__main__":
    main()
