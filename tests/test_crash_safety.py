"""Complete or absent: a process SIGKILLed while writing a checkpoint or a registry version leaves
the previous one intact and loadable, and the half-written one invisible.

Each victim is a real Python process doing the real write; a wrapper around one of its write
steps truncates the file it just wrote (as a kill mid-write would leave it) and SIGKILLs the
process, so the kill lands at the same point on every run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import CHAT_ROWS

pytestmark = pytest.mark.integration

_TRAIN_VICTIM = """
import json, os, signal, sys
import loft.train.checkpoint as checkpoint
from loft.core.config import validate_config
from loft.train import train

real, saved = checkpoint.save_file, []

def dying_save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata)
    if filename.endswith("trainable.safetensors"):
        saved.append(filename)
        if len(saved) == 2:  # the second checkpoint: half of its weights on disk, then death
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = dying_save_file
train(validate_config(json.loads(sys.argv[1])), progress=False)
"""

_REGISTER_VICTIM = """
import os, signal, sys
import loft.registry.card as card
import loft.registry.store as store
from loft.registry import register

where = sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_copy = card.copy_files

def dying_copy_files(src, dest, key=None):  # mid-copy: the weights half written
    real_copy(src, dest, key)
    weights = dest / "adapter_model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    die()

real_client = store.client

class DyingClient:  # files complete and renamed into place, MLflow version not yet created
    def __init__(self):
        self._c = real_client()

    def __getattr__(self, name):
        return getattr(self._c, name)

    def create_model_version(self, *a, **k):
        die()

if where == "copy":
    card.copy_files = dying_copy_files
else:
    store.client = DyingClient
register(sys.argv[1], name=sys.argv[2])
"""


def _victim(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == -signal.SIGKILL, out.stderr  # it died where it was meant to
    return out


def _config(root: Path, tiny_model: Path, name: str) -> dict:
    data = root / "chat.jsonl"
    lines = [[{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
             for i, (q, a) in enumerate(CHAT_ROWS * 4)]  # fmt: skip
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
    return {
        "base_model": str(tiny_model),
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": 64, "dedup": False},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "training": {
            "max_steps": 9,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "save_every": 3,
            "keep_checkpoints": 1,
            "precision": "fp32",
        },  # fmt: skip
        "tracking": {"uri": "none"},
        "output_dir": str(root / name),
        "register": False,
    }


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    from loft.core.config import validate_config
    from loft.train import train
    from loft.train.checkpoint import checkpoint_dirs

    cfg = _config(tmp_path, tiny_model, "run")
    _victim(_TRAIN_VICTIM, json.dumps(cfg))
    run = tmp_path / "run"
    # keep_checkpoints=1: step 3 would have been removed once step 6 was complete; it was not
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003"]
    half = list((run / "checkpoints").glob(".tmp-step-00000006-*"))
    assert len(half) == 1 and (half[0] / "trainable.safetensors").is_file()  # hidden, ignored
    assert load_file(str(run / "checkpoints" / "step-00000003" / "trainable.safetensors"))

    resumed = train(validate_config(cfg), resume=True, progress=False)
    session = resumed.summary["sessions"][-1]
    assert (session["resumed_from"], session["start_step"]) == ("step-00000003", 3)
    ref = train(validate_config(_config(tmp_path, tiny_model, "ref")), progress=False)
    a = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("where", ["copy", "mlflow"])
def test_killed_while_registering_keeps_the_previous_version(
    tmp_path: Path, tiny_model: Path, loft_home: Path, where: str
):
    """Killed while copying v2's files, or after they were in place but before MLflow had the
    version: v1 still verifies and loads, v2 does not exist, and the next register is v2."""
    from helpers import make_lora_adapter, run_cli
    from loft import registry
    from loft.core.errors import NotFoundError
    from loft.evaluate.loading import load_target

    first = make_lora_adapter(tmp_path / "a1", tiny_model, seed=1)
    second = make_lora_adapter(tmp_path / "a2", tiny_model, seed=2)
    v1 = registry.register(first, name="bot")
    _victim(_REGISTER_VICTIM, str(second), "bot", where)

    # mid-copy the files never reached v2's folder (they were in a hidden temp dir); after the
    # copy they did, complete, but MLflow, which says what exists, never heard of them
    assert (v1.path.parent / "2").exists() == (where == "mlflow")
    (listed,) = registry.list_models()
    assert (listed["name"], listed["latest"], listed["n_versions"]) == ("bot", 1, 1)
    assert run_cli("registry", "verify", "bot:1") == 0
    again = registry.get_version("bot:1")  # verifies every sha256 on load
    assert again.card["files"] == v1.card["files"]
    assert load_target("bot:1").model is not None
    with pytest.raises(NotFoundError):
        registry.get_version("bot:2")

    v2 = registry.register(second, name="bot")
    assert v2.version == 2
    assert run_cli("registry", "verify", "bot:2") == 0
    assert registry.get_version("bot:2").card["files"] != v1.card["files"]
