"""Job-queue throughput and lease-expiry-to-resume latency, on SQLite and on PostgreSQL.

    .venv/bin/python bench/jobs.py [--jobs 2000] [--workers 8] [--e2e 100] [--json]

For each store (SQLite under a temporary LOFT_HOME; PostgreSQL 15 from Debian's packages, a fresh
cluster in a temp dir as the tests start it, skipped where it is not installed):

- queue: ``--jobs`` jobs submitted, then ``--workers`` processes each claiming (lease, fence) and
  finishing (fenced write) jobs until none is left: claimed-and-finished jobs per second, the
  queue's own cost;
- end to end: ``--e2e`` ``data-validate`` jobs run by ``--workers`` real ``loft worker``
  processes, each job its own ``loft data validate`` process: jobs per second including that;
- resume latency: a job claimed with a 1 s lease by a worker that then stops renewing it (dies);
  a second worker polling every 0.1 s claims it: the time from the lease's expiry to that claim,
  median of 5.

Every job is checked to have run exactly once (one claim, SUCCEEDED). Times depend on the machine
and its load: quote idle runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _drain(url: str, lease_s: float, out: mp.Queue, go) -> None:
    from loft.jobs import JobStore

    store, n = JobStore(url), 0
    store.list(limit=1)  # connected and imported before the clock starts
    wid = f"bench-{os.getpid()}"
    out.put("ready")
    go.wait()
    while (job := store.claim(wid, capacity=1 << 40, lease_s=lease_s)) is not None:
        assert store.finish(job.id, job.fence, "SUCCEEDED")
        n += 1
    out.put(n)


def queue_throughput(url: str, jobs: int, workers: int) -> dict:
    from loft.jobs import JobStore

    store = JobStore(url)
    for i in range(jobs):
        store.submit("data-validate", {"args": [f"f{i}"]}, owner=f"u{i % 4}")
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_drain, args=(url, 60.0, out, go)) for _ in range(workers)]
    for p in procs:
        p.start()
    assert [out.get(timeout=120) for _ in procs] == ["ready"] * workers
    t0 = time.perf_counter()
    go.set()
    counts = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    rows = store.list(limit=jobs + 10)
    assert sum(counts) == jobs and all(j.status == "SUCCEEDED" and j.attempts == 1 for j in rows)
    return {"jobs": jobs, "seconds": round(wall, 2), "jobs_per_s": round(jobs / wall, 1),
            "per_worker": counts}  # fmt: skip


def end_to_end(url: str, jobs: int, workers: int, work: Path) -> dict:
    from loft.jobs import JobStore

    store = JobStore(url)
    data = work / "tiny.jsonl"
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data.write_text(json.dumps({"messages": turns}) + "\n")
    for _ in range(jobs):
        store.submit("data-validate", {"args": [str(data)]}, owner="bench")
    env = {**os.environ, "LOFT_JOBS_URL": url}
    cmd = [sys.executable, "-m", "loft.cli.main", "worker", "--until-idle", "--poll", "0.05"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL) for _ in range(workers)]
    for p in procs:
        p.wait(timeout=1800)
    wall = time.perf_counter() - t0
    rows = store.list(status="SUCCEEDED", limit=jobs + 10)
    assert len(rows) == jobs and all(j.attempts == 1 for j in rows)
    return {"jobs": jobs, "seconds": round(wall, 2), "jobs_per_s": round(jobs / wall, 2)}


def _poll_claim(url: str, out: mp.Queue) -> None:
    from loft.jobs import JobStore

    store = JobStore(url)
    while (job := store.claim("rescuer", capacity=1 << 40, lease_s=60)) is None:
        time.sleep(0.1)
    out.put((time.time(), job.id))


def resume_latency(url: str, tries: int = 5) -> dict:
    from loft.jobs import JobStore

    store = JobStore(url)
    ctx = mp.get_context("spawn")
    waits = []
    for _ in range(tries):
        job = store.submit("data-validate", {"args": ["x"]}, owner="bench")
        store.claim("doomed", capacity=1 << 40, lease_s=1.0)  # then never renewed: it "died"
        expires = store.get(job.id).lease_until
        out: mp.Queue = ctx.Queue()
        p = ctx.Process(target=_poll_claim, args=(url, out))
        p.start()
        claimed_at, claimed = out.get(timeout=60)
        p.join()
        assert claimed == job.id
        waits.append(claimed_at - expires)
        again = store.get(job.id)
        store.finish(job.id, again.fence, "SUCCEEDED")
    return {"median_s": round(statistics.median(waits), 3), "max_s": round(max(waits), 3),
            "lease_s": 1.0, "poll_s": 0.1}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--e2e", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="Print only the result JSON.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loft-bench-jobs-"))
    os.environ["LOFT_HOME"] = str(work / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    stores: dict[str, str] = {}
    pg = None
    try:
        from pg_server import PgServer

        pg = PgServer()
    except Exception as e:  # not installed here: SQLite only, and say so
        print(f"PostgreSQL not measured: {e}", file=sys.stderr)
    result: dict = {"workers": args.workers}
    try:
        for name in ("sqlite", "postgresql"):
            if name == "postgresql" and pg is None:
                continue
            for part in ("queue", "e2e", "resume"):
                url = (
                    str(work / f"{name}-{part}.db")
                    if name == "sqlite"
                    else pg.new_database(f"bench_{part}")  # type: ignore[union-attr]
                )
                stores[f"{name}/{part}"] = url
            result[name] = {
                "queue": queue_throughput(stores[f"{name}/queue"], args.jobs, args.workers),
                "end_to_end": end_to_end(stores[f"{name}/e2e"], args.e2e, args.workers, work),
                "resume_latency": resume_latency(stores[f"{name}/resume"]),
            }
    finally:
        if pg is not None:
            pg.stop()
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{'store':11} {'queue jobs/s':>13} {'end-to-end jobs/s':>18} {'lease expiry -> claim':>22}"
    )
    for name in ("sqlite", "postgresql"):
        if name in result:
            q, e, lat = (result[name][k] for k in ("queue", "end_to_end", "resume_latency"))
            print(
                f"{name:11} {q['jobs_per_s']:>13,.0f} {e['jobs_per_s']:>18.2f}"
                f" {lat['median_s']:>19.3f} s"
            )
    print(
        f"({args.workers} workers; queue: {args.jobs} claim+finish each; end to end: {args.e2e} "
        "`loft data validate` jobs by `loft worker` processes; latency: 1 s lease, 0.1 s poll)"
    )
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
