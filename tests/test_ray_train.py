"""`loft train --launcher ray`: the same ranks as under torchrun, started by Ray Train's
TorchTrainer inside one Ray job on a real local Ray head (tests/ray_head.py, 2 CPUs).

As in tests/test_distributed.py every process uses one thread (Ray gives each 1-CPU worker
OMP_NUM_THREADS=1), so a 2-rank run and one process compute the same sums.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import free_port, kill_tree, run_cli, run_loft, start_loft
from loft.core.config import validate_config
from loft.core.errors import ConfigError
from loft.train import distributed
from loft.train.checkpoint import checkpoint_dirs
from test_distributed import KILL_STEPS, ONE_THREAD, killed_run
from test_train import tiny_config

RAY = ("--set", "training.distributed.strategy=ddp", "--set", "training.distributed.nproc=2")


@pytest.fixture(scope="module")
def ray_head():
    from ray_head import RayHead

    head = RayHead()
    yield head
    head.stop()


def _ray_logs(run_dir: Path) -> dict[str, list[str]]:
    """attempt -> the files each rank left in it."""
    return {
        a.name: sorted(p.name for p in a.iterdir())
        for a in sorted((run_dir / "logs" / "ray").glob("attempt_*"))
    }


# ---------------------------------------------------------------- refused without a cluster


@pytest.mark.unit
def test_nodes_are_checked_with_the_launcher_they_need(tmp_path, tiny_model, monkeypatch):
    def cfg(**d):
        doc = tiny_config(tmp_path, tiny_model)
        doc["training"]["distributed"] = d
        return validate_config(doc)

    with pytest.raises(ConfigError, match="training.distributed.nodes") as e:
        cfg(nodes=2)  # one process on two machines
    assert "ddp or fsdp" in str(e.value)
    two = cfg(strategy="ddp", nproc=2, nodes=2)
    with pytest.raises(ConfigError, match="--launcher ray"):  # torchrun's launcher, or none
        distributed.check_launch(two, cuda=False, gpus=0, env={})
    with pytest.raises(ConfigError, match="--launcher ray"):
        distributed.check_launch(cfg(strategy="ddp", nodes=2), cuda=False, gpus=0, env={})
    # a rank Ray started: 4 ranks over 2 machines, 2 GPUs each (one per rank on this machine)
    ray_rank = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    distributed.check_launch(two, cuda=True, gpus=2, env=ray_rank)
    with pytest.raises(ConfigError, match="2 × 2"):
        distributed.check_launch(two, cuda=False, gpus=0, env={**ray_rank, "WORLD_SIZE": "6"})
    for var in ("TORCHELASTIC_RESTART_COUNT", distributed.RESTART_ENV):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.restarted()
    monkeypatch.setenv(distributed.RESTART_ENV, "1")  # a rank Ray Train restarted
    assert distributed.restarted()


@pytest.mark.unit
def test_ray_launcher_refusals_say_what_to_do(tmp_path, loft_home, tiny_model, capsys):
    """Refused through the real entry point before a run directory is made, with exit code 2
    and no traceback: one process under --launcher ray, several machines under torchrun, a
    cluster that does not answer, --ray-address without --launcher ray."""
    cfg = tiny_config(tmp_path, tiny_model)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    nowhere = f"http://127.0.0.1:{free_port()}"
    two_nodes = (*RAY, "--set", "training.distributed.nodes=2")
    cases = [
        (("--launcher", "ray", "--ray-address", nowhere),
         ["ray launcher needs training.distributed.strategy ddp or fsdp"]),
        (two_nodes, ["training.distributed.nodes is 2", "--launcher ray"]),
        ((*two_nodes, "--launcher", "ray", "--ray-address", nowhere),
         [f"cannot reach the Ray cluster at {nowhere}", "ray start --head"]),
        ((*RAY, "--ray-address", nowhere), ["--ray-address is for --launcher ray"]),
    ]  # fmt: skip
    for args, says in cases:
        assert run_cli("train", str(path), *args) == 2, args
        err = capsys.readouterr().err
        assert all(s in err for s in says) and "Traceback" not in err, err
    assert not Path(cfg["output_dir"]).exists()


# ---------------------------------------------------------------- 2 ranks on Ray


@pytest.mark.integration
@pytest.mark.slow
def test_a_driver_refusal_fails_the_job_with_its_message(tmp_path, loft_home, tiny_model, ray_head):
    """What only the cluster can know is refused by the job's driver, before any rank starts:
    nccl on a cluster without GPUs. The client shows the driver's message and its exit code."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_model)))
    nccl = ("--set", "training.distributed.backend=nccl")
    r = run_loft("train", str(path), *RAY, *nccl, "--launcher", "ray", "--ray-address",
                 ray_head.address)  # fmt: skip
    assert r.returncode == 2, r.stderr[-4000:]
    assert "backend is nccl, which needs CUDA GPUs; the Ray cluster has none" in r.stderr
    assert "failed; no rank started" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.integration
