"""loft demo: base vs LoRA-tuned SmolLM2 on held-out support tickets, in one command.

It only calls the package API: evaluate the base model, train with the example config, evaluate the
tuned adapter on the same held-out records, print both. Its last line is one JSON object.

``--objective dpo`` is the second stage of the same task: the SFT adapter (trained here, or an
already registered one with ``--sft``), then DPO from it on the example's preference pairs (the SFT
model's own mistakes, ``examples/support_tickets/make_prefs.py``), then SFT vs SFT+DPO on the same
held-out tickets and on held-out pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import typer

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "support_tickets"
DemoObjective = Literal["sft", "dpo"]


def register(root: typer.Typer) -> None:
    @root.command("demo")
    def demo_cmd(
        config: Path = typer.Option(EXAMPLE / "lora.yaml", help="Training config to run."),
        heldout: Path = typer.Option(EXAMPLE / "heldout.jsonl", help="Held-out chat records."),
        n: int = typer.Option(200, "--n", min=1, help="Held-out records to score (max: all)."),
        max_new_tokens: int = typer.Option(32, help="Generation budget per answer."),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override for --config (repeatable)."
        ),
        objective: DemoObjective = typer.Option(
            "sft",
            "--objective",
            help="sft: base vs LoRA. dpo: SFT (--config) then DPO from it (--pref-config); "
            "prints SFT vs SFT+DPO on the same held-out tickets.",
        ),
        pref_config: Path = typer.Option(
            EXAMPLE / "dpo.yaml",
            "--pref-config",
            help="With --objective dpo: the preference config; its init_from is set to the SFT "
            "version this demo trains (or --sft).",
        ),
        pref_set: list[str] = typer.Option(
            [], "--pref-set", help="With --objective dpo: override for --pref-config (repeatable)."
        ),
        heldout_prefs: Path = typer.Option(
            EXAMPLE / "heldout_prefs.jsonl",
            "--heldout-prefs",
            help="With --objective dpo: held-out pairs for preference accuracy and reward margin.",
        ),
        sft: str | None = typer.Option(
            None,
            "--sft",
            help="With --objective dpo: reuse this registered SFT version (NAME:VERSION) "
            "instead of training one with --config.",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Fine-tune SmolLM2-135M-Instruct on the support-ticket task and show the gain.

        Scores are exact match of the parsed JSON answer ({category, priority, product}) on
        held-out tickets the model never trained on. With --objective dpo, the LoRA (SFT) stage
        is followed by DPO on the SFT model's own mistakes, and SFT is compared with SFT+DPO.
        """
        if objective == "dpo":
            _preference_demo(
                config, set_, pref_config, pref_set, sft, heldout, heldout_prefs, n,
                max_new_tokens, quiet,
            )  # fmt: skip
            return
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


