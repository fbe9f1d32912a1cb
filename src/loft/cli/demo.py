"""loft demo: base vs LoRA-tuned SmolLM2 on held-out support tickets, in one command.

It only calls the package API: evaluate the base model, train with the example config, evaluate the
tuned adapter on the same held-out records, print both. Its last line is one JSON object.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "support_tickets"


def register(root: typer.Typer) -> None:
    @root.command("demo")
    def demo_cmd(
        config: Path = typer.Option(EXAMPLE / "lora.yaml", help="Training config to run."),
        heldout: Path = typer.Option(EXAMPLE / "heldout.jsonl", help="Held-out chat records."),
        n: int = typer.Option(200, "--n", min=1, help="Held-out records to score (max: all)."),
        max_new_tokens: int = typer.Option(32, help="Generation budget per answer."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Config override (repeatable)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Fine-tune SmolLM2-135M-Instruct on the support-ticket task and show the gain.

        Scores are exact match of the parsed JSON answer ({category, priority, product}) on
        held-out tickets the model never trained on.
        """
        from loft.cli.output import console
        from loft.core.config import load_config
        from loft.evaluate import evaluate_generation, load_jsonl_records
        from loft.evaluate.loading import load_target
        from loft.train import train

        t0 = time.time()
        cfg = load_config(config, set_)
        records = load_jsonl_records(heldout)[:n]
        gen = {"max_new_tokens": max_new_tokens, "progress": not quiet}

        base_target = load_target(cfg.base_model)
        console.print(
            f"[bold]1/3[/] base model {base_target.name} on {len(records)} held-out tickets"
        )
        base = evaluate_generation(base_target.model, base_target.tokenizer, records, **gen)
        del base_target
        console.print(f"    base exact match: {base.score:.1%}")

        console.print(f"[bold]2/3[/] LoRA fine-tune ({config.name})")
        t_train = time.time()
        run = train(cfg, progress=not quiet)
        train_s = time.time() - t_train

        console.print(f"[bold]3/3[/] tuned adapter on the same {len(records)} tickets")
        tuned_target = load_target(str(run.output_path))  # merged adapter, its own template
        tuned = evaluate_generation(tuned_target.model, tuned_target.tokenizer, records, **gen)
        total_s = time.time() - t0

        _print_table(console, base, tuned)
        for s in tuned.samples[:2]:
            console.print(f"  [dim]ticket:[/] {s.prompt}\n  [dim]tuned:[/]  {s.pred}")
        console.print(
            f"gain: {base.score:.1%} -> {tuned.score:.1%} "
            f"({(tuned.score - base.score) * 100:+.1f} points); train {train_s:.0f}s, "
            f"total {total_s:.0f}s; run {run.run_dir}"
        )
        if run.summary.get("registered"):
            console.print(
                f"registered as {run.summary['registered']}: "
                f"`loft registry show {run.summary['registered']}`"
            )
        result = {
            "metric": "json_exact_match",
            "base": round(base.score, 4),
            "tuned": round(tuned.score, 4),
            "train_s": round(train_s, 1),
            "total_s": round(total_s, 1),
            "run_dir": str(run.run_dir),
        }
        print(json.dumps(result))


def _print_table(console, base, tuned) -> None:
    from rich.table import Table

    table = Table(title="held-out exact match (parsed JSON)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("delta", justify="right")
    rows = [("json_exact_match", base.score, tuned.score)]
    for key in tuned.field_accuracy:
        rows.append((f"  {key}", base.field_accuracy.get(key, 0.0), tuned.field_accuracy[key]))
    for name, b, t in rows:
        table.add_row(name, f"{b:.1%}", f"{t:.1%}", f"{(t - b) * 100:+.1f}")
    console.print(table)
