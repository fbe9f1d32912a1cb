"""loft train CONFIG.yaml [--set key=value ...] [--resume]."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from loft.cli.schema_help import SchemaHelpCommand

CONFIG_HELP = """Fine-tune a base model on a dataset, tracked in MLflow, resumable.

The config (YAML) keys, with defaults (every key of the schema, loft.core.specs.TrainConfig):

{schema:TrainConfig}

Relative paths are resolved against the config file's directory. The run directory is printed as
the last line. Ctrl-C (or SIGTERM) saves a checkpoint and exits; add --resume to continue.
With training.distributed.nproc > 1 the command runs itself as that many torchrun ranks; their
logs are kept in the run directory's logs/.

With --launcher ray it runs nodes × nproc ranks on a Ray cluster instead (Ray Train, in one Ray
job loft-train-RUN-TIME). The run directory, LOFT_HOME, the config and its data must be at the
same path on this machine and on the cluster's nodes (a shared filesystem). The job's output
follows on stderr; each rank's is kept in logs/ray/attempt_K/rank_R.log. After a rank fails, Ray
restarts them all max_restarts times, resuming from the newest checkpoint. Ctrl-C stops the Ray
job; add --resume to continue from the newest checkpoint.
"""


class Launcher(StrEnum):
    torchrun = "torchrun"
    ray = "ray"


def register(root: typer.Typer) -> None:
    @root.command("train", help=CONFIG_HELP, cls=SchemaHelpCommand)
    def train_cmd(
        config: Path = typer.Argument(..., help="Training config YAML."),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a key: --set training.lr=1e-4 (repeatable)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the latest unfinished run of this config."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        force: bool = typer.Option(
            False,
            "--force",
            help="Start even when the memory estimate exceeds this device (see `loft plan`).",
        ),
        launcher: Launcher = typer.Option(
            Launcher.torchrun,
            "--launcher",
            help="Who starts the ranks: torchrun (this machine, nproc > 1) or ray (nodes × nproc "
            "on a Ray cluster).",
        ),
        ray_address: str | None = typer.Option(
            None,
            "--ray-address",
            help="The Ray cluster's dashboard, http://HEAD:8265 (default: LOFT_RAY_ADDRESS or "
            "settings ray.address); with --launcher ray.",
        ),
    ) -> None:
        from loft.core.config import load_config
        from loft.core.errors import ConfigError

        if ray_address and launcher is not Launcher.ray:
            raise ConfigError(
                "--ray-address is for --launcher ray.", hint="Add --launcher ray, or drop it."
            )
        cfg = load_config(config, set_)
        from loft.cli.output import console
        from loft.train import launch

        # the ranks run this same command (without --launcher): each is one rank of the run
        command = ["train", str(config.resolve()), *(a for s in set_ for a in ("--set", s))]
        flags = (("--resume", resume), ("-q", quiet), ("--force", force))
        command += [flag for flag, on in flags if on]
        if launcher is Launcher.ray or launch.needs_launch(cfg):  # run as the config's ranks
            if launcher is Launcher.ray:
                from loft.jobs.ray_executor import client

                launch.check_ray(cfg)  # before the cluster is contacted
                ray = client(ray_address, needed_by="--launcher ray")
                code, run_dir = launch.launch_ray(cfg, command, resume=resume, ray=ray)
            else:  # training.distributed.nproc > 1
                code, run_dir = launch.launch(cfg, command, resume=resume)
            if code:
                raise typer.Exit(code)
            print(run_dir)
            return
        from loft.train import train

        result = train(cfg, resume=resume, progress=not quiet, force=force)
        s = result.summary

        def loss(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        console.print(
            f"done: {s['steps']} steps, {s['train_tokens']:,} tokens, "
            f"{s['tokens_per_s']:.0f} tok/s, train loss {loss(s['final_train_loss'])}, "
            f"eval loss {loss(s['eval_loss'])}, output {s['output_path']}",
            soft_wrap=True,
        )
        print(result.run_dir)
