"""loft registry: register, list, show, diff, verify, history, rollback and alias moves.

Thin: each command parses, calls loft.registry, prints. Heavy imports happen inside commands.
"""

from __future__ import annotations

from typing import Any

import typer

from loft.cli.output import console, human_size, print_json

app = typer.Typer(
    help="Registered model versions: lineage cards, integrity checks, aliases and rollback.",
    no_args_is_help=True,
)

JSON_OPT = typer.Option(False, "--json", help="Print stable JSON instead of text.")


_size = human_size


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


@app.command("register")
def register_cmd(
    path: str = typer.Argument(..., help="A loft run dir, a PEFT adapter folder or an HF model."),
    name: str | None = typer.Option(None, "--name", "-n", help="Registered model name."),
    parent: str | None = typer.Option(None, "--parent", help="Parent version, e.g. bot:2."),
    json_out: bool = JSON_OPT,
) -> None:
    """Register a run's adapter (or full model) as a new version with its lineage card."""
    from loft.registry import register

    mv = register(path, name=name, parent=parent)
    if json_out:
        print_json(mv.to_dict())
        return
    d = mv.to_dict()
    console.print(
        f"registered [bold]{mv.name}:{mv.version}[/] ({d['kind']}, {len(d['files'])} files, "
        f"{_size(d['bytes'])}) at {mv.path}"
    )
    console.print(f"promote it with `loft registry alias {mv.name}:{mv.version} --to champion`")


