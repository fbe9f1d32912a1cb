"""A real local Ray head for tests: `ray start --head --block` on loopback with small memory, in
its own process group (every Ray daemon it starts stays in that group), stopped by that group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from helpers import free_port


class RayHead:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        self.dashboard = free_port()
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard),
             "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
             "--object-store-memory", "80000000", "--include-dashboard", "true",
             "--disable-usage-stats", "--temp-dir", self.temp,
             # every fixed default port free too, so another Ray on this machine cannot collide
             "--dashboard-agent-listen-port", str(free_port()),
             "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()),
             "--ray-client-server-port", str(free_port()),
             "--metrics-export-port", str(free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.address = f"http://127.0.0.1:{self.dashboard}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the Ray head did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # its daemons got it too; the
                self.proc.wait(timeout=8)  # head's own cleanup then waits ~30 s on them
        # the daemons share the group; whatever outlived `ray start` goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
