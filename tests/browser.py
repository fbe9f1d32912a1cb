"""Real-browser tests of the portal: a `loft portal` process started by the test, driven by
Debian's Chromium through Playwright (Playwright's own browser download does not work here).

Plain helpers; the fixtures that use them (``portal``, ``browser``, ``page``) live in conftest.py.
Screenshots go to ``build/screenshots/<name>.png`` (LOFT_SCREENSHOTS overrides the folder);
docs/screenshots/ holds the copies the README shows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from helpers import free_port, start_loft

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery staple"
SCREENSHOTS = Path(
    os.environ.get("LOFT_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build/screenshots")
)


class Portal:
    """`loft portal` on a free loopback port over ``home`` (its LOFT_HOME), in its own process
    group; ``stop()`` ends exactly that group."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "portal.log"
        with self.log.open("w") as out:
            self.proc = start_loft(
                "portal", "--port", str(self.port), home=home, env=env,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loft portal exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/login", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"loft portal did not answer in 60 s: {self.log.read_text()[-2000:]}")

    def add_user(self, name: str, role: str, password: str = PASSWORD) -> None:
        """An account, made as an operator makes one (`loft users add --password-stdin`)."""
        from helpers import loft_argv

        env = {**os.environ, "LOFT_HOME": str(self.home), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            loft_argv("users", "add", name, "--role", role, "--password-stdin"),
            input=password + "\n", capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def launch(playwright):  # type: ignore[no-untyped-def]
    """Debian's Chromium, headless, with no network beyond what the page asks for."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"],
    )  # fmt: skip


def sign_in(page, portal: Portal, name: str, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    """Sign in through the form, as a person does; lands on the home page."""
    page.goto(portal.url + "/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(portal.url + "/")


def sign_out(page) -> None:  # type: ignore[no-untyped-def]
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/login**")


def api(page, method: str, path: str, **kwargs):  # type: ignore[no-untyped-def]
    """Call the portal's JSON API from the page's session, as its own JavaScript does: the
    session cookie plus the page's ``<meta name="csrf-token">`` in X-CSRF-Token."""
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    headers = {"X-CSRF-Token": token or "", **kwargs.pop("headers", {})}
    return page.request.fetch(_origin(page) + path, method=method, headers=headers, **kwargs)


def _origin(page) -> str:  # type: ignore[no-untyped-def]
    scheme, _, host = page.url.split("/", 3)[:3]
    return f"{scheme}//{host}"


def shot(page, name: str) -> Path:  # type: ignore[no-untyped-def]
    """A full-page screenshot as a test artifact: ``SCREENSHOTS/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
