"""``loft worker``: claim jobs, run each in its own process group with its log, keep the lease.

The loop: claim the next job that fits this worker (a lease of ``lease_s`` seconds and a new
fence), start its command in a new session with stdout and stderr appended to
``LOFT_HOME/jobs/ID/log.txt``, and renew the lease every third of it while the job runs, recording
its progress. Then:

- exit 0: SUCCEEDED, with the job's result (run dir, registered version);
- exit 2 or 3 (bad input, a refused gate): FAILED, not retried (the same input fails again);
- any other exit (a crash, a kill, an interrupted run): requeued while attempts remain, and the
  next attempt resumes from the job's last checkpoint; FAILED when they are spent;
- the user cancelled it (``loft jobs cancel``): the job gets SIGINT (a run checkpoints), then
  CANCELLED;
- this worker is asked to stop (SIGTERM, Ctrl-C): the job gets SIGTERM (a run checkpoints and
  exits), and is requeued for another worker;
- this worker lost the lease (the heartbeat's fence no longer matches: it was presumed dead and
  another worker took the job): it kills its copy of the job and writes nothing.

A worker that dies outright (SIGKILL, power loss) stops renewing; once the lease expires another
worker claims the job and resumes it. The job's processes die with their worker (the kernel's
parent-death signal), so two copies never train into one run directory.

A job that SUCCEEDED and is a pipeline's stage queues the next stage in the same transaction as
its finish (jobs/pipelines.py). Every worker is also the scheduler: about once a second (while a
job runs: at each heartbeat) it fires the schedules that are due (``schedules.fire_due``, exactly
once per tick however many workers run).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, LoftError
from loft.core.procs import ram_bytes, start_ticks
from loft.jobs import kinds, pipelines, ray_executor, schedules
from loft.jobs.store import Job, JobStore, job_dir

NO_RETRY = (2, 3)  # bad input, refused gate: exit codes that fail the same way every time
SCHEDULER_EVERY_S = 1.0  # how often an idle worker looks for due schedules
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def gpu_capacity(gpus: list[str]) -> int:
    """The smallest of these GPUs' memory, from nvidia-smi (a job's estimate is per GPU)."""

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        raise ConfigError(
            f"--gpus {','.join(gpus)}: nvidia-smi cannot tell these GPUs' memory here",
            hint="Pass --capacity-gb with the memory of one of them.",
        ) from None
    mib = {i.strip(): int(m) for i, m in (ln.split(",") for ln in out.strip().splitlines())}
    missing = [g for g in gpus if g not in mib]
    if missing:
        listed = ", ".join(mib)
        raise ConfigError(f"--gpus: no GPU {', '.join(missing)} (nvidia-smi lists {listed})")
    return min(mib[g] for g in gpus) << 20


class Worker:
    def __init__(
        self,
        store: JobStore | None = None,
        *,
        capacity: int | None = None,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        max_jobs: int | None = None,
        until_idle: bool = False,
        gpus: list[str] | None = None,
        executor: str | None = None,
        ray_address: str | None = None,
        scheduler: bool = True,
        say: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.store = store or JobStore()
        if executor is None:  # the deployment's choice: LOFT_EXECUTOR or executor.kind
            from loft.core.settings import setting

            executor = str(setting("LOFT_EXECUTOR", "executor.kind") or "local")
        if executor not in ("local", "ray"):
            raise ConfigError(f"--executor {executor!r}: local or ray")
        self.ray = ray_executor.client(ray_address) if executor == "ray" else None
        if capacity is None:  # on Ray, the cluster places the job: this worker only submits it
            capacity = (
                1 << 60 if self.ray is not None
                else gpu_capacity(list(gpus)) if gpus else ram_bytes()
            )  # fmt: skip
        self.capacity = capacity
        self.lease_s, self.poll_s = lease_s, poll_s
        self.max_jobs, self.until_idle = max_jobs, until_idle
        self.say = say
        self.gpus = list(gpus or [])  # the devices this worker's jobs see (CUDA_VISIBLE_DEVICES)
        pid = os.getpid()
        self.id = f"{socket.gethostname()}:{pid}:{start_ticks(pid) or 0}"
        self.stopping = False
        self.ran = 0
        self.scheduler = scheduler
        self._scheduled_at = 0.0
        self._scheduler_error: str | None = None
        self._unfired: set[str] = set()  # "schedule: why" already said (said again once it fires)

    # ---------------------------------------------------------------- the loop

    def run(self) -> int:
        """Work until stopped (or ``max_jobs`` ran, or idle with ``until_idle``); jobs run."""
        old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        self.store.register_worker(self.id, socket.gethostname(), os.getpid(), self.capacity,
                                   self.gpus)  # fmt: skip
        room = "on Ray" if self.ray is not None else f"{self.capacity / 2**30:.1f} GiB"
        self.say(
            f"worker {self.id}: {room}, lease {self.lease_s:g} s"
            + (f", GPUs {','.join(self.gpus)}" if self.gpus else "")
        )
        last_seen = 0.0
        try:
            while not self.stopping and (self.max_jobs is None or self.ran < self.max_jobs):
                self.fire_schedules()
                job = self.store.claim(self.id, capacity=self.capacity, lease_s=self.lease_s)
                if job is None:
                    if self.until_idle:
                        break
                    if time.time() - last_seen > 30:
                        self.store.worker_seen(self.id)
                        last_seen = time.time()
                    time.sleep(self.poll_s)
                    continue
                self.run_job(job)
                self.ran += 1
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.store.worker_seen(self.id, stopped=True)
        return self.ran

    def fire_schedules(self) -> None:
        """Fire the due schedules (at most once per SCHEDULER_EVERY_S). A failure is reported,
        once until it changes, and never stops the worker: its jobs still run."""
        now = time.time()
        if not self.scheduler or now - self._scheduled_at < SCHEDULER_EVERY_S:
            return
        self._scheduled_at = now
        try:
            fired = schedules.fire_due(self.store, now)
        except Exception as e:  # the database away a moment, a schedule this loft cannot read
            why = e.message if isinstance(e, LoftError) else f"{type(e).__name__}: {e}"
            if why != self._scheduler_error:
                self.say(f"worker {self.id}: scheduler: {why}")
            self._scheduler_error = why
            return
        self._scheduler_error = None
        for f in fired:
            if f.error:
                said = f"{f.schedule}: {f.error}"
                if said not in self._unfired:
                    self.say(f"schedule {f.schedule}: not fired here: {f.error}")
                self._unfired.add(said)
            else:
                self._unfired = {u for u in self._unfired if not u.startswith(f"{f.schedule}: ")}
                self.say(f"schedule {f.schedule}: tick {schedules.iso(f.tick)}: queued {f.kind} "
                         f"job {f.job}")  # fmt: skip

    def _stop(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        self.say(f"worker {self.id}: {signal.Signals(signum).name}; stopping after handing back")

    # ---------------------------------------------------------------- one job

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; returns what happened to it."""
        d = job_dir(job.id)
        d.mkdir(parents=True, exist_ok=True)
        resume = job.attempts > 1
        cmd = [sys.executable, "-m", "loft.cli.main", *kinds.argv(job.kind, job.spec, d, resume)]
        log_path = d / "log.txt"
        cwd = job.spec.get("cwd")  # a pipeline stage runs beside its pipeline file
        if cwd and not Path(cwd).is_dir():
            why = f"its folder {cwd} (the pipeline file's) is not on this worker's machine"
            self.store.finish(job.id, job.fence, "FAILED", error=why)
            self.say(f"job {job.id}: failed: {why}")
            return "failed"
        env = {**os.environ, "LOFT_JOB_ID": job.id, "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        with open(log_path, "ab") as log:
            devices = f" (CUDA_VISIBLE_DEVICES={','.join(self.gpus)})" if self.gpus else ""
            where = " on Ray" if self.ray is not None else ""
            log.write(
                f"=== attempt {job.attempts} of job {job.id} on worker {self.id}{where} at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}{devices}: loft "
                f"{' '.join(cmd[3:])}\n".encode()
            )
            log.flush()
            if self.ray is not None:
                run: Any = ray_executor.RayRun(self.ray, job, cmd, log_path, len(self.gpus),
                                               cwd=cwd)  # fmt: skip
                what = f"Ray job {run.id}"
            else:
                run = _Local(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=_die_with_parent, cwd=cwd,
                ))  # fmt: skip
                what = f"pid {run.proc.pid}"
        self.say(f"job {job.id} ({job.kind}, attempt {job.attempts}): {what}")
        outcome = self._watch(job, run, log_path)
        self.say(f"job {job.id}: {outcome}")
        return outcome

    def _watch(self, job: Job, run: Any, log_path: Path) -> str:
        beat = max(0.05, self.lease_s / 3)
        signalled: str | None = None
        while True:
            try:
                rc = run.wait(timeout=beat)
                break
            except subprocess.TimeoutExpired:
                pass
            progress = {**(kinds.progress(job.kind, _tail(log_path)) or {}), **run.progress()}
            progress = progress or None  # nothing new: the row keeps what it had
            ours, cancel = self.store.heartbeat(job.id, job.fence, self.lease_s, progress)
            self.fire_schedules()
            if not ours:  # presumed dead and taken over: our copy must not run on
                run.send(signal.SIGKILL)
                run.wait(timeout=600)
                return "lost its lease to another worker; killed this copy"
            if cancel and signalled is None:
                signalled = "cancel"
                run.send(signal.SIGINT)
            elif self.stopping and signalled is None:
                signalled = "stop"
                run.send(signal.SIGTERM)
        if signalled == "cancel":
            self.store.finish(job.id, job.fence, "CANCELLED", result=kinds.result(job.kind,
                              job_dir(job.id)), error="cancelled by the user")  # fmt: skip
            return "cancelled"
        if rc == 0:
            result = kinds.result(job.kind, job_dir(job.id))
            then, stopped = pipelines.follow_up(job, result)
            if stopped:
                result["pipeline_stopped"] = stopped
            if not self.store.finish(job.id, job.fence, "SUCCEEDED", result=result, then=then):
                return "succeeded, but another worker holds the job now: its row is theirs"
            if then is not None:
                return f"succeeded; queued the pipeline's next stage ({then.kind})"
            return f"succeeded; the pipeline stops: {stopped}" if stopped else "succeeded"
        if signalled == "stop" or self.stopping:
            self.store.requeue(job.id, job.fence, f"worker {self.id} stopped (exit {rc})")
            return f"handed back to the queue (exit {rc})"
        why = _last_error(log_path) or f"exit {rc}"
        if rc in NO_RETRY or job.attempts >= job.max_attempts:
            self.store.finish(job.id, job.fence, "FAILED", error=f"exit {rc}: {why}")
            return f"failed (exit {rc}{', not retried: bad input' if rc in NO_RETRY else ''})"
        self.store.requeue(job.id, job.fence, f"exit {rc}: {why}; retrying")
        return f"requeued after exit {rc} (attempt {job.attempts} of {job.max_attempts})"


class _Local:
    """A job's own process (group) on this machine."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the job's own process group: it and what it started

    def progress(self) -> dict[str, Any]:
        return {}  # what the job prints is all there is (RayRun adds the cluster's status)


def _tail(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_error(path: Path) -> str:
    lines = [ln.strip() for ln in _tail(path).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("error:", "internal error:")):
            return ln[:500]
    return lines[-1][:500] if lines else ""


__all__ = ["Worker", "gpu_capacity"]