@app.command("list")
def list_cmd(json_out: bool = JSON_OPT) -> None:
    """List registered models with their latest version and aliases."""
    from rich.table import Table

    from loft.registry import list_models

    rows = list_models()
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("No registered models yet. Register one with `loft registry register RUN`.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "latest", "versions", "aliases"):
        table.add_column(col, justify="right" if col in ("latest", "versions") else "left")
    for r in rows:
        aliases = ", ".join(f"{a}→{v}" for a, v in r["aliases"].items()) or "-"
        table.add_row(r["name"], _fmt(r["latest"]), str(r["n_versions"]), aliases)
    console.print(table)


@app.command("show")
def show_cmd(
    ref: str = typer.Argument(..., help="NAME, NAME@ALIAS or NAME:VERSION."),
    json_out: bool = JSON_OPT,
) -> None:
    """Show a version's lineage, evaluations, aliases, files and served digest (files are not
    re-hashed; `verify` does that).

    The digest is what `loft serve` names in X-Loft-Adapter-Sha256 and in its audit log:
    sha256 over the sorted lines `PATH:SHA256\\n` of the version's *.safetensors files."""
    from loft.registry import get_version

    d = get_version(ref, verify=False).to_dict()
    if json_out:
        print_json(d)
        return
    lin = d["lineage"]
    console.print(f"[bold]{d['name']}:{d['version']}[/] {d['kind']}  created {d['created']}")
    console.print(f"  aliases:  {', '.join(d['aliases']) or '-'}")
    console.print(
        f"  base:     {_fmt(lin['base_model'])} (sha256 {_fmt(lin['base_model_sha256'])})"
    )
    console.print(f"  dataset:  {_fmt(lin['dataset_fingerprint'])}")
    if privacy := lin.get("privacy"):
        from loft.registry.card import describe_privacy

        console.print(f"  privacy:  {describe_privacy(privacy)}", markup=False)
    parents = lin.get("parents") or []
    label = "parents:" if len(parents) > 1 else "parent:"
    refs = ", ".join(f"{p['name']}:{p['version']}" for p in parents) or "-"
    console.print(f"  {label:<10}{refs}")
    if study := lin.get("study"):
        console.print(
            f"  study:    {study['name']} trial {study['trial']} ("
            f"{study.get('objective', 'eval_loss').replace('_', ' ')} "
            f"{study.get('value', study.get('eval_loss')):.4f}, best of {study['trials']})",
            markup=False,
        )
    tokens = lin["special_tokens"] or {}
    console.print(f"  tokens:   pad={_fmt(tokens.get('pad'))} eos={_fmt(tokens.get('eos'))}")
    console.print(f"  loft:     {lin['loft_version']} (git {_fmt(lin['git_commit'])})")
    if d["degraded"]:
        console.print(f"  [red]degraded:[/] {d['degraded'].get('reason')}")
    _print_evaluations(d["evaluations"])
    console.print(f"  digest:   {d['weights_digest']}  (X-Loft-Adapter-Sha256 when served)")
    console.print(f"  files ({_size(d['bytes'])}):")
    for f in d["files"]:
        console.print(f"    {f['path']}  {_size(f['bytes'])}  {f['sha256'][:16]}")


def _print_evaluations(entries: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from loft.registry.evaluations import describe

    if not entries:
        console.print("  evaluations: none (measure with `loft eval REF --data FILE`)")
        return
    table = Table(box=None, header_style="bold", title="  evaluations", title_justify="left")
    for col in ("metric", "value", "measured on", "basis", "source", "when"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for e in entries:
        table.add_row(
            e["metric"], _fmt(e["value"]), describe(e.get("on")), e.get("basis") or "-",
            e.get("source") or "-", str(e.get("time") or "-"),
        )  # fmt: skip
    console.print(table)


@app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., help="First version reference."),
    b: str = typer.Argument(..., help="Second version reference."),
    json_out: bool = JSON_OPT,
) -> None:
    """Config, data and metric differences between two versions."""
    from loft.registry import diff

    d = diff(a, b)
    if json_out:
        print_json(d)
        return
    console.print(f"[bold]{d['a']}[/] vs [bold]{d['b']}[/]")
    console.print("config:" if d["config"] else "config: identical")
    for key, v in d["config"].items():
        console.print(f"  {key}: {_fmt(v['a'])} → {_fmt(v['b'])}")
    fp = d["data"]["fingerprint"]
    same = "same" if fp["same"] else f"{_fmt(fp['a'])[:12]} → {_fmt(fp['b'])[:12]}"
    console.print(f"data: {same}")
    for key, v in d["data"]["report"].items():
        console.print(f"  {key}: {_fmt(v['a'])} → {_fmt(v['b'])}")
    console.print("metrics:")
    for key, v in d["metrics"].items():
        delta = f" ({v['delta']:+.6g})" if v["delta"] is not None else ""
        console.print(f"  {key}: {_fmt(v['a'])} → {_fmt(v['b'])}{delta}")


@app.command("verify")
def verify_cmd(ref: str = typer.Argument(..., help="NAME, NAME@ALIAS or NAME:VERSION.")) -> None:
    """Recompute every file's sha256; exit 1 naming the file when one does not match."""
    from loft.registry import verify

    mv = verify(ref)
    for f in mv.to_dict()["files"]:
        console.print(f"OK  {f['path']}  {f['sha256'][:16]}")
    console.print(f"[green]{mv.name}:{mv.version} is intact[/] ({len(mv.card['files'])} files)")


@app.command("history")
def history_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    json_out: bool = JSON_OPT,
) -> None:
    """Every alias move and traffic split of a model: who, when, from, to, why, gate results."""
    from loft.registry import history

    rows = history(name)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print(f"No alias moves recorded for {name}.")
        return
    for r in rows:
        if "deleted" in r:
            console.print(
                f"{r['when']}  deleted version {r['deleted']}  by {r['who']}  {r.get('why') or ''}"
            )
            continue
        if r.get("event") in ("split", "split-cleared"):
            console.print(
                f"{r['when']}  {_split_line(name, r)}  by {r['who']}  {r.get('why') or ''}"
            )
            _print_gate(r)
            continue
        flags = " [yellow]forced[/]" if r.get("forced") else ""
        if r.get("event") == "promote-refused":
            console.print(
                f"{r['when']}  {r['alias']}: {r['to']} REFUSED by the gate, stays "
                f"{_fmt(r['from'])}  by {r['who']}  {r.get('why') or ''}"
            )
            _print_gate(r)
            continue
        flags += " (rollback)" if r.get("rollback") else ""
        console.print(
            f"{r['when']}  {r['alias']}: {_fmt(r['from'])} → {r['to']}  by {r['who']}"
            f"{flags}  {r.get('why') or ''}"
        )
        _print_gate(r)


def _split_line(name: str, r: dict[str, Any]) -> str:
    """A traffic split's history entry: the candidate's share, or the split's end."""
    share = r.get("share")
    pct = "?" if share is None else f"{share:.0%}"
    if r.get("event") == "split-cleared":
        return f"split ended: {name}:{_fmt(r.get('to'))} had {pct}; the champion takes all"
    prev = r.get("previous") or {}
    was = ""
    if prev.get("candidate") == r.get("to") and prev.get("share") is not None:
        was = f" (was {prev['share']:.0%})"
    elif prev:
        was = f" (replaces {name}:{prev.get('candidate')})"
    return f"split: {name}:{r.get('to')} takes {pct}{was}"


