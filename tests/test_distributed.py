"""Distributed training (training.distributed): how ranks share a step, what is refused, and
2-rank gloo runs (DDP, FSDP2) that equal the single-process run, step by step and in the adapter.

Every run here uses one thread per process: the CPU matmuls' reduction order depends on the
thread count, and Adam magnifies that rounding on near-zero gradients (a 1-thread and a 2-thread
single-process run differ by ~1e-5 in the adapter), which is not what these tests measure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from helpers import descendants, kill_tree, run_loft, start_loft
from loft.core.config import validate_config
from loft.core.errors import ConfigError, HardwareError
from loft.train import distributed
from loft.train.checkpoint import checkpoint_dirs
from test_train import tiny_config

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
STEPS = 4


# ---------------------------------------------------------------- a step's share (pure)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("n", "mbs", "accum", "world"), [(23, 2, 3, 2), (22, 2, 3, 2), (7, 4, 1, 2), (5, 1, 2, 3)]
)
def test_ranks_share_every_step_disjointly(n, mbs, accum, world):
    """Over a whole epoch, the ranks' shares of each step are disjoint and together are the
    single-process step; no rank runs more passes than fsdp makes every rank run."""
    from loft.train.sft import StepPlan

    plan = StepPlan(n, mbs, accum, seed=1, total_steps=10)
    for step in range(plan.steps_per_epoch):
        mbs_ = plan.micro_batches(step)
        shares = [distributed.share(mbs_, r, world) for r in range(world)]
        got = sorted(i for s in shares for _, idx in s for i in idx)
        assert got == sorted(i for mb in mbs_ for i in mb)
        assert len(got) == len(set(got))
        assert max(len(s) for s in shares) == distributed.passes(mbs_, world)
        if len(mbs_) >= world:  # whole micro-batches keep their index (their dropout seed)
            assert [u for s in shares for u in s] == sorted(
                [u for s in shares for u in s], key=lambda u: (u[0] % world, u[0])
            )
            assert {j: idx for s in shares for j, idx in s} == dict(enumerate(mbs_))


@pytest.mark.unit
def test_distributed_config_problems_are_reported_with_their_keys(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["method"] = "qlora"
    cfg["training"]["distributed"] = {"strategy": "none", "nproc": 2, "backend": "mpi"}
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    text = str(e.value)
    assert "training.distributed.nproc" in text and "ddp or fsdp" in text
    assert "training.distributed.backend" in text  # every problem at once
    cfg["training"]["distributed"] = {"strategy": "fsdp", "nproc": 2}
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "training.distributed.strategy" in str(e.value) and "4-bit" in str(e.value)
    cfg["method"], cfg["objective"] = "lora", "dpo"
    cfg["data"]["format"] = "preference"
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "objective dpo trains on one process" in str(e.value)
    cfg["objective"], cfg["data"]["format"] = "sft", "auto"
    assert validate_config(cfg).training.distributed.nproc == 2


@pytest.mark.unit
def test_launch_refusals_say_what_to_do(tmp_path, tiny_model):
    def cfg(**d):
        doc = tiny_config(tmp_path, tiny_model)
        doc["training"]["distributed"] = d
        return validate_config(doc)

    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N"):
        distributed.check_launch(cfg(strategy="ddp"), cuda=False, gpus=0, env={})
    under = {"WORLD_SIZE": "2", "RANK": "0"}
    distributed.check_launch(cfg(strategy="ddp"), cuda=False, gpus=0, env=under)  # torchrun's
    with pytest.raises(ConfigError, match="strategy=ddp"):
        distributed.check_launch(cfg(), cuda=False, gpus=0, env=under)
    with pytest.raises(ConfigError, match="torchrun started 2 ranks"):
        distributed.check_launch(cfg(strategy="ddp", nproc=4), cuda=False, gpus=0, env=under)
    with pytest.raises(HardwareError, match="nproc=2"):
        distributed.check_launch(cfg(strategy="fsdp", nproc=4), cuda=True, gpus=2, env={})
    with pytest.raises(HardwareError, match="needs CUDA"):
        distributed.check_launch(
            cfg(strategy="ddp", nproc=2, backend="nccl"), cuda=False, gpus=0, env={}
        )


# ---------------------------------------------------------------- 2-rank runs equal one process


def _config(root: Path, tiny_model: Path) -> dict:
    """4 steps of 3 micro-batches of 2 over 22 examples: the first three steps split 2 + 1
    micro-batches (4 + 2 examples) between the ranks, the epoch's last step is short (2 + 2).
    LoRA dropout stays on: each micro-batch seeds its own, on whichever rank runs it."""
    cfg = tiny_config(root, tiny_model, max_steps=STEPS, micro_batch_size=2, grad_accum=3)
    cfg["training"].update(save_every=2, eval_every=2)
    cfg["register"] = False
    return cfg


def _train(root: Path, cfg: dict, *extra: str) -> Path:
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_loft("train", str(path), "-q", *extra, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(r.stdout.strip().splitlines()[-1])


def _history(run_dir: Path) -> tuple[dict, dict[str, list[float]]]:
    from loft.tracking import metric_history

    summary = json.loads((run_dir / "run_summary.json").read_text())
    run = metric_history(summary["mlflow_run_id"])
    summary["params"], metrics = run["params"], run["metrics"]
    steps = {k: [m["step"] for m in metrics[k]] for k in ("train/loss", "eval/loss")}
    assert steps == {"train/loss": [1, 2, 3, 4], "eval/loss": [2, 4]}
    return summary, {k: [m["value"] for m in metrics[k]] for k in steps}


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _max_rel(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    return max(abs(x - y) / abs(y) for k in b for x, y in zip(a[k], b[k], strict=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The single-process run the 2-rank runs must equal: (config, losses, adapter)."""
    from loft.train.sft import make_plan

    root = tmp_path_factory.mktemp("single")
    cfg = _config(root, tiny_model)
    run_dir = _train(root, cfg)
    summary, losses = _history(run_dir)
    assert "distributed" not in summary
    plan = make_plan(validate_config(cfg), int(summary["params"]["dataset.train_records"]))
    shares = [[len(distributed.share(plan.micro_batches(s), r, 2)) for r in (0, 1)] for s in (0, 3)]
    assert shares == [[2, 1], [1, 1]] and len(plan.micro_batches(3)) == 2  # uneven, then short
    return cfg, losses, _adapter(run_dir)


