"""loft users: the portal's accounts from the command line (add, list, roles, disable, passwords).

Whoever can run loft on LOFT_HOME manages its accounts, as with `loft keys`; each change goes
into the audit trail with the OS user ($LOFT_USER, else the login name) as the actor.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from loft.portal.roles import ROLE_HELP, ROLES

app = typer.Typer(
    help="Portal users and their roles: " + "; ".join(f"{r} ({ROLE_HELP[r]})" for r in ROLES),
    no_args_is_help=True,
)

_STDIN_HELP = "Read the password from the first line of stdin instead of prompting (scripts)."


def _store() -> Any:
    from loft.portal.store import PortalStore

    return PortalStore()


def _actor() -> tuple[str, dict[str, str]]:
    from loft.cli.jobs import _owner

    return _owner(None), {"via": "cli"}


def _password(from_stdin: bool, name: str) -> str:
    """The new password: stdin's first line (without its newline), else typed twice, hidden."""
    from loft.core.errors import ConfigError

    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise ConfigError(
                "--password-stdin: stdin was empty; nothing was changed.",
                hint=f"e.g. printf '%s\\n' \"$PASSWORD\" | loft users passwd {name} "
                "--password-stdin",
            )
        return password
    if not sys.stdin.isatty():
        raise ConfigError(
            "no terminal to type the password on (stdin is not a terminal); nothing was changed.",
            hint="Pass --password-stdin and write the password as the first line of stdin.",
        )
    return typer.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)


@app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="User name: lowercase letters, digits, '.', '_', '-'."),
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help=_STDIN_HELP),
) -> None:
    """Add a user; prompts twice for the password unless --password-stdin."""
    from loft.cli.output import console
    from loft.portal.store import check_new_user

    check_new_user(name, role)  # before asking for a password
    password = _password(password_stdin, name)
    actor, context = _actor()
    user = _store().add_user(name, role, password, actor=actor, context=context)
    console.print(f"added {user.name} ({user.role}); they sign in on the portal (`loft portal`)")


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print the users as JSON.")):
    """List users: name, role, status, when added and last changed (UTC)."""
    from loft.cli.output import console, print_json

    store = _store()
    total = store.count_users()
    users, _ = store.list_users(limit=max(total, 1))
    if json_out:
        print_json([u.to_dict() for u in users])
        return
    if not users:
        console.print("no users; add the first admin with: loft users add NAME --role admin")
        return
    from rich.table import Table

    table = Table()
    for col in ("name", "role", "status", "created", "updated"):
        table.add_column(col)
    for u in users:
        table.add_row(
            u.name,
            u.role,
            "[red]disabled[/]" if u.disabled else "[green]active[/]",
            u.created_at[:16].replace("T", " "),
            u.updated_at[:16].replace("T", " "),
        )
    console.print(table)


@app.command("set-role")
def set_role_cmd(
    name: str = typer.Argument(...),
    role: str = typer.Argument(..., help=f"One of: {', '.join(ROLES)}."),
) -> None:
    """Change a user's role; it applies to their next request."""
    from loft.cli.output import console

    actor, context = _actor()
    user = _store().set_role(name, role, actor=actor, context=context)
    console.print(f"{user.name}'s role is now {user.role}")


@app.command("disable")
def disable_cmd(name: str = typer.Argument(...)) -> None:
    """Disable a user: their sessions end now; their API tokens stop working until enabled."""
    from loft.cli.output import console

    actor, context = _actor()
    _store().set_disabled(name, True, actor=actor, context=context)
    console.print(f"disabled {name}")


@app.command("enable")
def enable_cmd(name: str = typer.Argument(...)) -> None:
    """Enable a disabled user again."""
    from loft.cli.output import console

    actor, context = _actor()
    _store().set_disabled(name, False, actor=actor, context=context)
    console.print(f"enabled {name}")


@app.command("passwd")
def passwd_cmd(
    name: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, "--password-stdin", help=_STDIN_HELP),
) -> None:
    """Set a new password for a user; their sessions end."""
    from loft.cli.output import console

    store = _store()
    store.get_user(name)  # a misspelt name fails before the prompt
    password = _password(password_stdin, name)
    actor, context = _actor()
    store.set_password(name, password, actor=actor, context=context)
    console.print(f"set a new password for {name}; their sessions ended")