def _print_gate(r: dict[str, Any]) -> None:
    for check in r.get("gate") or []:
        mark = "pass" if check.get("passed") else "FAIL"
        console.print(f"    gate {mark}: {check.get('expr')}  ({check.get('reason')})")


@app.command("delete")
def delete_cmd(
    ref: str = typer.Argument(..., help="NAME:VERSION to delete."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the history)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a version: MLflow forgets it and its files are removed (a DELETED.json tombstone
    keeps its number and digest). Refused while an alias points at it."""
    from loft.registry import delete_version

    if not yes:
        typer.confirm(f"Delete {ref} and its files?", abort=True)
    entry = delete_version(ref, reason=reason)
    name = ref.partition(":")[0]
    console.print(f"deleted {name}:{entry['deleted']} (recorded in `loft registry history {name}`)")


@app.command("rollback")
def rollback_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("champion", "--alias", help="The alias to move back."),
    reason: str = typer.Option("rollback", "--reason", help="Why (recorded in the history)."),
) -> None:
    """Move an alias back to the version it pointed at before its latest move."""
    from loft.registry import rollback

    entry = rollback(name, alias, reason=reason)
    console.print(f"{name}@{alias}: {entry['from']} → {entry['to']} (rolled back)")


@app.command("alias")
def alias_cmd(
    ref: str = typer.Argument(..., help="NAME:VERSION to point the alias at."),
    to: str = typer.Option(..., "--to", help="The alias to set, e.g. champion."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the history)."),
) -> None:
    """Point an alias at a version (no gate; use `promote` for a gated move)."""
    from loft.core.errors import ConfigError
    from loft.registry import move_alias, parse_ref

    name, alias, version = parse_ref(ref)
    if version is None:
        raise ConfigError(f"{ref!r} names no version.", hint="Use NAME:VERSION, e.g. bot:3.")
    entry = move_alias(name, to, version, reason=reason)
    console.print(f"{name}@{to}: {_fmt(entry['from'])} → {entry['to']}")


@app.command("promote")
def promote_cmd(
    ref: str = typer.Argument(..., help="NAME:VERSION to promote."),
    to: str = typer.Option("champion", "--to", help="The alias to move."),
    gate: str | None = typer.Option(
        None, "--gate", help="Gate YAML (a `gate:` list); default: the version's config gate."
    ),
    force: bool = typer.Option(False, "--force", help="Move even if the gate fails (recorded)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the history)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Run the gate on the version's evaluations and move the alias only if it passes.

    Exit 0 when the alias moved, 3 when the gate refused. Relative checks such as
    `eval_loss <= champion + 0.02` compare with the version the alias points at now, measured on
    the same records with the same settings; when it has no such measurement and the
    candidate's file is still there, it is evaluated on it first (and that is recorded).
    """
    from loft.core.errors import GateRefused
    from loft.evaluate.promotion import promote

    try:
        promo = promote(
            ref, to=to, gate_path=gate, force=force, reason=reason, progress=not json_out
        )
    except GateRefused as e:
        if e.promotion is not None:
            _print_promotion(e.promotion, json_out)
        raise
    _print_promotion(promo, json_out)


def _print_promotion(promo: Any, json_out: bool) -> None:
    if json_out:
        print_json(promo.to_dict())
        return
    from rich.table import Table

    d = promo.to_dict()
    table = Table(title=f"gate for {d['name']}:{d['version']} → @{d['alias']} ({d['gate_source']})")
    for col in ("check", "value", "threshold", "result"):
        table.add_column(col)
    for c in d["checks"]:
        mark = "[green]pass[/]" if c["passed"] else "[red]FAIL[/]"
        table.add_row(c["expr"], _fmt(c["value"]), _fmt(c["threshold"]), f"{mark} {c['reason']}")
    if d["checks"]:
        console.print(table)
    else:
        console.print("no gate checks (an empty gate passes)")
    if d["moved"]:
        forced = " [yellow](forced past a failing gate)[/]" if d["forced"] else ""
        if d["forced"] and d["passed"]:
            forced = " [yellow](forced; the gate passed)[/]"
        console.print(f"{d['name']}@{d['alias']}: {_fmt(d['previous'])} → {d['version']}{forced}")
