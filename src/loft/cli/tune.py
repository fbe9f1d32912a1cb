"""loft tune: hyperparameter studies whose trials are loft training runs (Optuna)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    @root.command("tune")
    def tune_cmd(
        args: list[str] = typer.Argument(
            ...,
            metavar="RECIPE | status NAME",
            help="A training config to tune (with --space), or `status NAME` for a study's table.",
        ),
        space: Path | None = typer.Option(None, "--space", help="The search-space YAML file."),
        trials: int = typer.Option(8, "--trials", min=1, help="Trials to run in this call."),
        study: str | None = typer.Option(
            None, "--study", help="Study name (default: the recipe's file name); re-run to resume."
        ),
        sampler: str = typer.Option("tpe", "--sampler", help="tpe or random."),
        pruner: str = typer.Option(
            "successive_halving", "--pruner", help="successive_halving, median or none."
        ),
        seed: int = typer.Option(0, "--seed", help="Seeds the sampler."),
        register_it: bool = typer.Option(
            False,
            "--register",
            help="Register the best completed trial's model, the study and trial in its lineage.",
        ),
        model_name: str | None = typer.Option(
            None, "--name", help="With --register: the registered model name (default: the study)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the trials as JSON."),
    ) -> None:
        """Search hyperparameters: each trial trains the recipe with sampled values and reports
        its eval loss at every evaluation, where the pruner may stop it. The study lives in
        LOFT_HOME/studies/NAME.journal; running the same --study again adds trials to it.
        """
        from loft.cli.output import console, err_console, print_json
        from loft.core.errors import ConfigError

        if args[0] == "status":
            if len(args) != 2:
                raise ConfigError("usage: loft tune status NAME")
            from loft.hpo.study import load_study, summarize

            _table(console, print_json, args[1], summarize(load_study(args[1])), json_out)
            return
        if len(args) != 1:
            raise ConfigError(f"unexpected arguments after the recipe: {' '.join(args[1:])}")
        if space is None:
            raise ConfigError("--space FILE is required to tune a recipe")
        from loft.hpo import load_space
        from loft.hpo.study import run_study

        recipe = Path(args[0])
        name = study or recipe.stem
        results = run_study(
            recipe, load_space(space, recipe), name=name, trials=trials, sampler=sampler,
            pruner=pruner, seed=seed,
            say=lambda msg: err_console.print(msg, markup=False, soft_wrap=True),
        )  # fmt: skip
        _table(console, print_json, name, results, json_out)
        if register_it:
            from loft.hpo.study import register_best

            ref, best = register_best(name, model_name)
            err_console.print(
                f"registered as {ref} (study {name}, trial {best.number}, eval loss "
                f"{best.value:.4f})",
                markup=False,
            )


def _table(console, print_json, name: str, results, json_out: bool) -> None:
    from dataclasses import asdict

    if json_out:
        print_json({"study": name, "trials": [asdict(r) for r in results]})
        return
    from rich.table import Table

    table = Table(title=f"study {name}")
    for col in ("trial", "state", "eval loss", "steps", "params"):
        table.add_column(col)
    for r in results:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        value = "" if r.value is None else f"{r.value:.4f}"
        table.add_row(str(r.number), r.state, value, str(r.steps or ""), params)
    console.print(table)
    done = [r for r in results if r.state == "COMPLETE" and r.value is not None]
    if done:
        best = min(done, key=lambda r: r.value)
        console.print(
            f"best: trial {best.number}, eval loss {best.value:.4f}, run {best.run_dir}",
            markup=False,
        )
