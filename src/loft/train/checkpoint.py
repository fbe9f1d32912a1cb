"""Training checkpoints: complete or invisible, keep the newest K, restore bit-for-bit.

A checkpoint holds only what cannot be recomputed: the trainable parameters (safetensors), the
optimizer state, the scheduler state, the RNG state and the step. Data order is a pure function of
(seed, epoch), so restoring the step restores the order.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loft.core.errors import IntegrityError
from loft.core.paths import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (they were renamed into place), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
    trainable: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """``trainable`` and ``optimizer_state``, when given, replace the model's and the optimizer's
    own (a sharded run passes them gathered, so the checkpoint has the single-process format)."""
    final = run_dir / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final, overwrite=True) as tmp:
        params = trainable if trainable is not None else trainable_state(model)
        save_file(params, str(tmp / "trainable.safetensors"))
        opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save(opt, tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if _jsonable(v)}
        full = {**state, "step": step, "scheduler": sched}
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _regrouped(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A checkpoint from before the optimizer had one group per kind of parameter (2e9ee00: a
    full fine-tune's layer weights, then the rest) holds one group in model order: its states
    are renumbered into the optimizer's groups. Any other state is returned as it is."""
    groups = optimizer.param_groups
    if len(state["param_groups"]) != 1 or len(groups) == 1:
        return state
    order = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    flat = [order[id(p)] for g in groups for p in g["params"]]
    if len(flat) != len(state["param_groups"][0]["params"]):
        return state  # not that checkpoint: load_state_dict says what does not match
    old = state["param_groups"][0]
    new_groups, start = [], 0
    for g in groups:
        n = len(g["params"])
        new_groups.append({**old, "params": list(range(start, start + n))})
        start += n
    states = {j: state["state"][i] for j, i in enumerate(flat) if i in state["state"]}
    return {"state": states, "param_groups": new_groups}


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    place: Any = None,
) -> Checkpoint:
    """Restore a checkpoint into the model, optimizer and scheduler. ``place`` (a sharded run's
    ``loft.train.distributed`` module) lays the saved whole tensors out as this rank's shards."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        params = load_file(str(path / "trainable.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise IntegrityError(
            f"checkpoint {path} is unreadable ({e}).",
            hint=f"Remove it (rm -rf {path}) to resume from the previous checkpoint.",
        ) from None
    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and n not in params]
    if missing:
        raise IntegrityError(
            f"checkpoint {path} does not match the model: {len(missing)} trainable parameters "
            f"missing (first: {missing[0]}).",
            hint="Was the config changed since the run started? Resume with the same config.",
        )
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(place.place_like(named[n], t) if place is not None else t)
    opt_state = _regrouped(opt_state, model, optimizer)
    if place is not None:
        opt_state = place.place_optimizer_state(optimizer, opt_state)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict({**scheduler.state_dict(), **state.get("scheduler", {})})
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except TypeError:
        return False
    return True
