"""loft serve [--config serve.yaml] [--host H] [--port P] [--no-auth] [--set key=value ...], and
loft serve status [--url URL] [--key KEY]: what a running server serves.

`loft serve` is a group whose callback runs the server when no subcommand is given, so
`loft serve --port 8000` works as it always has and `loft serve status` sits beside it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from loft.cli.schema_help import SchemaHelpGroup

SERVE_HELP = """Serve the base model and registered adapters behind an OpenAI-compatible API.

The config (YAML) keys, with defaults (every key of the schema, loft.core.specs.ServeConfig):

{schema:ServeConfig}

Requests name a model as the base model's name, an adapter `name` (follows the default alias),
`name@alias` or `name:VERSION`; each API key may reach only its allow-list. Command-line flags
override the file. The ports are checked before the model loads (taken: exit 2). SIGTERM or
Ctrl-C stops accepting requests, finishes those in flight, exits.

Metrics for Prometheus: with API keys on, GET /metrics needs a key created with
`loft keys create --name prometheus --metrics` (no key: 401; any other key: 403, naming no
model). Or set metrics_port (--metrics-port) to also serve /metrics, with no key, on a listener
of its own at metrics_host (default 127.0.0.1: bind it to an interface only Prometheus reaches).
Under --no-auth every endpoint is open, /metrics included. /health and /ready are always open.

`loft serve status` asks a running server what is loaded and which version each adapter name
and alias serves (GET /v1/loft/status: any valid key; a --metrics key sees every adapter, other
keys their allow-list).

