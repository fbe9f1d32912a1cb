"""The dispatch table: what each job kind runs, by name.

A job runs as the loft command a user would type, in its own process: ``train`` as
``loft train CONFIG --set output_dir=JOB_DIR/run ...`` (``--resume`` on a later attempt, so a
requeued or orphaned job continues from its last checkpoint), the others as ``loft <command>
ARGS`` (in the folder ``spec["cwd"]`` names when it names one: a pipeline stage's relative paths
are relative to its pipeline file). A command that writes ``result.json`` into its job's folder
(``LOFT_HOME/jobs/$LOFT_JOB_ID``; ``loft schedule check`` does) has that object as its result.
jobs/ never imports torch or the stages themselves (DESIGN.md): the stage runs in the child, and
the planner's memory estimate for admission comes from ``loft plan --json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError

# kind -> the loft command words that run it
COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "eval": ("eval",),
    "merge": ("merge",),
    "export": ("export",),
    "tune": ("tune",),
    "data-prepare": ("data", "prepare"),
    "data-validate": ("data", "validate"),
    "watch": ("watch",),
    "rollout": ("rollout",),
    "schedule-check": ("schedule", "check"),
}
KINDS = tuple(COMMANDS)
_STEP = re.compile(
    r"^step (\d+)/(\d+)\s+loss ([\d.]+).*?([\d,.]+) tok/s.*?(?:eta ([\d,]+)s)?\s*$", re.M
)


@dataclass
class Admission:
    spec: dict[str, Any]
    resources: dict[str, Any]


def admit_train(config: str | Path, sets: list[str], *, capacities: list[int]) -> Admission:
    """Validate a training config as `loft train` does, and estimate its peak memory with the
    planner (`loft plan CONFIG --json`, in a child: no torch here). Refused with the planner's
    itemised estimate when no worker (nor this machine) has room for it."""
    from loft.core.config import load_config

    path = Path(config).resolve()
    load_config(path, sets)  # every problem with its key path, as `loft train` reports it
    cmd = [sys.executable, "-m", "loft.cli.main", "plan", str(path), "--json"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ConfigError(
            f"{path}: the planner could not estimate this job: {proc.stderr.strip()[-800:]}"
        )
    plan = json.loads(proc.stdout)
    need = int(plan["total_bytes"])
    here = int(plan.get("target", {}).get("capacity_bytes") or 0)
    room = [c for c in [here, *capacities] if c]
    if room and need > max(room):
        items = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan.get("breakdown", {}).items() if v)
        raise ConfigError(
            f"{path}: this job needs an estimated {need / 2**30:.2f} GiB at its peak ({items} "
            f"GiB); the largest worker (or this machine) has {max(room) / 2**30:.2f} GiB",
            hint=f"`loft plan {path}{''.join(f' --set {s}' for s in sets)}` lists changes that "
            "would fit (a smaller micro-batch, gradient checkpointing, QLoRA).",
        )
    return Admission({"config": str(path), "set": list(sets)}, {"mem_bytes": need})


def argv(kind: str, spec: dict[str, Any], job_dir: Path, resume: bool) -> list[str]:
    """The loft command line that runs this job (its first attempt, or a resumed one)."""
    if kind not in COMMANDS:
        raise ConfigError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "train":
        run = job_dir / "run"
        out = ["train", spec["config"], "--set", f"output_dir={run}"]
        for s in spec.get("set", []):
            out += ["--set", s]
        if resume and (run / "resolved.yaml").is_file():
            out.append("--resume")
        return out
    return [*COMMANDS[kind], *spec.get("args", [])]


def result(kind: str, job_dir: Path) -> dict[str, Any]:
    """What a finished job produced, for its row."""
    if kind != "train":
        try:
            found = json.loads((job_dir / "result.json").read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}
    summary = job_dir / "run" / "run_summary.json"
    if not summary.is_file():
        return {}
    s = json.loads(summary.read_text())
    keep = ("run_dir", "status", "registered", "steps", "eval_loss", "train_tokens", "output_path")
    return {k: s[k] for k in keep if s.get(k) is not None}


def progress(kind: str, log_tail: str) -> dict[str, Any] | None:
    """The newest `step N/T loss ... tok/s ... eta Ss` line a training job printed."""
    if kind != "train":
        return None
    found = list(_STEP.finditer(log_tail))
    if not found:
        return None
    step, total, loss, tok_s, eta = found[-1].groups()
    out: dict[str, Any] = {"step": int(step), "total": int(total), "loss": float(loss),
                           "tokens_per_s": float(tok_s.replace(",", ""))}  # fmt: skip
    if eta:
        out["eta_s"] = int(eta.replace(",", ""))
    return out


__all__ = ["COMMANDS", "KINDS", "Admission", "admit_train", "argv", "progress", "result"]
