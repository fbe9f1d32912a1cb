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

FORMAT_HELP = "auto, chat, sharegpt, alpaca, completion, preference or kto."
OBJECTIVE_HELP = (
    "What the rows are for: sft; dpo, orpo or simpo (pairs); kto (unpaired rows, derived from "
    "pairs for a preference file); auto: sft, or pairs for a preference file and unpaired rows "
    "for a kto file."
)
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

    Preference pairs (prompt/chosen/rejected) and KTO rows (prompt/completion/label): a prompt
    (a string, or messages ending with a user turn), non-empty assistant completions, chosen
    different from rejected, label true or false; one file holds pairs or unpaired rows, not both.
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
    objective: str = typer.Option("auto", "--objective", help=OBJECTIVE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate, dedup, scan for PII, split, tokenize and cache a dataset; print its report.

    A preference file is prepared as pairs (prompt, chosen and rejected token ids), a kto file
    as unpaired rows; `--objective kto` turns pairs into unpaired rows."""
    from pydantic import ValidationError

    from loft.core.config import format_validation_error
    from loft.core.errors import ConfigError
    from loft.core.specs import DataSpec
    from loft.data import prepare_for

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
    hit = cached_report(spec, known, objective=objective) if known else None
    if hit is not None:
        _fp, path, report = hit
    else:
        tokenizer = _load_tokenizer(model)
        prepared = prepare_for(spec, tokenizer, objective=objective, progress=not json_out)
        path, report = prepared.path, prepared.report
        if key:
            remember_tokenizer_fingerprint(key, report["tokenizer"]["fingerprint"])
    if json_out:
        print_json({**report, "path": str(path)})
    else:
        print_report(report, path)


LAYOUTS = {"paired": "pairs (dpo, orpo, simpo)", "unpaired": "unpaired rows (kto)"}


@app.command("from-audit")
def from_audit_cmd(
    audit: list[Path] = typer.Argument(
        None, help="Audit logs (default: LOFT_HOME/serve/audit.jsonl)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The chat JSONL to write."),
    model: str | None = typer.Option(
        None, "--model", help="Only requests a version of this registered model answered."
    ),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Only requests rated (POST /v1/feedback) at least this, 0-1."
    ),
    since: str | None = typer.Option(None, "--since", help="Only requests from this ISO time on."),
    json_out: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Turn served chat requests back into training records: the request's messages and the
    answer the model gave, from a server run with `log_prompts: true`.

    With --min-score, only answers clients rated at least that (their mean rating) are kept:
    production traffic curated by its users, ready for `loft data validate` and a retraining
    (e.g. a pipeline's train stage reading the file). Prints what was kept and why every other
    request was left out.
    """
    from loft.data.traffic import from_audit, write_records

    paths = list(audit or [])
    if not paths:
        from loft.core.specs import ServeConfig
        from loft.serve.audit import default_audit_path

        paths = [default_audit_path(ServeConfig())]
    got = from_audit(paths, model=model, min_score=min_score, since=since)
    write_records(got.records, out)
    if json_out:
        print_json({**got.to_dict(), "out": str(out)})
        return
    why = ", ".join(f"{n} {reason}" for reason, n in got.skipped.most_common())
    err_console.print(
        f"wrote {len(got.records)} records to {out} from {got.read} served chat requests"
        + (f" (left out: {why})" if why else ""),
        markup=False,
        soft_wrap=True,
    )


def print_report(report: dict[str, Any], path: Path) -> None:
    c = report
    layout = report.get("layout", "sft")
    cached = " (cached)" if report.get("cached") else ""
    rows = f", {LAYOUTS[layout]}" if layout in LAYOUTS else ""
    console.print(
        f"[bold]dataset {report['fingerprint'][:12]}[/]{cached}  format {report['format']}{rows}"
    )
    line = f"records {c['records']}  valid {c['valid']}  invalid {c['invalid']}"
    if c["dropped_invalid"]:
        line += f" [yellow](dropped {c['dropped_invalid']} with --skip-invalid)[/]"
    console.print(line)
    dedup = "off" if not report["settings"]["dedup"] else f"{c['exact_dups']} exact, "
    if report["settings"]["dedup"] and layout == "sft":
        dedup += f"{c['near_dups']} near (threshold {report['settings']['near_dup_threshold']})"
    elif report["settings"]["dedup"]:
        dedup += "near duplicates kept (pairs often share a prompt)"
    if c["eval_overlap"]:
        dedup += f", {c['eval_overlap']} eval records also in train"
    console.print(f"duplicates removed: {dedup}")
    max_len = report["settings"]["max_seq_len"]
    if layout == "sft":
        console.print(
            f"truncated {c['truncated']} (max_seq_len {max_len}), "
            f"dropped {c['empty_after_truncation']} with no trained tokens left"
        )
    else:
        console.print(
            f"dropped {c['too_long']} longer than max_seq_len {max_len} "
            "(prompt + longest completion; never truncated)"
        )
    _print_pii(report["pii"])
    console.print(_stats_table(report["stats"], layout))
    console.print(f"fingerprint {report['fingerprint']}\npath {path}", soft_wrap=True)


def _print_pii(pii: dict[str, Any]) -> None:
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


def _stats_table(stats: dict[str, Any], layout: str) -> Any:
    from rich.table import Table

    if layout == "sft":
        keys = ["records", "tokens", "trained_tokens"]
    elif layout == "paired":
        keys = ["records", "tokens", "prompt_tokens", "chosen_tokens", "rejected_tokens"]
    else:
        keys = ["records", "desirable", "undesirable", "tokens", "prompt_tokens"]
        keys.append("completion_tokens")
    keys += ["mean", "p50", "p95", "max"]
    names = {"records": "rows", "trained_tokens": "trained"}
    table = Table("split", *(names.get(k, k.removesuffix("_tokens")) for k in keys))
    for split in ("train", "eval"):
        s = stats.get(split)
        if s:
            table.add_row(split, *(str(s[k]) for k in keys))
    return table


@app.command()
def inspect(
    target: str = typer.Argument(..., help="A data file, or a prepared dataset's fingerprint."),
    n: int = typer.Option(3, "-n", help="How many examples to show."),
    model: str = typer.Option(
        "smollm2-135m-instruct",
        "--model",
        "-m",
        help="Tokenizer used to render (--tokens) or decode prepared rows.",
    ),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    column_map: list[str] = typer.Option(None, "--column-map", help=COLUMN_MAP_HELP),
    tokens: bool = typer.Option(
        False,
        "--tokens",
        help="Render a file's records with the model's chat template and mark the trained "
        "tokens (assistant replies; a preference file's chosen and rejected completions).",
    ),
) -> None:
    """Show a file's format and normalised records (--tokens: as the model sees them), or a
    prepared dataset's rows, with the trained (labelled) tokens highlighted."""
    if Path(target).is_file():
        _inspect_file(Path(target), n, format, _column_map(column_map), model if tokens else None)
    else:
        _inspect_prepared(target, n, model)


def _inspect_file(
    path: Path, n: int, format: str, column_map: dict[str, str], model: str | None
) -> None:
    from loft.data.readers import read_file

    res = read_file(path, format=format, column_map=column_map)
    console.print(
        f"[bold]{res.path}[/]: format {res.format}, {res.n_records} records, "
        f"{res.n_invalid} invalid",
        soft_wrap=True,
    )
    tokenizer = _load_tokenizer(model) if model is not None and res.records else None
    if tokenizer is not None:
        _legend()
    for r in res.records[:n]:
        if tokenizer is None:
            console.print(f"[bold cyan]{r.loc}[/] ({r.format})", soft_wrap=True)
            console.print(json.dumps(r.data, indent=2, ensure_ascii=False), markup=False)
        elif "prompt" in r.data:
            _show_preference_record(r, tokenizer)
        else:
            _show_sft_record(r, tokenizer)
    if res.problems:
        err_console.print(f"{len(res.problems)} problems; run `loft data validate {path}`")


def _show_sft_record(r: Any, tokenizer: Any) -> None:
    from loft.data import mask_segments
    from loft.data.template import tokenize_record

    out = tokenize_record(r.data, tokenizer, max_seq_len=1 << 30)
    trained = sum(lab != -100 for lab in out["labels"])
    console.print(
        f"[bold cyan]{r.loc}[/] ({r.format}): {len(out['input_ids'])} tokens, {trained} trained",
        soft_wrap=True,
    )
    console.print(_marked(mask_segments(out["input_ids"], out["labels"], tokenizer)))


def _show_preference_record(r: Any, tokenizer: Any) -> None:
    from loft.data import tokenize_preference

    out, problems = tokenize_preference(r.data, tokenizer)
    if out is None:
        console.print(f"[bold cyan]{r.loc}[/] ({r.format})", soft_wrap=True)
        for field, why in problems:
            console.print(f"{r.loc}: {field}: {why}", style="yellow", soft_wrap=True, markup=False)
        return
    sides = {k.removesuffix("_ids"): v for k, v in out.items() if k != "prompt_ids"}
    if "label" in r.data:
        label = "true, desirable" if r.data["label"] else "false, undesirable"
        sides = {f"completion (label {label})": sides["completion"]}
    _show_preference_row(f"{r.loc} ({r.format})", out["prompt_ids"], sides, tokenizer)


def _show_preference_row(
    title: str, prompt_ids: list[int], sides: dict[str, list[int]], tokenizer: Any
) -> None:
    counts = ", ".join(f"{name.split(' ')[0]} {len(ids)}" for name, ids in sides.items())
    console.print(
        f"[bold cyan]{title}[/]: prompt {len(prompt_ids)} tokens, {counts} trained",
        soft_wrap=True,
    )
    console.print("[bold]prompt[/]")
    console.print(_marked([(tokenizer.decode(prompt_ids), False)]))
    for name, ids in sides.items():
        console.print(f"[bold]{name}[/]")
        console.print(_marked([(tokenizer.decode(ids), True)]))


MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


def _marked(segments: list[tuple[str, bool]]) -> Any:
    """Trained runs in bold green, the rest dim; without colour (piped, NO_COLOR) trained runs
    are also bracketed ⟦…⟧ so the mask stays visible."""
    from rich.text import Text

    plain = console.no_color or console.color_system is None
    text = Text()
    for chunk, trained in segments:
        if trained and plain:
            chunk = f"{MARK_OPEN}{chunk}{MARK_CLOSE}"
        text.append(chunk, style="bold green" if trained else "dim")
    return text


def _legend() -> None:
    from rich.text import Text

    legend = Text("legend: ")
    legend.append("trained", style="bold green")
    if console.no_color or console.color_system is None:
        legend.append(f" ({MARK_OPEN}…{MARK_CLOSE})")
    legend.append(" / ")
    legend.append("not trained", style="dim")
    console.print(legend)


def _inspect_prepared(ref: str, n: int, model: str) -> None:
    from loft.data import load_prepared, mask_segments, tokenizer_fingerprint

    ds = load_prepared(ref)
    print_report(ds.report, ds.path)
    tokenizer = _load_tokenizer(model)
    if tokenizer_fingerprint(tokenizer) != ds.report["tokenizer"]["fingerprint"]:
        err_console.print(
            f"[yellow]warning:[/] {model}'s tokenizer is not the one this dataset was prepared "
            f"with ({ds.report['tokenizer']['name']}); pass --model to decode correctly"
        )
    _legend()
    for i in range(min(n, len(ds.train))):
        row = ds.train[i]
        if ds.layout == "paired":
            sides = {"chosen": row["chosen_ids"], "rejected": row["rejected_ids"]}
            _show_preference_row(f"train row {i}", row["prompt_ids"], sides, tokenizer)
        elif ds.layout == "unpaired":
            label = "true, desirable" if row["label"] else "false, undesirable"
            sides = {f"completion (label {label})": row["completion_ids"]}
            _show_preference_row(f"train row {i}", row["prompt_ids"], sides, tokenizer)
        else:
            trained = sum(lab != -100 for lab in row["labels"])
            console.print(f"[bold cyan]train row {i}[/]: {row['length']} tokens, {trained} trained")
            console.print(_marked(mask_segments(row["input_ids"], row["labels"], tokenizer)))
