"""``loft train`` with several ranks: start them under torchrun, or on a Ray cluster.

**torchrun** (``training.distributed.nproc`` > 1, the default launcher). The command re-runs
itself, with the same arguments, as ``nproc`` ranks of a single-node torchrun
(``torch.distributed.run --standalone``), in this process. This process first refuses what cannot
run (hardware, data) and picks the run directory, so every rank writes to the same one. torchrun
keeps each rank's stdout and stderr under ``<run_dir>/logs/`` and shows rank 0's on the console;
it forwards SIGINT/SIGTERM to the ranks (they checkpoint at the same step and exit), and restarts
them ``max_restarts`` times after a failure (they resume from the newest checkpoint). The exit
code is the ranks' own (rank 0's when several failed); 130 when a signal stopped them, as
for one process.

**Ray** (``--launcher ray``). This process refuses what the config cannot run, checks the data
and picks the run directory the same way, then submits one Ray job whose driver
(``loft.train.ray_train``) runs ``nodes`` × ``nproc`` ranks of the same command under Ray Train's
TorchTrainer. A Ray job, not ``ray.init`` here: the configured address is the dashboard's, and the
driver must live on the cluster, beside its ranks. This process follows the job's output on
stderr; Ctrl-C (or SIGTERM) stops the job (the ranks stop where they are; ``--resume`` continues
from the newest checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, LoftError
from loft.core.specs import TrainConfig
from loft.train import distributed


def needs_launch(config: TrainConfig) -> bool:
    """True when this process must start the ranks (it is not one of them)."""
    d = config.training.distributed
    return d.strategy != "none" and d.nproc > 1 and not distributed.under_launcher()


def prepare_run_dir(config: TrainConfig, *, resume: bool) -> Path:
    """Refuse bad data (every bad record at once), then find (--resume) or make the run directory
    every rank will write to."""
    from loft.train import rundir
    from loft.train.sft import _check_data, _new_run_dir

    _check_data(config)
    return rundir.find_resume_dir(config) if resume else _new_run_dir(config)


def torchrun_args(config: TrainConfig, run_dir: Path, command: list[str]) -> list[str]:
    """torchrun's arguments for ``loft COMMAND`` on this node."""
    d = config.training.distributed
    return [
        "--standalone",
        f"--nproc-per-node={d.nproc}",
        f"--max-restarts={d.max_restarts}",
        f"--log-dir={run_dir / 'logs'}",
        "--tee=3",  # every rank's stdout and stderr into its log file, and to the console...
        "--local-ranks-filter=0",  # ...rank 0's only on the console
        "-m",
        "loft.cli.main",
        *command,
    ]


