"""The Ray job ``loft train --launcher ray`` submits: ``nodes`` × ``nproc`` ranks of the same
``loft train`` command under Ray Train's TorchTrainer (``loft.train.launch`` is the client side).

    python -m loft.train.ray_train --run-dir DIR --world N --name NAME -- train CONFIG [--set ...]

This driver runs on the cluster (``ray.init()`` joins the job's cluster). Each worker is one rank:
Ray Train has initialised the process group and set RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and chosen its GPU), so ``distributed.setup`` uses
that group; the rank then runs the command in-process through the package API the CLI's ``loft
train`` calls (a torchrun rank runs it through the CLI).
Placement: one CPU per rank (plus one GPU where the cluster has GPUs), packed on as few nodes as
possible, or spread over them when ``nodes`` > 1. After a rank fails Ray Train stops them all and
starts a new group, ``max_restarts`` times (FailureConfig.max_failures); the new ranks see
LOFT_RESTART_COUNT > 0 and resume from the run's newest checkpoint, as after a torchrun restart.

Every rank's stdout and stderr (its file descriptors: native code's output too) go to
``<run_dir>/logs/ray/attempt_K/rank_R.log``, rank 0's also to the job's output; ``rank_R.pid``
beside it names the rank's process. K counts every start of the ranks in this run directory,
across restarts and ``--resume``s, so no attempt's logs are overwritten.

Exit code: 0 when the ranks finished; 1 when Ray Train gave up (the error is printed); a
LoftError's own code when the driver refused to start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loft.core.errors import HardwareError, LoftError, exit_code_for
from loft.train import distributed
from loft.train.launch import RAY_LOGS

ATTEMPT = "attempt_"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loft.train.ray_train", description=__doc__)
    p.add_argument("--run-dir", type=Path, required=True, help="The run directory (absolute).")
    p.add_argument("--world", type=int, required=True, help="Ranks: nodes × nproc.")
    p.add_argument("--name", required=True, help="Ray Train's run name.")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train CONFIG [options]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return _fit(args.run_dir, args.world, args.name, command)
    except LoftError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)


def _fit(run_dir: Path, world: int, name: str, command: list[str]) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    config = _config(_train_args(command))
    d = config.training.distributed
    ray.init()  # inside a Ray job: the job's cluster
    resources = ray.cluster_resources()
    cuda = resources.get("GPU", 0) > 0
    backend = distributed.backend_for(config, cuda)
    if backend == "nccl" and not cuda:
        raise HardwareError(
            "training.distributed.backend is nccl, which needs CUDA GPUs; the Ray cluster has "
            "none.",
            hint="Use --set training.distributed.backend=auto (gloo on CPU).",
        )
    need = {"CPU": world, **({"GPU": world} if cuda else {})}
    for k, n in need.items():
        if resources.get(k, 0) < n:
            print(
                f"the Ray cluster has {resources.get(k, 0):g} {k} now and the {world} ranks need "
                f"{n}: Ray Train waits for them (an autoscaling cluster adds nodes); Ctrl-C stops",
                file=sys.stderr,
            )
    trainer = TorchTrainer(
        train_loop_per_worker=_rank,
        train_loop_config={
            "command": command,
            "run_dir": str(run_dir),
            "first_attempt": _next_attempt(run_dir / RAY_LOGS),
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=cuda,
            resources_per_worker={"CPU": 1},
            placement_strategy="SPREAD" if d.nodes > 1 else "PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=d.max_restarts),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as e:
        print(
            f"error: the ranks failed ({d.max_restarts} restart"
            f"{'s' if d.max_restarts != 1 else ''} allowed): {e}\n"
            f"each rank's output is in {run_dir / RAY_LOGS}/attempt_*/rank_*.log",
            file=sys.stderr,
        )
        return 1
    return 0


def _next_attempt(logs: Path) -> int:
    """The number of the next start of the ranks in this run directory."""
    done = [p.name[len(ATTEMPT) :] for p in logs.glob(f"{ATTEMPT}*")]
    return max((int(n) + 1 for n in done if n.isdigit()), default=0)


# ---------------------------------------------------------------- one rank (a Ray Train worker)


def _rank(cfg: dict[str, Any]) -> None:
    """Run ``loft COMMAND`` as this rank; a non-zero exit is this worker's failure."""
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(cfg["run_dir"])
    box = [_next_attempt(run_dir / RAY_LOGS) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # rank 0 numbers the attempt: one number for all
    attempt = max(int(box[0]), cfg["first_attempt"])
    logs = run_dir / RAY_LOGS / f"{ATTEMPT}{attempt}"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ[distributed.RUN_DIR_ENV] = str(run_dir)
    os.environ[distributed.RESTART_ENV] = str(attempt - cfg["first_attempt"])
    from loft.core.paths import atomic_write_text

    atomic_write_text(logs / f"rank_{rank}.pid", f"{os.getpid()}\n")
    log = logs / f"rank_{rank}.log"
    with _tee(log, console=rank == 0):
        code = _run_train(cfg["command"])
    if code:
        raise RuntimeError(f"rank {rank}: loft train exited with {code}; its output is in {log}")


def _train_args(command: list[str]) -> argparse.Namespace:
    """The ``train CONFIG [--set K=V ...] [-q] [--resume] [--force]`` the client forwards."""
    p = argparse.ArgumentParser(prog="loft", add_help=False)
    p.add_argument("verb", choices=["train"])
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--force", action="store_true")
    return p.parse_args(command)


def _config(args: argparse.Namespace) -> Any:
    """The config ``loft train CONFIG --set ...`` loads."""
    from loft.core.config import load_config

    return load_config(args.config, args.sets)


def _run_train(command: list[str]) -> int:
    """This rank's ``loft train``, through the package API the command calls (train/ imports
    no cli/); its exit code. A torchrun rank runs `loft train` itself, as a process."""
    from loft.train import train

    args = _train_args(command)
    try:
        result = train(_config(args), resume=args.resume, progress=not args.quiet, force=args.force)
    except LoftError as e:
        print(f"error: {e.message}" + (f"\n{e.hint}" if e.hint else ""), file=sys.stderr)
        return exit_code_for(e)
    s = result.summary
    print(f"done: {s['steps']} steps, {s['train_tokens']:,} tokens, output {s['output_path']}")
    print(result.run_dir)
    return 0


@contextlib.contextmanager
def _tee(path: Path, *, console: bool) -> Iterator[None]:
    """File descriptors 1 and 2 into ``path`` (appended), and to the original stderr (the
    worker's log, which Ray copies into the job's output) when ``console``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with open(path, "ab", buffering=0) as f, open(saved[1], "wb", closefd=False) as out:
            while chunk := os.read(read, 1 << 16):
                f.write(chunk)
                if console:
                    out.write(chunk)
                    out.flush()

    thread = threading.Thread(target=pump, name="loft-rank-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)  # the pipe's last writers close: the pump sees its end
        os.dup2(saved[1], 2)
        thread.join(timeout=30)
        if not thread.is_alive():  # else a child process still holds the pipe: leave it be
            for fd in (read, *saved):
                os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
