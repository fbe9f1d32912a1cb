"""loft merge: fold an adapter into its base model, or merge several adapters, verified."""

from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    @root.command("merge")
    def merge_cmd(
        refs: list[str] = typer.Argument(
            None,
            metavar="REF...",
            help="Adapter(s): registry ref (name:3, name@champion) or folder. Two or more with "
            "--method (or --recipe).",
        ),
        method: str | None = typer.Option(
            None,
            "--method",
            help="Merge several adapters: linear, cat, svd, ties, dare_ties, dare_linear.",
        ),
        weights: str | None = typer.Option(
            None, "--weights", help="One weight per adapter, comma-separated (default: all 1)."
        ),
        density: float | None = typer.Option(
            None, "--density", help="ties / dare_*: fraction of each update kept (0, 1]."
        ),
        rank: int | None = typer.Option(
            None, "--rank", help="svd: rank of the merged adapter (default: the largest input's)."
        ),
        seed: int = typer.Option(0, "--seed", help="dare_*: seed of the random pruning."),
        recipe: Path | None = typer.Option(
            None,
            "--recipe",
            help="A mergekit-style YAML: merge_method, models: [{model, parameters: {weight, "
            "density}}], parameters: {density, rank}, base_model, dtype.",
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
        nothing is written or registered. With --method (or --recipe), two or more LoRA adapters
        of one base are merged: linear, ties and dare_* write a full model, cat and svd an
        adapter; linear and cat are gated like one adapter's merge against PEFT running all the
        adapters at once, the others report their distance from it.
        """
        from loft.cli.output import console, err_console, print_json
        from loft.core.errors import ConfigError
        from loft.export.merge import merge_adapter

        def say(msg: str) -> None:
            err_console.print(msg, markup=False, soft_wrap=True)

        refs = list(refs or [])
        if recipe is not None or method is not None or len(refs) > 1:
            _merge_many(
                refs, method, weights, density, rank, seed, recipe, dtype, tolerance, out,
                register_it, name, prompts, json_out, say,
            )  # fmt: skip
            return
        if not refs:
            raise ConfigError("no adapter given", hint="`loft merge REF`; see `loft merge --help`.")
        report = merge_adapter(
            refs[0],
            dtype=dtype,
            tolerance=tolerance,
            out=out,
            register=register_it,
            name=name,
            prompts_file=prompts,
            say=say,
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


def _merge_many(
    refs, method, weights, density, rank, seed, recipe, dtype, tolerance, out, register_it, name,
    prompts, json_out, say,
) -> None:  # fmt: skip
    from loft.cli.output import console, print_json
    from loft.core.errors import ConfigError
    from loft.export.combine import combine_adapters, read_recipe

    kwargs: dict = {}
    if recipe is not None:
        if refs or method or weights or density is not None or rank is not None:
            raise ConfigError(
                "--recipe names the adapters, method, weights, density and rank itself",
                hint="Pass either --recipe FILE or REF... --method ..., not both.",
            )
        kwargs = read_recipe(recipe)
        refs = kwargs.pop("refs")
        if dtype == "float32":
            dtype = kwargs.pop("dtype")
        else:
            kwargs.pop("dtype")
    else:
        parsed = None
        if weights is not None:
            try:
                parsed = [float(w) for w in weights.split(",")]
            except ValueError:
                raise ConfigError(
                    f"--weights {weights!r}: expected numbers separated by commas (0.6,0.4)"
                ) from None
        kwargs = {"method": method or "linear", "weights": parsed, "density": density, "rank": rank}
    report = combine_adapters(
        refs, seed=seed, dtype=dtype, tolerance=tolerance, out=out, register=register_it,
        name=name, prompts_file=prompts, say=say, **kwargs,
    )  # fmt: skip
    if json_out:
        print_json(report.to_dict())
        return
    a = report.agreement
    labels = ", ".join(x.label for x in report.adapters)
    console.print(
        f"{report.method} of {labels} ({report.kind}): max |logit diff| {a.max_abs_logit_diff:.3g} "
        f"against the adapters run together"
        + (f" (tolerance {report.tolerance:g})" if report.gated else "")
        + f", greedy identical {a.greedy_identical}/{a.prompts} prompts ({report.prompt_source})",
        markup=False,
    )
    if report.svd_error:
        e = report.svd_error
        console.print(
            f"svd rank {report.rank}: relative reconstruction error max {e['max']:.3g} "
            f"({e['worst_module']}), mean {e['mean']:.3g}",
            markup=False,
        )
    if report.path is not None:
        console.print(f"wrote {report.path}", markup=False)
    if report.registered:
        console.print(
            f"registered as {report.registered} (parents: {', '.join(report.parents) or '-'})",
            markup=False,
        )
