"""`loft users` and `loft portal` as users type them: accounts made on the command line (audited
with the OS user), a real server signed in to over HTTP with a real cookie, a taken port, and
the portal's import rules and package data."""

from __future__ import annotations

import fnmatch
import http.cookiejar
import io
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, kill_tree, run_cli, start_loft, wait_for_port
from loft.core import audit
from loft.portal.store import PortalStore

ROOT = Path(__file__).resolve().parents[1]


def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


@pytest.mark.unit
def test_users_commands_change_accounts_and_audit_the_os_user(loft_home, monkeypatch, capsys):
    monkeypatch.setenv("LOFT_USER", "ops-alice")
    _stdin(monkeypatch, "first long password\n")
    assert run_cli("users", "add", "root", "--role", "admin", "--password-stdin") == 0
    _stdin(monkeypatch, "second long password\n")
    assert run_cli("users", "add", "carol", "--role", "annotator", "--password-stdin") == 0
    assert run_cli("users", "set-role", "carol", "curator") == 0
    assert run_cli("users", "disable", "carol") == 0
    assert run_cli("users", "enable", "carol") == 0
    _stdin(monkeypatch, "third long password\n")
    assert run_cli("users", "passwd", "carol", "--password-stdin") == 0
    capsys.readouterr()
    assert run_cli("users", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [
        ("carol", "curator", False),
        ("root", "admin", False),
    ]
    got = [(e["actor"], e["action"], e["target"], e["details"]) for e in reversed(audit.read(10))]
    assert got == [
        ("ops-alice", "user.add", "root", {"role": "admin", "via": "cli"}),
        ("ops-alice", "user.add", "carol", {"role": "annotator", "via": "cli"}),
        (
            "ops-alice",
            "user.set_role",
            "carol",
            {"from": "annotator", "to": "curator", "via": "cli"},
        ),
        ("ops-alice", "user.disable", "carol", {"via": "cli"}),
        ("ops-alice", "user.enable", "carol", {"via": "cli"}),
        ("ops-alice", "user.passwd", "carol", {"sessions_ended": 0, "via": "cli"}),
    ]
    PortalStore().login("carol", "third long password", hours=1)  # the new password works


@pytest.mark.unit
def test_users_commands_refuse_clearly(loft_home, monkeypatch, capsys):
    _stdin(monkeypatch, "x\n")
    assert run_cli("users", "add", "Bob", "--role", "boss", "--password-stdin") == 2
    err = capsys.readouterr().err
    assert "invalid user name 'Bob'" in err and "unknown role 'boss'" in err
    assert "Traceback" not in err
    _stdin(monkeypatch, "")
    assert run_cli("users", "add", "bob", "--role", "viewer", "--password-stdin") == 2
    assert "stdin was empty" in capsys.readouterr().err
    _stdin(monkeypatch, "")  # not a terminal, and no --password-stdin: no prompt to hang on
    assert run_cli("users", "add", "bob", "--role", "viewer") == 2
    assert "--password-stdin" in capsys.readouterr().err
    assert run_cli("users", "set-role", "ghost", "viewer") == 2
    assert "no portal user named 'ghost'" in capsys.readouterr().err
    assert audit.read(10) == []  # nothing changed, nothing recorded


@pytest.mark.unit
def test_portal_refuses_a_taken_port(loft_home, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_cli("portal", "--port", str(port)) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.integration
def test_a_real_portal_server_signs_in_with_a_cookie(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    proc = start_loft("portal", "--port", str(port), home=home)
    try:
        assert wait_for_port(port, timeout=60), proc.stderr.read() if proc.poll() else "no port"
        # the first admin, made while the server runs: it reads accounts per request
        env = {**os.environ, "LOFT_HOME": str(home)}
        subprocess.run(
            [sys.executable, "-m", "loft.cli.main", "users", "add", "root", "--role", "admin",
             "--password-stdin"],
            input="a long admin password\n", text=True, env=env, check=True, capture_output=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        form = browser.open(f"{base}/login").read().decode()
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', form).group(1)
        body = urllib.parse.urlencode(
            {"name": "root", "password": "a long admin password", "csrf_token": csrf, "next": "/"}
        ).encode()
        cookies = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            cookies.open(f"{base}/login", data=body)
        assert redirect.value.code == 303 and redirect.value.headers["Location"] == "/"
        assert "HttpOnly" in redirect.value.headers["Set-Cookie"]
        assert any(c.name == "loft_session" for c in jar)
        home_page = browser.open(f"{base}/").read().decode()
        assert "signed in as <strong>root</strong>" in home_page
        me = json.loads(browser.open(f"{base}/api/me").read())
        assert (me["name"], me["role"], me["via"]) == ("root", "admin", "session")
        os.killpg(proc.pid, signal.SIGTERM)  # the server's whole process group, as Ctrl-C does
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        kill_tree(proc)
    assert f"http://127.0.0.1:{port}/" in out
    assert "no users yet" in err and "loft users add NAME --role admin" in err
    assert [e["action"] for e in reversed(audit.read(5, path=home / "audit/trail.jsonl"))] == [
        "user.add", "auth.login",
    ]  # fmt: skip


@pytest.mark.integration
def test_the_portal_imports_no_torch_or_mlflow():
    code = (
        "import sys, loft.portal.app, loft.cli.portal, loft.cli.users\n"
        "heavy = {'torch', 'mlflow', 'transformers', 'peft', 'datasets'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_every_template_and_static_file_is_package_data():
    """pyproject's package-data globs cover every file the portal serves or renders, so a wheel
    (not only this checkout) has them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["loft"]
    src = ROOT / "src" / "loft"
    files = [
        p.relative_to(src).as_posix()
        for folder in ("portal/templates", "portal/static")
        for p in (src / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert "portal/static/vendor/htmx.min.js" in files and "portal/templates/base.html" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/")
                                           for g in globs)]  # fmt: skip
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


@pytest.mark.unit
def test_the_listener_gives_connections_tcp_nodelay():
    """`loft portal` and `loft serve` listen on bind_listener's socket; asyncio sets TCP_NODELAY
    only on sockets whose proto is TCP. Without it, Nagle held each response on a kept-alive
    connection until the client's delayed ACK (~40 ms per request after the first)."""
    import asyncio
    import socket

    from loft.cli.serve import bind_listener

    sock = bind_listener("127.0.0.1", 0, what="port", fix="-")
    seen: list[int] = []

    async def main() -> None:
        def handle(reader, writer):  # type: ignore[no-untyped-def]
            raw = writer.get_extra_info("socket")
            seen.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
