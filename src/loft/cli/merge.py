"""loft merge: fold an adapter into its base model, verified against base + adapter."""

from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    @root.command("merge")
    def merge_cmd(
        ref: str = typer.Argument(
            ..., metavar="REF", help="Adapter: registry ref (name:3, name@champion) or folder."
        ),
        register_it: bool = typer.Option(
            False, "--register", help="Register the merged model as the next version."
        ),
        name: str | None = typer.Option(
            None, "--name", help="Register under this name (default: the adapter's model)."
        ),
        dtype: str = typer.Option(
            "float32",
            "--dtype",
            help="Weights dtype after the fp32 merge: float32, bfloat16, float16.",
        ),
        out: Path | None = typer.Option(None, "--out", help="Write the merged model here."),
        tolerance: float = typer.Option(
            1e-4, "--tolerance", help="Largest max |logit diff| (fp32) against base + adapter."
        ),
        prompts: Path | None = typer.Option(
            None,
            "--prompts",
            help="Held-out prompts (.jsonl with 'prompt', or one a line); default: the "
            "version's eval split, else loft's probe set.",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Merge a LoRA/DoRA adapter into its base in fp32, verify it, write and/or register it.

        A merge whose logits differ from base + adapter by more than --tolerance is refused:
        nothing is written or registered.
        """
        from loft.cli.output import console, err_console, print_json
        from loft.export.merge import merge_adapter

        report = merge_adapter(
            ref,
            dtype=dtype,
            tolerance=tolerance,
            out=out,
            register=register_it,
            name=name,
            prompts_file=prompts,
            say=lambda msg: err_console.print(msg, markup=False, soft_wrap=True),
        )
        if json_out:
            print_json(report.to_dict())
            return
        f = report.fp32
        console.print(
            f"merged {report.adapter.label} into {report.base_model['name']}: max |logit diff| "
            f"{f.max_abs_logit_diff:.3g} (tolerance {report.tolerance:g}), greedy identical "
            f"{f.greedy_identical}/{f.prompts} prompts ({report.prompt_source})",
            markup=False,
        )
        if report.cast is not None:
            c = report.cast
            console.print(
                f"as {report.dtype}: max |logit diff| {c.max_abs_logit_diff:.3g}, greedy "
                f"identical {c.greedy_identical}/{c.prompts}",
                markup=False,
            )
        if report.path is not None:
            console.print(f"wrote {report.path}", markup=False)
        if report.registered:
            console.print(f"registered as {report.registered}", markup=False)
