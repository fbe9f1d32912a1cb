"""loft eval: measure a model (registry ref, run dir, adapter or base model) on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(root: typer.Typer) -> None:
    @root.command("eval")
    def eval_cmd(
        model_ref: str = typer.Argument(
            ...,
            metavar="MODEL_REF",
            help="Registry ref (name@champion, name:3), run dir, adapter folder or base model.",
        ),
        data: Path = typer.Option(..., "--data", help="Held-out records (jsonl/json/csv/parquet)."),
        metrics: str | None = typer.Option(
            None,
            "--metrics",
            help="Comma-separated: eval_loss, perplexity, exact_match, json_exact_match, rouge_l, "
            "preference_accuracy, reward_margin, or module.path:function. Default: "
            "eval_loss,json_exact_match; on a preference file preference_accuracy,reward_margin,"
            "eval_loss (log-ratios against --baseline, else the model's base).",
        ),
        baseline: str | None = typer.Option(
            None, "--baseline", help="A second MODEL_REF to compare against (same data)."
        ),
        scorer: str | None = typer.Option(
            None, "--scorer", help="Extra scorer `module.path:function(pred, ref) -> float`."
        ),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Per answer."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Generation batch size."),
        n: int | None = typer.Option(None, "--n", min=1, help="Score only the first N records."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        lm_eval: str | None = typer.Option(
            None,
            "--lm-eval",
            metavar="TASKS",
            help="Comma-separated lm-evaluation-harness tasks (e.g. loft_tickets_mc,hellaswag) "
            "run on the model and the baseline; standard tasks need their data in the HF cache.",
        ),
        lm_eval_include: Path | None = typer.Option(
            None,
            "--lm-eval-include",
            metavar="DIR",
            help="Folder of custom lm-eval task YAMLs (default: examples/lm_eval).",
        ),
        lm_eval_limit: int | None = typer.Option(
            None, "--lm-eval-limit", min=1, help="Score only the first N items of each task."
        ),
    ) -> None:
        """Evaluate MODEL_REF on --data; with --baseline, show both and the delta per metric.

        Generation uses the model's own tokenizer and chat template. Results are logged to the
        MLflow experiment `eval` and, for a registry reference, recorded on the version.
        """
        from loft.cli.output import console, print_json
        from loft.evaluate.run import evaluate_model

        if quiet or json_out:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        tasks: list[str] = []
        include: Path | None = None
        if lm_eval:
            from loft.evaluate.harness import say
            from loft.evaluate.lmeval import check_tasks_available, default_include, parse_tasks

            tasks = parse_tasks(lm_eval)
            include = lm_eval_include or default_include()
            say(f"checking lm-eval task(s) {', '.join(tasks)} and their data", not json_out)
            check_tasks_available(tasks, include)  # before any model is loaded
        report = evaluate_model(
            model_ref,
            data,
            metrics=None if metrics is None else [m for m in metrics.split(",") if m.strip()],
            baseline=baseline,
            scorer=scorer,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            n=n,
            progress=not (quiet or json_out),
        )
        if tasks:
            from loft.evaluate.lmeval import regression

            rows = regression(
                model_ref, baseline, tasks, include_path=include, limit=lm_eval_limit,
                progress=not (quiet or json_out),
            )  # fmt: skip
            report.rows.extend(rows)
            report.candidate.update({r["metric"]: r["candidate"] for r in rows})
            if report.baseline is not None:
                report.baseline.update({r["metric"]: r["baseline"] for r in rows})
        if json_out:
            print_json(report.to_dict())
            return
        _print_report(console, report)


def _fmt(value: float | None, metric: str, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    if metric in ("eval_loss", "perplexity", "reward_margin"):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{value * 100:+.1f} pts" if signed else f"{value:.1%}"


def _print_report(console: Any, report: Any) -> None:
    from rich.table import Table

    # a line of its own, not the table's title: a title wraps at the table's width, which cut
    # long paths in two (uncopyable, and `| grep` missed them)
    console.print(f"{report.ref} on {report.data} ({report.n} records)", markup=False)
    table = Table(header_style="bold")
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("delta", justify="right")
    for row in report.rows:
        m = row["metric"]
        table.add_row(
            m,
            _fmt(row["candidate"], m),
            _fmt(row["baseline"], m),
            _fmt(row["delta"], m, signed=True),
        )
    console.print(table)
    if report.baseline_ref:
        console.print(f"baseline: {report.baseline_ref}")
    if report.mlflow_run_id:
        console.print(f"[dim]logged to MLflow experiment 'eval', run {report.mlflow_run_id}[/]")
