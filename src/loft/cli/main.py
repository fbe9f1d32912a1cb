"""Entry point: assembles the command groups and turns LoftError into a message and an exit code.

Heavy imports (torch, transformers, mlflow) happen inside commands so `loft --help` is instant.
"""

from __future__ import annotations

import os
import sys

import typer

from loft import __version__
from loft.core.errors import LoftError, exit_code_for

app = typer.Typer(
    name="loft",
    help="loft — Local Fine-Tuning: prepare data, fine-tune, track and evaluate LLMs on your own "
    "hardware.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _STATE["debug"] = debug or os.environ.get("LOFT_DEBUG") == "1"


def _register() -> None:
    from loft.cli import (
        audit,
        data,
        demo,
        encryption,
        export,
        jobs,
        keys,
        merge,
        models,
        plan,
        portal,
        registry,
        rollout,
        runs,
        schedule,
        serve,
        train,
        tune,
        users,
        watch,
    )
    from loft.cli import eval as eval_cmd

    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    app.add_typer(runs.app, name="runs")
    app.add_typer(registry.app, name="registry")
    app.add_typer(audit.app, name="audit")
    app.add_typer(keys.app, name="keys")
    app.add_typer(jobs.app, name="jobs")
    app.add_typer(schedule.app, name="schedule")
    app.add_typer(rollout.app, name="rollout")
    app.add_typer(users.app, name="users")
    app.add_typer(encryption.app, name="encryption")
    train.register(app)
    runs.register(app)
    demo.register(app)
    eval_cmd.register(app)
    watch.register(app)
    serve.register(app)
    plan.register(app)
    merge.register(app)
    export.register(app)
    tune.register(app)
    jobs.register(app)
    jobs.register_up(app)
    portal.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or (
        os.environ.get("LOFT_DEBUG") == "1"
    )
    if not debug:  # libraries' deprecation notices are for their callers' developers
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        # standalone mode: typer/click print usage errors themselves and exit 2
        app(args=argv, standalone_mode=True, prog_name="loft")
    except LoftError as e:
        from rich.markup import escape

        from loft.cli.output import err_console

        if debug:  # the traceback too, and still the exit code the error means
            import traceback

            traceback.print_exc()

        err_console.print(f"[bold red]error:[/] {escape(e.message)}", markup=True, soft_wrap=True)
        if e.hint:
            err_console.print(e.hint, markup=False, soft_wrap=True)
        sys.exit(exit_code_for(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    except Exception as e:  # an internal failure: say so briefly unless --debug
        if debug:
            raise
        from rich.markup import escape

        from loft.cli.output import err_console

        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n"
            "Run again with --debug for the traceback, and report it if it persists.",
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
