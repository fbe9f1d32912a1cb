"""loft portal: the web portal and its JSON API (loft.portal) on one port."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import typer


def register(root: typer.Typer) -> None:
    """Adds the top-level `loft portal` command."""
    root.command("portal")(portal)


def portal(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it to your network."
    ),
    port: int = typer.Option(8600, "--port", "-p", help="Port to listen on."),
) -> None:
    """Run the portal (users, API tokens, the audit trail) until Ctrl-C or SIGTERM.

    Users sign in with accounts made by `loft users add`; scripts use personal API tokens
    (Authorization: Bearer) created on the portal's tokens page. Sessions last
    portal.session_hours (settings.yaml) or $LOFT_PORTAL_SESSION_HOURS, default 12.
    """
    from loft.cli.output import console, err_console
    from loft.cli.serve import bind_listener
    from loft.portal.app import create_app
    from loft.portal.auth import session_hours
    from loft.portal.store import PortalStore

    session_hours()  # a bad setting stops here, with its message, not at the first sign-in
    sock = bind_listener(host, port, what="port", fix="Pick another --port")
    try:
        store = PortalStore()
        app = create_app(store)
        shown = f"[{host}]" if ":" in host else host
        console.print(f"loft portal on [bold]http://{shown}:{port}/[/] (Ctrl-C stops)")
        console.print(f"accounts: {store.path}", markup=False)
        if store.count_users() == 0:
            err_console.print(
                "no users yet: create the first admin with\n  loft users add NAME --role admin",
                markup=False,
            )
        if host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(
                f"[yellow]note:[/] listening on {host}: serve it to others over HTTPS (a reverse "
                "proxy on this machine), or passwords and session cookies cross the network in "
                "the clear.",
                soft_wrap=True,
            )
        _serve(app, sock)
    finally:
        sock.close()
    console.print("stopped")


def _serve(app: object, sock: object) -> None:
    """Serve until SIGINT or SIGTERM, finish the requests in flight, and return (so the command
    exits 0; uvicorn would re-raise the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in stops}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