def _preference_demo(
    config: Path,
    set_: list[str],
    pref_config: Path,
    pref_set: list[str],
    sft: str | None,
    heldout: Path,
    heldout_prefs: Path,
    n: int,
    max_new_tokens: int,
    quiet: bool,
) -> None:
    """SFT (trained or reused), DPO from it, both scored on the same held-out tickets and pairs."""
    from loft.cli.output import console
    from loft.core.config import load_config
    from loft.core.errors import ConfigError
    from loft.evaluate import evaluate_generation, load_jsonl_records
    from loft.evaluate.loading import load_target
    from loft.evaluate.preference_eval import pair_logps, preference_metrics
    from loft.evaluate.run import read_eval_records
    from loft.train import train

    t0 = time.time()
    records = load_jsonl_records(heldout)[:n]
    pairs = read_eval_records(heldout_prefs)
    gen = {"max_new_tokens": max_new_tokens, "progress": not quiet}
    load_config(pref_config, pref_set)  # a bad preference config fails before SFT trains

    sft_s = 0.0
    if sft is None:
        console.print(f"[bold]1/3[/] SFT: LoRA fine-tune ({config.name})")
        t = time.time()
        sft_run = train(load_config(config, set_), progress=not quiet)
        sft_s = time.time() - t
        sft = sft_run.summary.get("registered")
        if not sft:
            raise ConfigError(
                "the SFT stage was not registered, and DPO continues a registered version "
                f"({sft_run.summary.get('registry_error') or 'register: false'})",
                hint=f"Register it (`loft registry register {sft_run.run_dir}`) and pass "
                "--sft NAME:VERSION.",
            )
        console.print(f"    SFT registered as {sft} ({sft_s:.0f}s)")
    else:
        console.print(f"[bold]1/3[/] SFT: reusing {sft} (--sft)")
    pcfg = load_config(pref_config, [*pref_set, f"init_from={sft}"])
    console.print(
        f"[bold]2/3[/] {pcfg.objective.upper()} from {sft} ({pref_config.name}, "
        f"beta {pcfg.preference.beta}, {pcfg.training.max_steps} steps)"
    )
    t = time.time()
    run = train(pcfg, progress=not quiet)
    pref_s = time.time() - t

    console.print(
        f"[bold]3/3[/] SFT vs SFT+{pcfg.objective.upper()} on the same {len(records)} held-out "
        f"tickets and {len(pairs)} held-out pairs"
    )
    scored, logps = {}, {}
    for key, ref in (("sft", sft), ("tuned", str(run.output_path))):
        target = load_target(ref)
        scored[key] = evaluate_generation(target.model, target.tokenizer, records, **gen)
        logps[key] = pair_logps(target.model, target.tokenizer, pairs)
        del target
    pref = preference_metrics(logps["tuned"], logps["sft"])
    total_s = time.time() - t0

    before, after = scored["sft"], scored["tuned"]
    _print_table(console, before, after, names=("sft", f"sft+{pcfg.objective}"))
    console.print(
        f"held-out pairs ({heldout_prefs.name}, {len(pairs)}): preference accuracy "
        f"{pref['preference_accuracy']:.1%}, reward margin {pref['reward_margin']:+.3f} nats "
        f"(log-ratios against {sft})"
    )
    fixed = sum(a > b for a, b in zip(after.scores, before.scores, strict=True))
    broken = sum(a < b for a, b in zip(after.scores, before.scores, strict=True))
    console.print(
        f"exact match: {before.score:.1%} -> {after.score:.1%} "
        f"({(after.score - before.score) * 100:+.1f} points: {fixed} tickets fixed, {broken} "
        f"broken); {pcfg.objective} {pref_s:.0f}s, total {total_s:.0f}s; run {run.run_dir}"
    )
    if run.summary.get("registered"):
        console.print(
            f"registered as {run.summary['registered']}: "
            f"`loft eval {run.summary['registered']} --data {heldout_prefs} --baseline {sft}`"
        )
    result = {
        "metric": "json_exact_match",
        "objective": pcfg.objective,
        "sft": round(before.score, 4),
        "tuned": round(after.score, 4),
        "preference_accuracy": round(pref["preference_accuracy"], 4),
        "reward_margin": round(pref["reward_margin"], 4),
        "sft_ref": sft,
        "sft_train_s": round(sft_s, 1),
        "train_s": round(pref_s, 1),
        "total_s": round(total_s, 1),
        "run_dir": str(run.run_dir),
    }
    print(json.dumps(result))


def _print_table(console, base, tuned, names: tuple[str, str] = ("base", "tuned")) -> None:
    from rich.table import Table

    table = Table(title="held-out exact match (parsed JSON)")
    table.add_column("metric")
    table.add_column(names[0], justify="right")
    table.add_column(names[1], justify="right")
    table.add_column("delta", justify="right")
    rows = [("json_exact_match", base.score, tuned.score)]
    for key in tuned.field_accuracy:
        rows.append((f"  {key}", base.field_accuracy.get(key, 0.0), tuned.field_accuracy[key]))
    for name, b, t in rows:
        table.add_row(name, f"{b:.1%}", f"{t:.1%}", f"{(t - b) * 100:+.1f}")
    console.print(table)
