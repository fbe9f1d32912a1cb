"""``loft train`` with ``training.distributed.nproc`` > 1: start the ranks under torchrun.

The command re-runs itself, with the same arguments, as ``nproc`` ranks of a single-node torchrun
(``torch.distributed.run --standalone``), in this process. This process first refuses what cannot
run (hardware, data) and picks the run directory, so every rank writes to the same one. torchrun
keeps each rank's stdout and stderr under ``<run_dir>/logs/`` and shows rank 0's on the console;
it forwards SIGINT/SIGTERM to the ranks (they checkpoint at the same step and exit), and restarts
them ``max_restarts`` times after a failure (they resume from the newest checkpoint). The exit
code is the ranks' own (rank 0's when several failed); 130 when a signal stopped them, as
for one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loft.core.specs import TrainConfig
from loft.train import distributed


def needs_launch(config: TrainConfig) -> bool:
    """True when this process must start the ranks (it is not one of them)."""
    d = config.training.distributed
    return d.strategy != "none" and d.nproc > 1 and not distributed.under_torchrun()


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

    from loft.train import rundir
    from loft.train.device import cpu_threads, plan_placement
    from loft.train.sft import _check_data, _new_run_dir

    placement = plan_placement(config)
    import torch

    cuda = placement.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    distributed.check_launch(config, cuda=cuda, gpus=gpus, env={})
    _check_data(config)
    run_dir = rundir.find_resume_dir(config) if resume else _new_run_dir(config)
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
