"""Jobs run on a Ray cluster through Ray's Jobs API (``loft worker --executor ray``).

The worker still claims the job from loft's queue and keeps its lease; instead of starting the
command itself it submits it to the cluster as a Ray job (``submission_id``
``loft-<job>-<attempt>``, the same command line, loft's and MLflow's settings in the runtime
environment, ``entrypoint_num_gpus`` for GPU jobs), mirrors the Ray job's output into the job's
log and its status into the row's progress, and propagates a cancel (``stop_job``). Ray itself
"runs once" (ray #41241): the retry, the resume from checkpoint and the fencing stay loft's. Before
a later attempt is submitted, every earlier attempt still alive on the cluster is stopped, so a
worker that died while its Ray job ran never leaves two copies training into one run directory.

jobs/ imports no torch; ray is imported only here, when this executor is used.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError
from loft.core.settings import forwarded_env, submit_ray_job


def client(address: str | None, *, needed_by: str = "--executor ray") -> Any:
    """Ray's job client for ``address`` (else LOFT_RAY_ADDRESS / settings ``ray.address``), a
    dashboard URL; ConfigError, naming the option ``needed_by``, when there is none or it does
    not answer."""
    from loft.core.settings import setting

    address = address or setting("LOFT_RAY_ADDRESS", "ray.address")
    if not address:
        raise ConfigError(
            f"{needed_by} needs the cluster's dashboard address",
            hint="Pass --ray-address http://HEAD:8265 (or set LOFT_RAY_ADDRESS / ray.address).",
        )
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ConfigError(
            f"{needed_by} needs Ray's job client", hint="pip install 'loft[ray]'."
        ) from None
    try:
        return JobSubmissionClient(str(address))
    except Exception as e:  # unreachable, not a Ray dashboard
        raise ConfigError(
            f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}",
            hint="Check that the head runs (`ray start --head`) and its dashboard port.",
        ) from None


def submission_id(job_id: str, attempt: int) -> str:
    return f"loft-{job_id}-{attempt}"


class RayRun:
    """One attempt of a job as a Ray job, with the subset of ``subprocess.Popen`` the worker
    uses: ``wait(timeout)`` (the exit code, or TimeoutExpired) and ``send(signal)``."""

    def __init__(self, ray: Any, job: Any, cmd: list[str], log_path: Path, gpus: int,
                 cwd: str | None = None) -> None:  # fmt: skip
        self.ray, self.log_path = ray, log_path
        self.id = submission_id(job.id, job.attempts)
        self._stop_earlier(job)
        env = forwarded_env()
        env.update(LOFT_JOB_ID=job.id, PYTHONUNBUFFERED="1")
        submit_ray_job(
            ray,
            self.id,
            entrypoint=(f"cd {shlex.quote(cwd)} && " if cwd else "") + shlex.join(cmd),
            runtime_env={"env_vars": env},
            metadata={"loft_job": job.id, "owner": job.owner, "kind": job.kind},
            entrypoint_num_gpus=gpus or None,
        )
        self.status = "PENDING"
        self._logged = 0

    def _stop_earlier(self, job: Any) -> None:
        for attempt in range(1, job.attempts):
            sid = submission_id(job.id, attempt)
            try:
                info = self.ray.get_job_info(sid)
            except Exception:
                continue  # never submitted (it ran on a local worker), or already gone
            if not info.status.is_terminal():
                self.ray.stop_job(sid)
                self._until_terminal(sid, 120)

    def _until_terminal(self, sid: str, timeout: float) -> Any:
        deadline = time.time() + timeout
        while True:
            info = self.ray.get_job_info(sid)
            if info.status.is_terminal() or time.time() > deadline:
                return info
            time.sleep(0.5)

    def _pump_logs(self) -> None:
        logs = self.ray.get_job_logs(self.id)
        if len(logs) > self._logged:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(logs[self._logged :])
            self._logged = len(logs)

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while True:
            info = self.ray.get_job_info(self.id)
            self.status = info.status.value
            self._pump_logs()
            if info.status.is_terminal():
                if self.status == "SUCCEEDED":
                    return 0
                if self.status == "STOPPED":
                    return 130
                return int(info.driver_exit_code or 1)
            if time.time() >= deadline:
                raise subprocess.TimeoutExpired(self.id, timeout)
            time.sleep(min(0.5, max(0.0, deadline - time.time())))

    def send(self, sig: int) -> None:
        """Any stop signal becomes Ray's ``stop_job`` (SIGTERM, then SIGKILL after its grace)."""
        if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self.ray.stop_job(self.id)
            if sig == signal.SIGKILL:
                self._until_terminal(self.id, 60)

    def progress(self) -> dict[str, Any]:
        return {"ray_submission_id": self.id, "ray_status": self.status}


__all__ = ["RayRun", "client", "submission_id"]