_RUNS: dict[str, Path] = {}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tmp_path, loft_home, reference, strategy):
    """`loft train --set training.distributed.nproc=2` runs two gloo ranks under torchrun; the
    per-step train and eval losses equal the single-process run's (relative <= 1e-5) and so does
    every tensor of the adapter, written once in the same format (<= 1e-5). One MLflow run, one
    run directory, both ranks' logs kept in it, checkpoints in the single-process format."""
    cfg, ref_losses, ref_adapter = reference
    cfg = dict(cfg, output_dir=str(tmp_path / "run"))
    run_dir = _train(
        tmp_path,
        cfg,
        "--set",
        f"training.distributed.strategy={strategy}",
        "--set",
        "training.distributed.nproc=2",
    )
    summary, losses = _history(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["distributed"] == {"strategy": strategy, "world_size": 2}
    assert _max_rel(losses, ref_losses) <= 1e-5, (losses, ref_losses)
    assert _max_diff(_adapter(run_dir), ref_adapter) <= 1e-5
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == sorted(
        p.name for p in (Path(summary["output_path"])).iterdir()
    )
    logs = sorted((run_dir / "logs").glob("*/attempt_0/*/stderr.log"))
    assert [p.parent.name for p in logs] == ["0", "1"]
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert all(k.replace(".default", "") in ref_adapter for k in saved) and len(saved) == len(
        ref_adapter
    )
    _RUNS[strategy] = run_dir


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_rank(tmp_path, loft_home, reference):
    """A 2-rank FSDP checkpoint holds the gathered state, so a single process resumes it (the
    config digest ignores training.distributed) and ends with the single-process adapter."""
    if "fsdp" not in _RUNS:
        pytest.skip("needs test_two_ranks_equal_one_process[fsdp] in the same session")
    cfg, _, ref_adapter = reference
    run_dir = tmp_path / "run"
    shutil.copytree(_RUNS["fsdp"], run_dir, ignore=shutil.ignore_patterns("adapter", "logs"))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    summary.update(status="interrupted", mlflow_run_id=None)  # a copy: its own MLflow run
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert resolved["training"]["distributed"]["strategy"] == "fsdp"
    out = _train(tmp_path, dict(cfg, output_dir=str(run_dir)), "--resume")
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["sessions"][-1]["resumed_from"] == "step-00000002"
    assert summary["sessions"][-1]["steps_run"] == STEPS - 2
    assert _max_diff(_adapter(out), ref_adapter) <= 1e-5


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_full_fine_tune_equals_one_process(tmp_path, loft_home, tiny_model):
    """A full fine-tune under FSDP2 trains sharded layer weights and replicated embeddings and
    norms together (two optimizer groups: one foreach step cannot mix DTensors and tensors); its
    losses and every weight it writes equal one process's (<= 1e-5)."""
    cfg = dict(_config(tmp_path / "one", tiny_model), method="full")
    one = _train(tmp_path / "one", cfg)
    cfg = dict(cfg, output_dir=str(tmp_path / "two" / "run"))
    (tmp_path / "two").mkdir()
    fsdp = ("--set", "training.distributed.strategy=fsdp", "--set", "training.distributed.nproc=2")
    two = _train(tmp_path / "two", cfg, *fsdp)
    (_, la), (b, lb) = _history(one), _history(two)
    assert b["distributed"] == {"strategy": "fsdp", "world_size": 2}
    assert _max_rel(lb, la) <= 1e-5, (lb, la)

    def weights(run_dir: Path) -> dict:
        files = sorted((run_dir / "model").glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    wa, wb = weights(one), weights(two)
    assert len(wa) > 10 and _max_diff(wb, wa) <= 1e-5


# ---------------------------------------------------------------- a rank killed under torchrun

KILL_STEPS = 24


def _rank_pid(agent: int, local_rank: int) -> int | None:
    """The pid of ``local_rank``'s process of the first attempt, below torchrun's agent: the
    process whose environment names that rank and whose parent's does not."""

    def environ(pid: int) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return {}
        pairs = raw.decode(errors="replace").split("\0")
        return dict(kv.split("=", 1) for kv in pairs if "=" in kv)

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return -1

    for pid in descendants(agent):
        env = environ(pid)
        if (
            env.get("LOCAL_RANK") == str(local_rank)
            and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and "LOCAL_RANK" not in environ(parent(pid))
        ):
            return pid
    return None


_KILL_REFERENCE: dict[Path, tuple[dict, dict]] = {}


def killed_run(tmp_path: Path, tiny_model: Path, *args: str, victim: Any) -> tuple[Path, dict]:
    """A 24-step 2-rank DDP run (max_restarts 1), ``loft train CONFIG -q *args``, whose rank
    ``victim(proc, run_dir)`` (a pid, or None while not known) is SIGKILLed after the first
    checkpoint. Asserts the run finishes, resumed once from a checkpoint at or after the kill,
    with the adapter of an uninterrupted single-process run (<= 1e-5) in the run directory it
    printed; returns (run directory, summary)."""
    if tiny_model not in _KILL_REFERENCE:  # one uninterrupted run for every kill test
        cfg = tiny_config(tmp_path / "ref", tiny_model, max_steps=KILL_STEPS, micro_batch_size=2)
        cfg["training"].update(grad_accum=3, save_every=4, eval_every=KILL_STEPS)
        cfg["register"] = False
        _KILL_REFERENCE[tiny_model] = cfg, _adapter(_train(tmp_path / "ref", cfg))
    cfg, reference = _KILL_REFERENCE[tiny_model]

    run_dir = tmp_path / "run"
    path = tmp_path / "c.yaml"
    dist = {"strategy": "ddp", "nproc": 2, "max_restarts": 1}
    training = {**cfg["training"], "distributed": dist}
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(run_dir), "training": training}))
    proc = start_loft("train", str(path), "-q", *args, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 300
        pid = None
        while time.monotonic() < deadline and proc.poll() is None:
            pid = pid or victim(proc, run_dir)
            if pid and checkpoint_dirs(run_dir):
                break
            time.sleep(0.02)
        assert pid and checkpoint_dirs(run_dir), proc.communicate(timeout=60)[1][-4000:]
        killed_after = checkpoint_dirs(run_dir)[-1].name
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-4000:]
    assert Path(out.strip().splitlines()[-1]) == run_dir
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == KILL_STEPS
    first, resumed = summary["sessions"]
    assert first["start_step"] == 0 and resumed["resumed_from"] is not None
    assert killed_after <= resumed["resumed_from"] < f"step-{KILL_STEPS:08d}"
    assert resumed["steps_run"] == KILL_STEPS - resumed["start_step"] < KILL_STEPS
    assert _max_diff(_adapter(run_dir), reference) <= 1e-5
    return run_dir, summary


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_rank_killed_under_torchrun_restarts_and_finishes_equal(
    tmp_path, loft_home, tiny_model, victim
):
    """A rank SIGKILLed after the first checkpoint: torchrun (max_restarts 1) restarts both
    ranks, they resume from the newest checkpoint, and the run ends with the adapter an
    uninterrupted single-process run writes (max abs diff <= 1e-5). Rank 0 (the run directory,
    the MLflow run) and rank 1 are each killed once."""
    run_dir, _ = killed_run(
        tmp_path, tiny_model, victim=lambda proc, _run_dir: _rank_pid(proc.pid, victim)
    )
    attempts = sorted(p.name for p in (run_dir / "logs").glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"]  # both attempts' logs are kept


@pytest.mark.unit
def test_a_one_group_optimizer_checkpoint_loads_into_the_two_groups(tiny_model):
    """Full fine-tunes' checkpoints from before the optimizer had two groups (one group, model
    order) load into the two groups with every parameter's own state."""
    import torch
    from transformers import AutoModelForCausalLM

    from loft.train.checkpoint import _regrouped

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    old = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    saved = old.state_dict()
    groups = distributed.param_groups(model)
    assert len(groups) == 2  # a full fine-tune: layer weights, then embeddings and norms
    new = torch.optim.AdamW(groups, lr=1e-3)
    new.load_state_dict(_regrouped(saved, model, new))
    for p in params:
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert [g["params"] for g in new.param_groups] == [g["params"] for g in groups]
    grouped = new.state_dict()
    assert _regrouped(grouped, model, new) is grouped  # already in groups: as it is