def launch(config: TrainConfig, command: list[str], *, resume: bool) -> tuple[int, Path]:
    """Start ``loft COMMAND`` as the config's ranks; (exit code, run directory)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from loft.train.device import cpu_threads, plan_placement

    placement = plan_placement(config)
    import torch

    cuda = placement.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    distributed.check_launch(config, cuda=cuda, gpus=gpus, env={})
    run_dir = prepare_run_dir(config, resume=resume)
    os.environ[distributed.RUN_DIR_ENV] = str(run_dir.resolve())
    if not cuda:  # share the cores between the ranks (torchrun's default would be 1 each)
        os.environ.setdefault(
            "OMP_NUM_THREADS", str(max(1, cpu_threads() // config.training.distributed.nproc))
        )
    try:
        run(parse_args(torchrun_args(config, run_dir, command)))
    except ChildFailedError as e:
        first = min(e.failures)  # the lowest failed rank: rank 0's error when it failed
        code = e.failures[first].exitcode
        print(
            f"rank {first} exited with {code}; each rank's output is in {run_dir / 'logs'}",
            file=sys.stderr,
        )
        return (128 - code if code < 0 else code or 1), run_dir
    except SignalException:  # the ranks got it too: they saved a checkpoint and stopped
        print(f"stopped; continue with the same command plus --resume ({run_dir})", file=sys.stderr)
        return 130, run_dir
    finally:
        os.environ.pop(distributed.RUN_DIR_ENV, None)
    return 0, run_dir


# ---------------------------------------------------------------- Ray

RAY_LOGS = Path("logs") / "ray"  # under the run directory: attempt_K/rank_R.log and .pid


def check_ray(config: TrainConfig) -> None:
    """Refuse, before the cluster is contacted, a config the Ray launcher cannot run."""
    d = config.training.distributed
    if d.strategy == "none":
        raise ConfigError(
            "the ray launcher needs training.distributed.strategy ddp or fsdp (it is none): "
            "the ranks share each step.",
            hint="Add --set training.distributed.strategy=ddp (or fsdp), and --set "
            "training.distributed.nproc=N (ranks per machine).",
        )


def launch_ray(
    config: TrainConfig, command: list[str], *, resume: bool, ray: Any
) -> tuple[int, Path]:
    """Run ``loft COMMAND`` as the config's ranks on the cluster of ``ray`` (a
    ``JobSubmissionClient``), following its output; (exit code, run directory)."""
    d = config.training.distributed
    run_dir = prepare_run_dir(config, resume=resume).resolve()
    sid = f"loft-train-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = shlex.join(
        [sys.executable, "-m", "loft.train.ray_train", "--run-dir", str(run_dir),
         "--world", str(d.nodes * d.nproc), "--name", sid, "--", *command]
    )  # fmt: skip
    from loft.core.settings import forwarded_env, submit_ray_job

    env = {
        **forwarded_env(),
        distributed.RUN_DIR_ENV: str(run_dir),
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_V2_ENABLED": "1",  # the TorchTrainer semantics loft is tested with
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # ranks' print()s stay plain output, in their logs
    }
    submit_ray_job(ray, sid, entrypoint=entrypoint, runtime_env={"env_vars": env},
            metadata={"loft_run_dir": str(run_dir)})  # fmt: skip
    print(f"Ray job {sid}: {d.nodes * d.nproc} ranks; run directory {run_dir}", file=sys.stderr)
    logs = run_dir / RAY_LOGS
    earlier = set(logs.glob("attempt_*"))  # a --resume's earlier attempts
    job = _Followed(ray, sid)
    try:
        with _sigterm_interrupts():
            info = job.follow()
    except KeyboardInterrupt:
        job.stop()
        with _sigterm_interrupts(), contextlib.suppress(KeyboardInterrupt):  # again: no waiting
            job.follow(deadline=time.monotonic() + 60)
        print(
            f"stopped Ray job {sid}; continue with the same command plus --resume ({run_dir})",
            file=sys.stderr,
        )
        return 130, run_dir
    status, code = info.status.value, info.driver_exit_code
    if status == "SUCCEEDED":
        return 0, run_dir
    if status == "STOPPED":
        print(
            f"Ray job {sid} was stopped; continue with the same command plus --resume ({run_dir})",
            file=sys.stderr,
        )
        return 130, run_dir
    # Ray's message repeats the driver's output when the driver ran; say it only when it did not
    why = f" ({info.message.splitlines()[0]})" if info.message and code is None else ""
    ranks_ran = set(logs.glob("attempt_*")) - earlier
    where = f"each rank's output is in {logs}/attempt_*/rank_*.log" if ranks_ran else (
        "no rank started; the driver's output is above")  # fmt: skip
    print(f"Ray job {sid} {status.lower()}{why}; {where}", file=sys.stderr)
    return code or 1, run_dir


class _Followed:
    """A submitted Ray job whose output is copied to stderr as it comes."""

    def __init__(self, ray: Any, sid: str) -> None:
        self.ray, self.sid, self.shown = ray, sid, 0

    def _ask(self, method: str) -> Any:
        try:
            return getattr(self.ray, method)(self.sid)
        except (OSError, RuntimeError) as e:  # the dashboard went away, or refused
            raise LoftError(
                f"lost the Ray cluster while following job {self.sid}: "
                f"{str(e).splitlines()[0]}; the job may still be running.",
                hint=f"Check it with `ray job status {self.sid}` (stop it with `ray job stop "
                f"{self.sid}`), both with --address {self.ray.get_address()}.",
            ) from None

    def stop(self) -> None:
        self._ask("stop_job")

    def follow(self, deadline: float | None = None) -> Any:
        """Copy output until the job ends (or ``deadline``); its last JobInfo."""
        while True:
            info, logs = self._ask("get_job_info"), self._ask("get_job_logs")
            sys.stderr.write(logs[self.shown :])
            sys.stderr.flush()
            self.shown = len(logs)
            if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(0.5)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C (a job worker's cancel stops the Ray job too)."""
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
