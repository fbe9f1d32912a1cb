"""loft data: validate, prepare and inspect datasets. Each command calls loft.data and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from loft.cli.output import console, err_console, print_json

app = typer.Typer(
    help="Validate, prepare (dedup, PII scan, tokenize, cache) and inspect datasets.",
    no_args_is_help=True,
)

FORMAT_HELP = "auto, chat, sharegpt, alpaca, completion or preference."
COLUMN_MAP_HELP = "Rename a file column to a loft field, e.g. --column-map question=instruction."


def _column_map(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            from loft.core.errors import ConfigError

            raise ConfigError(
                f"--column-map {item!r}: expected SRC=DST",
                hint="e.g. --column-map question=instruction",
            )
        out[src.strip()] = dst.strip()
    return out


def _tokenizer_dir(ref: str) -> Path:
    """The folder ``ref``'s tokenizer is loaded from (nothing is loaded or hashed)."""
    from loft.models import BUILTIN_NAME, resolve_model
    from loft.models.builtin import builtin_tokenizer_dir

    if ref == BUILTIN_NAME:
        return builtin_tokenizer_dir()
    return resolve_model(ref, verify=False).path


def _load_tokenizer(ref: str) -> Any:
    from loft.models import BUILTIN_NAME, builtin_tokenizer, load_tokenizer, resolve_model

    if ref == BUILTIN_NAME:  # tokenizer only: no need to convert the whole model
        return builtin_tokenizer()
    return load_tokenizer(resolve_model(ref, verify=False))


@app.command()
def validate(
    file: Path = typer.Argument(..., help="A .jsonl, .json, .csv or .parquet file."),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    column_map: list[str] = typer.Option(None, "--column-map", help=COLUMN_MAP_HELP),
) -> None:
    """Check every record; print FILE:LINE: field: reason for each bad one (exit 2).

    Conversations: roles system/user/assistant, a system message only first, then user and
    assistant alternate starting with user and ending with assistant; no empty contents.
    """
    from loft.data import validate_file
    from loft.data.validate import raise_for_problems

    report = validate_file(file, format=format, column_map=_column_map(column_map))
    raise_for_problems(report.problems, report.n_invalid, report.n_records, report.path)
    console.print(f"OK: {report.n_records} records, format {report.format}")


@app.command()
def prepare(
    file: Path = typer.Argument(..., help="Training file (.jsonl, .json, .csv, .parquet)."),
    eval: Path | None = typer.Option(None, "--eval", help="Held-out eval file."),
    eval_fraction: float | None = typer.Option(
        None, "--eval-fraction", help="Share of train held out when no --eval file is given."
    ),
    format: str | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    column_map: list[str] = typer.Option(None, "--column-map", help=COLUMN_MAP_HELP),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", "-m", help="Base model whose tokenizer to use."
    ),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="Truncate longer rows."),
    train_on_inputs: bool = typer.Option(
        False, "--train-on-inputs", help="Train on every token, not just assistant replies."
    ),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Drop invalid records instead of failing."
    ),
    pii: str | None = typer.Option(None, "--pii", help="report, redact or off."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep exact and near duplicates."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate, dedup, scan for PII, split, tokenize and cache a dataset; print its report."""
    from pydantic import ValidationError

    from loft.core.config import format_validation_error
    from loft.core.errors import ConfigError
    from loft.core.specs import DataSpec
    from loft.data import prepare_dataset

    given = {
        "train": str(file),
        "eval": str(eval) if eval else None,
        "eval_fraction": eval_fraction,
        "format": format,
        "column_map": _column_map(column_map) or None,
        "max_seq_len": max_seq_len,
        "train_on_inputs": train_on_inputs or None,
        "skip_invalid": skip_invalid or None,
        "pii": pii,
        "dedup": False if no_dedup else None,
    }
    try:
        spec = DataSpec.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, DataSpec, "loft data prepare")) from None
    from loft.data.prepare import cached_report
    from loft.data.template import (
        cached_tokenizer_fingerprint,
        remember_tokenizer_fingerprint,
        tokenizer_files_key,
    )

    # a cache hit is found from the files alone; the tokenizer (transformers, torch: seconds)
    # is loaded only when there is tokenizing to do
    key = tokenizer_files_key(_tokenizer_dir(model), f"data prepare --model {model}")
    known = cached_tokenizer_fingerprint(key) if key else None
    hit = cached_report(spec, known) if known else None
    if hit is not None:
        _fp, path, report = hit
    else:
        prepared = prepare_dataset(spec, _load_tokenizer(model), progress=not json_out)
        path, report = prepared.path, prepared.report
        if key:
            remember_tokenizer_fingerprint(key, report["tokenizer"]["fingerprint"])
    if json_out:
        print_json({**report, "path": str(path)})
    else:
        print_report(report, path)