@pytest.mark.slow
def test_rank_killed_under_ray_restarts_and_finishes_equal(
    tmp_path, loft_home, tiny_model, ray_head
):
    """2 DDP ranks started by Ray Train, rank 0 (the run directory's writer, the MLflow run)
    SIGKILLed after the first checkpoint: Ray Train (max_restarts 1) starts both ranks again, they
    resume from the newest checkpoint, and the run ends with an uninterrupted single-process
    run's adapter (<= 1e-5), written once into the run directory the client printed; both
    attempts' logs of both ranks are kept. (Per-step losses equal to one process: the same ranks
    under torchrun, tests/test_distributed.py.)"""

    def rank_0(_proc: Any, run_dir: Path) -> int | None:
        pid_file = run_dir / "logs/ray/attempt_0/rank_0.pid"
        return int(pid_file.read_text()) if pid_file.is_file() else None

    ray = ("--launcher", "ray", "--ray-address", ray_head.address)
    run_dir, summary = killed_run(tmp_path, tiny_model, *ray, victim=rank_0)
    files = ["rank_0.log", "rank_0.pid", "rank_1.log", "rank_1.pid"]
    assert _ray_logs(run_dir) == {"attempt_0": files, "attempt_1": files}
    for rank in (0, 1):  # each rank's `loft train` output, to its last line (the run directory)
        log = (run_dir / f"logs/ray/attempt_1/rank_{rank}.log").read_text()
        assert f"done: {KILL_STEPS} steps" in log and log.strip().splitlines()[-1] == str(run_dir)
    assert summary["distributed"] == {"strategy": "ddp", "world_size": 2}


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_stops_the_ray_job_and_its_ranks(tmp_path, loft_home, tiny_model, ray_head):
    """Ctrl-C in `loft train --launcher ray` stops the Ray job (STOPPED, its ranks gone) and
    exits 130 saying how to continue; the checkpoints so far stay for --resume."""
    from ray.job_submission import JobSubmissionClient

    cfg = tiny_config(tmp_path, tiny_model, max_steps=3000, micro_batch_size=2, save_every=4)
    cfg["register"] = False
    cfg["training"]["distributed"] = {"strategy": "ddp", "nproc": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["output_dir"])
    pids = [run_dir / f"logs/ray/attempt_0/rank_{r}.pid" for r in (0, 1)]
    proc = start_loft(
        "train", str(path), "-q", "--launcher", "ray", "--ray-address", ray_head.address,
        env=ONE_THREAD,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if all(p.is_file() for p in pids) and checkpoint_dirs(run_dir):
                break
            time.sleep(0.05)
        assert all(p.is_file() for p in pids), proc.communicate()[1][-4000:]
        ranks = [int(p.read_text()) for p in pids]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, err[-4000:]
    assert f"continue with the same command plus --resume ({run_dir})" in err
    assert out == ""  # no run directory printed: the run did not finish
    sid = err.split("Ray job ", 1)[1].split(":", 1)[0]
    assert JobSubmissionClient(ray_head.address).get_job_info(sid).status.value == "STOPPED"
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in ranks)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] != "completed" and checkpoint_dirs(run_dir)