A traffic split (set by `loft rollout`) sends a share of the requests for a bare adapter name to
a candidate version, sticky per client: by the X-Loft-Route-Key header, else the request's
`user`, else the API key; responses name the arm in X-Loft-Route. POST /v1/feedback rates a
response by its id: {"id": "chatcmpl-...", "thumbs": "up"} or {"id": ..., "score": 0.8}.
"""


def register(root: typer.Typer) -> None:
    app = typer.Typer(cls=SchemaHelpGroup, add_completion=False)

    @app.callback(invoke_without_command=True, help=SERVE_HELP, subcommand_metavar="[status]")
    def serve_cmd(
        ctx: typer.Context,
        config: Path | None = typer.Option(None, "--config", "-c", help="Server config YAML."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
        port: int = typer.Option(8000, "--port", "-p", help="Port to bind."),
        no_auth: bool = typer.Option(
            False,
            "--no-auth",
            help="Serve without API keys: anyone who can connect may use "
            "every model. For local use only.",
        ),  # fmt: skip
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a key: --set max_resident_adapters=16 (repeatable)."
        ),
        engine: str | None = typer.Option(None, "--engine", help="torch | vllm (overrides file)."),
        base_model: str | None = typer.Option(
            None, "--base-model", help="Base model to serve (overrides the file)."
        ),
        metrics_port: int | None = typer.Option(
            None,
            "--metrics-port",
            help="Also serve /metrics, with no key, on this port at metrics_host (overrides "
            "the file).",
        ),
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        from loft.core.config import load_serve_config

        overrides = list(set_)
        if engine is not None:
            overrides.append(f"engine={engine}")
        if base_model is not None:
            overrides.append(f"base_model={base_model}")
        if metrics_port is not None:
            overrides.append(f"metrics_port={metrics_port}")
        cfg = load_serve_config(config, overrides)
        run_server(cfg, host=host, port=port, auth=not no_auth)

    @app.command("status")
    def status_cmd(
        url: str = typer.Option(
            "http://127.0.0.1:8000",
            "--url",
            envvar="LOFT_SERVE_URL",
            help="The server's address (a base_url ending in /v1 works too).",
        ),
        key: str | None = typer.Option(
            None,
            "--key",
            envvar="LOFT_API_KEY",
            help="An API key of that server. A --metrics key sees every adapter; other keys "
            "see their allow-list. Not needed under --no-auth.",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the server's JSON as is."),
    ) -> None:
        """What a running `loft serve` has loaded and which version each adapter serves."""
        from loft.cli.output import print_json
        from loft.serve.client import fetch_status

        doc = fetch_status(url, key)
        if json_out:
            print_json(doc)
            return
        _print_status(url, doc)

    root.add_typer(app, name="serve")


def _print_status(url: str, doc: dict[str, Any]) -> None:
    from rich.table import Table

    from loft.cli.output import console

    base = doc["base_model"]
    resident = doc["resident"]
    console.print(
        f"loft serve at {url}: [bold]{doc['state']}[/], up {_duration(doc['uptime_s'])}, "
        f"loft {doc['loft_version']}, {doc['engine']} engine",
        soft_wrap=True,
    )
    console.print(f"base model  {base['name']} (sha256 {base['sha256'][:12]}…)", soft_wrap=True)
    console.print(f"requests    {doc['in_flight']} in flight, {doc['queue_depth']} queued")
    refs = ", ".join(r["ref"] + (" (pinned)" if r["pinned"] else "") for r in resident)
    console.print(
        f"resident    {len(resident)} of {doc['max_resident_adapters']} adapter slots"
        + (f": {refs}" if refs else ""),
        soft_wrap=True,
    )
    view = doc["view"]
    console.print(
        "view        "
        + ("every adapter" if view == "all" else f"the allow-list of {view} (not every adapter)"),
        soft_wrap=True,
    )
    if not doc["adapters"]:
        console.print("no registered adapters visible to this key")
        return
    table = Table()
    table.add_column("adapter")
    table.add_column(f"serves (follows {doc['default_alias']})")
    table.add_column("aliases")
    table.add_column("resident")
    loaded = {r["ref"] for r in resident}
    for a in doc["adapters"]:
        mine = sorted(ref for ref in loaded if ref.rpartition(":")[0] == a["name"])
        aliases = ", ".join(f"{alias} → {ref}" for alias, ref in a["aliases"].items())
        serves = a["serves"] or "-"
        if split := a.get("split"):  # a traffic split: the candidate takes its share
            share = split["share"]
            serves = f"{serves} {1 - share:.0%}, {split['candidate']} {share:.0%} (split)"
        table.add_row(a["name"], serves, aliases or "-", ", ".join(mine) or "-")
    console.print(table)
    console.print(
        f"Alias moves reach live traffic within {doc['alias_refresh_s']} s (alias_refresh_s)."
    )


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def bind_listener(host: str, port: int, *, what: str, fix: str) -> socket.socket:
    """A socket bound to host:port (not yet listening), or a ConfigError (exit 2) that says why:
    checked before anything slow loads, and kept so no one takes the port in between."""
    from loft.core.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: accepted connections inherit it, and asyncio sets TCP_NODELAY
    # only on sockets whose proto says TCP. With proto 0, Nagle held every response on a kept-alive
    # connection until the client's delayed ACK: ~40 ms added to each request after the first.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        code = getattr(e, "errno", None)
        if code == errno.EADDRINUSE:
            raise ConfigError(
                f"{what} {host}:{port} is already in use (another `loft serve`, or another "
                "program, listens there); nothing was loaded.",
                hint=f"{fix}, or stop what holds it (`ss -ltnp 'sport = :{port}'` shows it).",
            ) from None
        if code == errno.EACCES:
            raise ConfigError(
                f"not allowed to listen on {what} {host}:{port} (ports below 1024 need "
                "privileges); nothing was loaded.",
                hint=f"{fix} (1024 or above).",
            ) from None
        if isinstance(e, OverflowError):
            reason = "a port is 0-65535"
        elif code == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            reason = f"{host} is not an address of this machine"
        else:
            reason = e.strerror or str(e)
        raise ConfigError(
            f"cannot listen on {what} {host}:{port}: {reason}; nothing was loaded.",
            hint="Use --host 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of "
            f"this machine's addresses; {fix[0].lower()}{fix[1:]}.",
        ) from None
    return sock


def _listeners(cfg: Any, host: str, port: int) -> tuple[socket.socket, socket.socket | None]:
    from loft.core.errors import ConfigError

    mport = cfg.metrics_port
    if mport is not None and mport != 0 and mport == port:
        raise ConfigError(
            f"metrics_port {mport} is the API port; the metrics listener needs a port of its own.",
            hint="Pick another --metrics-port (or --set metrics_port=N), e.g. 9464.",
        )
    api = bind_listener(host, port, what="port", fix="Pick another --port")
    if mport is None:
        return api, None
    try:
        metrics = bind_listener(
            cfg.metrics_host,
            mport,
            what="metrics_port",
            fix="Pick another --metrics-port (or metrics_host)",
        )
    except BaseException:
        api.close()
        raise
    return api, metrics


def run_server(cfg: Any, *, host: str, port: int, auth: bool) -> None:
    """Bind the ports, start the engine (errors out cleanly before serving), serve until a
    signal, then drain."""
    api_sock, metrics_sock = _listeners(cfg, host, port)  # before the model loads
    try:
        from loft.serve.engine import make_engine
        from loft.serve.keys import KeyStore

        keys = KeyStore(Path(cfg.keys_db).expanduser() if cfg.keys_db else None) if auth else None
        from loft.cli.output import err_console

        err_console.print(f"loading {cfg.base_model} ({cfg.engine} engine) …", soft_wrap=True)
        eng = make_engine(cfg)
        eng.start()  # a LoftError here (vLLM without a GPU, bad base) exits 2 with no traceback
        try:
            _serve(cfg, eng, keys, api_sock, metrics_sock)
        finally:
            eng.shutdown()
    finally:
        for sock in (api_sock, metrics_sock):
            if sock is not None:
                sock.close()


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(
    cfg: Any, eng: Any, keys: Any, api_sock: socket.socket, metrics_sock: socket.socket | None
) -> None:
    import asyncio

    import uvicorn

    from loft.cli.output import console, err_console
    from loft.serve.app import begin_drain, create_app
    from loft.serve.audit import AuditLog, default_audit_path
    from loft.serve.metrics import Metrics
    from loft.serve.operator import create_metrics_app

    host = api_sock.getsockname()[0]
    audit = AuditLog(default_audit_path(cfg), cfg.log_prompts)
    app = create_app(cfg, eng, keys, audit=audit, metrics=Metrics())

    console.print(f"serving base model [bold]{eng.base.name}[/] ({cfg.engine} engine)")
    if getattr(eng, "sizing", None):  # the vLLM engine says how it sized its LoRA memory
        console.print(eng.sizing, soft_wrap=True)
    resident = eng.resident()
    console.print(f"adapters preloaded: {', '.join(resident) if resident else '(none)'}")
    if keys is None:
        err_console.print(
            "[bold red]WARNING: --no-auth: anyone who can reach this port can use every model "
            "with no API key (and read /metrics and /v1/loft/status).[/]",
            soft_wrap=True,
        )
    else:
        console.print(f"auth: on (API keys in {keys.path}); create one with `loft keys create`")
    if metrics_sock is not None:
        console.print(f"metrics: {_url(metrics_sock, cfg.metrics_host)}/metrics (no key)")
    elif keys is not None:
        console.print("metrics: /metrics with a key made by `loft keys create --metrics`")
    console.print(f"audit log: {audit.path}")

    class _Listener(uvicorn.Server):  # the metrics listener: the API server owns the signals
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    listener = None
    if metrics_sock is not None:
        listener = _Listener(
            uvicorn.Config(create_metrics_app(app), lifespan="off", log_level="warning")
        )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and listener is not None:
                self._metrics_task = asyncio.create_task(listener.serve(sockets=[metrics_sock]))
                while not listener.started and not self._metrics_task.done():
                    await asyncio.sleep(0.01)
            if self.started:
                console.print(
                    f"listening on {_url(api_sock, host)}/v1 (Ctrl-C or SIGTERM stops)",
                    soft_wrap=True,
                )

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets=sockets)  # drains the API first; metrics stay up
            if listener is not None and hasattr(self, "_metrics_task"):
                listener.should_exit = True
                await self._metrics_task

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # drain first, then uvicorn's shutdown
            def on_signal(sig: int, frame: Any) -> None:
                begin_drain(app)
                self.handle_exit(sig, frame)

            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    server = _Server(
        uvicorn.Config(
            app,
            timeout_graceful_shutdown=math.ceil(cfg.drain_timeout_s),
            log_level="warning",
        )
    )
    try:
        server.run(sockets=[api_sock])
    finally:
        audit.close()
    if not server.started:
        from loft.core.errors import LoftError

        raise LoftError(f"the server on {_url(api_sock, host)} did not start; see above.")
    console.print("stopped: in-flight requests finished")
