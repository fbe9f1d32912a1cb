"""loft encryption: status, key rotation and migration of encryption at rest."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

app = typer.Typer(
    help="Encryption at rest: is it on, rotate the key-encryption key, encrypt an existing "
    "LOFT_HOME.",
    no_args_is_help=True,
)


@contextlib.contextmanager
def _bar(label: str, quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr, fed (done, total, what) by the package API."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from loft.cli.output import err_console

    if quiet:
        yield lambda _d, _t, _w: None
        return
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), console=err_console, transient=True
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, _what: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command("status")
def status_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Is encryption on, with which KEK, and how many files are encrypted.

    Counts the registry's files under LOFT_HOME: encrypted (by key id) or still plaintext."""
    from loft.cli.output import console, print_json
    from loft.registry.encryption import status

    s = status()
    if json_out:
        print_json(s)
        return
    if s["enabled"]:
        console.print(f"encryption at rest: on (KEK {s['key_id']} from {s['provider']})")
    else:
        console.print("encryption at rest: off (no LOFT_KEK_FILE or encryption.kek_file)")
    console.print(
        f"{s['home']}: {s['versions']} registered version(s); {s['encrypted']} file(s) "
        f"encrypted, {s['plaintext']} plaintext"
    )
    for kid, n in sorted(s["by_key"].items()):
        mark = "" if kid == s["key_id"] else "  (not the configured KEK)"
        console.print(f"  KEK {kid}: {n} file(s){mark}")
    if s["enabled"] and s["plaintext"]:
        console.print("Encrypt the plaintext ones with `loft encryption migrate`.")
    others = [k for k in s["by_key"] if k != s["key_id"]]
    if s["enabled"] and others:
        console.print("Finish a rotation with `loft encryption rotate --new-kek-file NEW`.")


@app.command("rotate")
def rotate_cmd(
    new_kek_file: Path = typer.Option(
        ..., "--new-kek-file", help="The new 32-byte KEK (mode 600); the old one is the current."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Re-wrap every data key with a new KEK (headers only; data untouched).

    Safe to interrupt: run it again to finish. Then point LOFT_KEK_FILE (or
    encryption.kek_file) at the new file."""
    from loft.cli.output import console, print_json
    from loft.core.crypto import load_kek
    from loft.registry.encryption import rotate

    new = load_kek(new_kek_file)
    with _bar("re-wrapping data keys", quiet or json_out) as progress:
        result = rotate(new, progress=progress)
    if json_out:
        print_json(result)
        return
    console.print(
        f"KEK {result['old_key_id']} → {result['new_key_id']}: {result['rewrapped']} file(s) "
        f"re-wrapped, {result['already']} already done, {result['objects']} S3 object(s)"
    )
    console.print(
        f"Now set LOFT_KEK_FILE={new_kek_file.expanduser().resolve()} (or encryption.kek_file "
        "in LOFT_HOME/settings.yaml) and retire the old key."
    )


@app.command("migrate")
def migrate_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Encrypt every plaintext registry file with the configured KEK.

    Each file atomically; every version is verified against its card afterwards (digests do
    not change). Safe to interrupt: run it again to finish."""
    from loft.cli.output import console, print_json
    from loft.registry.encryption import migrate

    with _bar("encrypting", quiet or json_out) as progress:
        result = migrate(progress=progress)
    if json_out:
        print_json(result)
        return
    console.print(
        f"KEK {result['key_id']}: {result['encrypted']} file(s) encrypted, {result['already']} "
        f"already encrypted, over {result['versions']} version(s)"
        + (f"; {result['uploaded']} re-uploaded to S3" if result["uploaded"] else "")
    )
