"""loft export: write a model for a runtime (hf), or check that a runtime can serve an adapter."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer


class Runtime(StrEnum):
    vllm = "vllm"


class Format(StrEnum):
    hf = "hf"
    gguf = "gguf"
    gguf_lora = "gguf-lora"


def register(root: typer.Typer) -> None:
    @root.command("export")
    def export_cmd(
        ref: str = typer.Argument(
            ..., metavar="REF", help="Adapter: registry ref (name:3, name@champion) or folder."
        ),
        fmt: Format | None = typer.Option(
            None,
            "--format",
            help="hf: merged safetensors + tokenizer + chat template + generation config. gguf: "
            "the merged model for llama.cpp, with an Ollama Modelfile. gguf-lora: the adapter "
            "alone as a llama.cpp LoRA.",
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="With --format: hf a new folder; gguf, gguf-lora a folder to add to.",
        ),
        quant: str | None = typer.Option(
            None,
            "--quant",
            help="gguf: f16, bf16, q8_0 (default), q4_0. gguf-lora: f16 (default) or f32.",
        ),
        tokenizer_pre: str | None = typer.Option(
            None,
            "--tokenizer-pre",
            help="gguf: llama.cpp's pre-tokenizer name, when the base was not converted from a "
            "GGUF that records it.",
        ),
        dtype: str = typer.Option(
            "float32", "--dtype", help="With --format hf: float32, bfloat16 or float16."
        ),
        tolerance: float = typer.Option(
            1e-4, "--tolerance", help="With --format: the merge's largest max |logit diff|."
        ),
        prompts: Path | None = typer.Option(
            None, "--prompts", help="With --format: held-out prompts for the merge check."
        ),
        check: Runtime | None = typer.Option(
            None, "--check", help="Report whether this runtime can serve the adapter as it is."
        ),
        max_lora_rank: int | None = typer.Option(
            None, "--max-lora-rank", help="The vLLM server's max_lora_rank (default: vLLM's top)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Export a version for a runtime (--format), or check a runtime can serve it (--check).

        --format hf merges an adapter (verified like `loft merge`) or takes a full version, and
        writes what plain transformers loads: tokenizer, the chat template trained with, a pad
        token distinct from eos, generation_config eos ids, the lineage card and SHA256SUMS.
        --format gguf writes the merged model as one GGUF (read back tensor by tensor) with an
        Ollama Modelfile; --format gguf-lora the adapter alone for llama.cpp's --lora.
        --check exits 2 with what to change when the runtime cannot serve the adapter.
        """
        from loft.cli.output import console, err_console, print_json
        from loft.core.errors import ConfigError
        from loft.export.check import NotServable, check_vllm

        if (fmt is None) == (check is None):
            raise ConfigError(
                "pass one of --format FORMAT (with --out DIR) or --check RUNTIME",
                hint="`loft export --help` lists both.",
            )
        if fmt is not None:
            if out is None:
                raise ConfigError("--format needs --out DIR")
            if fmt != Format.hf:
                _export_gguf(ref, fmt, out, quant, tokenizer_pre, tolerance, prompts, json_out)
                return
            from loft.export.hf import export_hf

            res = export_hf(
                ref, out, dtype=dtype, tolerance=tolerance, prompts_file=prompts,
                say=lambda msg: err_console.print(msg, markup=False, soft_wrap=True),
            )  # fmt: skip
            if json_out:
                print_json(res.to_dict())
            else:
                console.print(
                    f"exported {ref} as {fmt} to {res.path}: {res.files} files, "
                    f"{res.bytes / 2**20:.1f} MiB; pad {res.pad_token!r}, eos ids "
                    f"{res.eos_token_ids}",
                    markup=False,
                )
            return

        report = check_vllm(ref, max_lora_rank=max_lora_rank)
        label = report.adapter.label
        if json_out:
            print_json(report.to_dict())
        elif report.servable:
            console.print(f"vLLM can serve {label} as it is", markup=False)
        else:
            console.print(f"vLLM cannot serve {label}:", markup=False)
            for problem, fix in report.problems:
                console.print(f"  - {problem}\n    change: {fix}", markup=False, soft_wrap=True)
        if not report.servable:
            raise NotServable(
                f"{label}: {len(report.problems)} problem(s) stop vLLM serving it",
                hint="Apply the changes listed above, or serve it with the torch engine.",
            )


def _export_gguf(ref, fmt, out, quant, tokenizer_pre, tolerance, prompts, json_out) -> None:
    from loft.cli.output import console, err_console, print_json
    from loft.export.gguf_export import export_gguf, export_gguf_lora

    def say(msg: str) -> None:
        err_console.print(msg, markup=False, soft_wrap=True)

    if fmt == Format.gguf:
        res = export_gguf(
            ref, out, quant=quant or "q8_0", tokenizer_pre_name=tokenizer_pre,
            tolerance=tolerance, prompts_file=prompts, say=say,
        )  # fmt: skip
    else:
        res = export_gguf_lora(ref, out, dtype=quant or "f16", say=say)
    if json_out:
        print_json(res.to_dict())
        return
    for f in res.files:
        console.print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB)", markup=False)
    if res.gguf is not None:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in res.gguf.max_error.items())
        console.print(f"read back every tensor: max |error| per type {errs}", markup=False)
    if res.modelfile is not None:
        console.print(
            f"ollama create NAME -f {res.modelfile}   (from {res.modelfile.parent})", markup=False
        )
    elif res.modelfile_problem:
        console.print(f"no Modelfile: {res.modelfile_problem}", markup=False)