def print_report(report: dict[str, Any], path: Path) -> None:
    from rich.table import Table

    c = report
    cached = " (cached)" if report.get("cached") else ""
    console.print(
        f"[bold]dataset {report['fingerprint'][:12]}[/]{cached}  format {report['format']}"
    )
    line = f"records {c['records']}  valid {c['valid']}  invalid {c['invalid']}"
    if c["dropped_invalid"]:
        line += f" [yellow](dropped {c['dropped_invalid']} with --skip-invalid)[/]"
    console.print(line)
    dedup = "off" if not report["settings"]["dedup"] else f"{c['exact_dups']} exact, "
    if report["settings"]["dedup"]:
        dedup += f"{c['near_dups']} near (threshold {report['settings']['near_dup_threshold']})"
    if c["eval_overlap"]:
        dedup += f", {c['eval_overlap']} eval records also in train"
    console.print(f"duplicates removed: {dedup}")
    console.print(
        f"truncated {c['truncated']} (max_seq_len {report['settings']['max_seq_len']}), "
        f"dropped {c['empty_after_truncation']} with no trained tokens left"
    )
    pii = report["pii"]
    if pii["mode"] == "off":
        console.print("PII scan: off")
    elif not pii["total"]:
        console.print("PII: none found")
    else:
        action = "redacted" if pii["mode"] == "redact" else "found (not redacted; --pii redact)"
        console.print(f"PII {action}: {pii['total']} in {pii['records']} records")
        for kind, e in pii["kinds"].items():
            lines = ", ".join(e["lines"])
            console.print(f"  {kind:<7}{e['count']:>6}  e.g. {lines}", soft_wrap=True)
    table = Table("split", "rows", "tokens", "trained", "mean", "p50", "p95", "max")
    for split in ("train", "eval"):
        s = report["stats"].get(split)
        if s:
            table.add_row(
                split,
                *(
                    str(s[k])
                    for k in ("records", "tokens", "trained_tokens", "mean", "p50", "p95", "max")
                ),
            )
    console.print(table)
    console.print(f"fingerprint {report['fingerprint']}\npath {path}", soft_wrap=True)


@app.command()
def inspect(
    target: str = typer.Argument(..., help="A data file, or a prepared dataset's fingerprint."),
    n: int = typer.Option(3, "-n", help="How many examples to show."),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", "-m", help="Tokenizer used to decode prepared rows."
    ),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    column_map: list[str] = typer.Option(None, "--column-map", help=COLUMN_MAP_HELP),
) -> None:
    """Show a file's format and normalised records, or a prepared dataset's rows with the
    trained (labelled) tokens highlighted."""
    if Path(target).is_file():
        _inspect_file(Path(target), n, format, _column_map(column_map))
    else:
        _inspect_prepared(target, n, model)


def _inspect_file(path: Path, n: int, format: str, column_map: dict[str, str]) -> None:
    from loft.data.readers import read_file

    res = read_file(path, format=format, column_map=column_map)
    console.print(
        f"[bold]{res.path}[/]: format {res.format}, {res.n_records} records, "
        f"{res.n_invalid} invalid",
        soft_wrap=True,
    )
    for r in res.records[:n]:
        console.print(f"[bold cyan]{r.loc}[/] ({r.format})", soft_wrap=True)
        console.print(json.dumps(r.data, indent=2, ensure_ascii=False), markup=False)
    if res.problems:
        err_console.print(f"{len(res.problems)} problems; run `loft data validate {path}`")


def _inspect_prepared(ref: str, n: int, model: str) -> None:
    from rich.text import Text

    from loft.data import load_prepared, mask_segments, tokenizer_fingerprint

    ds = load_prepared(ref)
    print_report(ds.report, ds.path)
    tokenizer = _load_tokenizer(model)
    if tokenizer_fingerprint(tokenizer) != ds.report["tokenizer"]["fingerprint"]:
        err_console.print(
            f"[yellow]warning:[/] {model}'s tokenizer is not the one this dataset was prepared "
            f"with ({ds.report['tokenizer']['name']}); pass --model to decode correctly"
        )
    legend = Text("legend: ")
    legend.append("trained", style="bold green")
    legend.append(" / ")
    legend.append("not trained", style="dim")
    console.print(legend)
    for i in range(min(n, len(ds.train))):
        row = ds.train[i]
        trained = sum(lab != -100 for lab in row["labels"])
        console.print(f"[bold cyan]train row {i}[/]: {row['length']} tokens, {trained} trained")
        text = Text()
        for chunk, is_trained in mask_segments(row["input_ids"], row["labels"], tokenizer):
            text.append(chunk, style="bold green" if is_trained else "dim")
        console.print(text)
