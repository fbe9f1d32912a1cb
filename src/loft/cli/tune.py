"""loft tune: hyperparameter studies whose trials are loft training runs (Optuna)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    @root.command("tune")
    def tune_cmd(
        args: list[str] = typer.Argument(
            ...,
            metavar="RECIPE | status NAME | resume NAME",
            help="A training config to tune (with --space); `status NAME` for a study's trials, "
            "importance and best config; `resume NAME` after Ctrl-C or a crash.",
        ),
        space: Path | None = typer.Option(None, "--space", help="The search-space YAML file."),
        trials: int = typer.Option(8, "--trials", min=1, help="Trials to add to the study."),
        workers: int = typer.Option(
            1, "--workers", min=1, help="Trial processes sharing the study (and this machine)."
        ),
        study: str | None = typer.Option(
            None, "--study", help="Study name (default: the recipe's file name); re-run to add."
        ),
        sampler: str = typer.Option("tpe", "--sampler", help="tpe, gp, random or grid."),
        pruner: str = typer.Option(
            "successive_halving",
            "--pruner",
            help="successive_halving, hyperband, median or none (fed by eval loss at each "
            "evaluation).",
        ),
        seed: int = typer.Option(0, "--seed", help="Seeds the sampler (worker i: seed + i)."),
        register_it: bool = typer.Option(
            False,
            "--register",
            help="Register the best completed trial's model, the study and trial in its lineage.",
        ),
        model_name: str | None = typer.Option(
            None, "--name", help="With --register: the registered model name (default: the study)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the study report as JSON."),
    ) -> None:
        """Search hyperparameters: each trial trains the recipe with sampled values and reports
        its eval loss at every evaluation, where the pruner may stop it. The study lives in
        LOFT_HOME/studies/NAME.journal; running the same --study again adds trials to it, and
        `loft tune resume NAME` finishes one that was stopped (finished trials are kept, a
        stopped one resumes from its checkpoint).
        """
        from loft.cli.output import err_console
        from loft.core.errors import ConfigError

        def say(msg: str) -> None:
            err_console.print(msg, markup=False, soft_wrap=True)

        if args[0] in ("status", "resume"):
            if len(args) != 2:
                raise ConfigError(f"usage: loft tune {args[0]} NAME")
            name = args[1]
            if args[0] == "resume":
                from loft.hpo.study import resume_study

                resume_study(name, workers=workers, say=say)
        else:
            if len(args) != 1:
                raise ConfigError(f"unexpected arguments after the recipe: {' '.join(args[1:])}")
            if space is None:
                raise ConfigError("--space FILE is required to tune a recipe")
            from loft.hpo import load_space
            from loft.hpo.study import run_study

            recipe = Path(args[0])
            name = study or recipe.stem
            run_study(
                recipe, load_space(space, recipe), name=name, trials=trials, sampler=sampler,
                pruner=pruner, seed=seed, workers=workers, say=say,
            )  # fmt: skip
        _show(name, json_out)
        if register_it:
            from loft.hpo.report import register_best

            ref, best = register_best(name, model_name)
            say(f"registered as {ref} (study {name}, trial {best.number}, {best.value:.4f})")


def _show(name: str, json_out: bool) -> None:
    from loft.cli.output import console, print_json
    from loft.hpo.report import report

    rep = report(name)
    if json_out:
        print_json(rep.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"study {name}: {len(rep.trials)} trials (target {rep.target})")
    for col in ("trial", "state", *rep.objective, "steps", "tokens", "params", "note"):
        table.add_column(col)
    for r in rep.trials:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        vals = [f"{v:.4f}" for v in (r.values or [])]
        vals += [""] * (len(rep.objective) - len(vals))
        note = r.note + (f" (retry of {r.retry_of})" if r.retry_of is not None else "")
        steps = "" if r.steps is None else str(r.steps)
        tokens = f"{r.train_tokens:,}" if r.train_tokens else ""
        table.add_row(str(r.number), r.state, *vals, steps, tokens, params, note)
    console.print(table)
    if rep.pareto:
        console.print(f"Pareto front ({' vs '.join(rep.objective)}): trials "
                      + ", ".join(map(str, rep.pareto)), markup=False)  # fmt: skip
    if rep.importance:
        console.print(
            "importance: " + ", ".join(f"{k} {v:.2f}" for k, v in rep.importance.items()),
            markup=False,
        )
    elif rep.importance_note:
        console.print(rep.importance_note, markup=False)
    if rep.best is not None:
        best = next(r for r in rep.trials if r.number == rep.best)
        console.print(
            f"best: trial {best.number}, {rep.objective[0]} {best.value:.4f}, run {best.run_dir}\n"
            f"best config: {rep.best_config} (loft train {rep.best_config})",
            markup=False,
        )
