"""loft train CONFIG.yaml [--set key=value ...] [--resume]."""

from __future__ import annotations

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
"""


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
    ) -> None:
        from loft.core.config import load_config

        cfg = load_config(config, set_)
        from loft.cli.output import console
        from loft.train.launch import launch, needs_launch

        if needs_launch(cfg):  # training.distributed.nproc > 1: run this command as its ranks
            command = ["train", str(config.resolve()), *(a for s in set_ for a in ("--set", s))]
            flags = (("--resume", resume), ("-q", quiet), ("--force", force))
            command += [flag for flag, on in flags if on]
            code, run_dir = launch(cfg, command, resume=resume)
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
