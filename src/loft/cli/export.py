"""loft export: runtime checks of an adapter (vLLM); export formats come later (issue 14)."""

from __future__ import annotations

from enum import StrEnum

import typer


class Runtime(StrEnum):
    vllm = "vllm"


def register(root: typer.Typer) -> None:
    @root.command("export")
    def export_cmd(
        ref: str = typer.Argument(
            ..., metavar="REF", help="Adapter: registry ref (name:3, name@champion) or folder."
        ),
        check: Runtime = typer.Option(
            ..., "--check", help="Report whether this runtime can serve the adapter as it is."
        ),
        max_lora_rank: int | None = typer.Option(
            None, "--max-lora-rank", help="The vLLM server's max_lora_rank (default: vLLM's top)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Check that a runtime can serve an adapter; exit 2 with what to change when it cannot."""
        from loft.cli.output import console, print_json
        from loft.export.check import NotServable, check_vllm

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
