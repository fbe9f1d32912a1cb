"""The portal's latency with a team's worth of state: p50/p95 of every list page and API route.

    .venv/bin/python bench/portal.py [--jobs 10000] [--versions 1000] [--records 100000]
                                     [--requests 30] [--home DIR]

It seeds a LOFT_HOME through loft's own API (nothing written behind its back): 10,000 jobs in
the queue (the portal's job list is where runs are followed; 1 in 10 claimed and finished),
1,000 registered versions of one model (a tiny random-weight LoRA adapter, through
``loft.registry.store.register``), a 100,000-record chat dataset (``loft.data.catalog``, its
report computed before timing) and a labelling project over it with two annotators. Seeding
takes several minutes; ``--home DIR`` keeps the seeded home and reuses it on the next run.

Then it starts a real ``loft portal`` process and times each route over HTTP at its first,
middle and last page, signed in as an admin (pages: the session cookie; API: a personal API
token), ``--requests`` times each after one warm-up. Target (issue 19): p95 < 300 ms for every
list, which paginate. Printed, never asserted: machines are noisy; the tests check behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-adapter helper the registry tests use

ADMIN, PASSWORD = "bench-admin", "correct horse battery staple"
TARGET_MS = 300.0
DATASET, MODEL, PROJECT = "bench-chat", "bench-model", "bench-labels"


def _loft(*args: str, home: Path, stdin: str | None = None) -> str:
    env = {**os.environ, "LOFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "loft.cli.main", *args], input=stdin, capture_output=True,
        text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"loft {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _say(msg: str) -> None:
    print(msg, flush=True)


def seed_dataset(records: int, work: Path) -> str:
    from loft.data import catalog

    if _exists(DATASET):
        return catalog.get_version(DATASET).ref
    path = work / "chats.jsonl"
    with path.open("w") as f:
        for i in range(records):
            q = f"Ticket {i}: my order {i * 7919 % 100_003} has not arrived after {i % 30} days."
            a = f"Sorry about order {i * 7919 % 100_003}. I have opened case {i} and escalated it."
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": turns}) + "\n")
    t0 = time.perf_counter()
    v = catalog.add_version(DATASET, file=path, source={"kind": "upload"}, created_by=ADMIN)
    _say(f"  dataset {v.ref}: {v.records} records added in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    catalog.report(v.ref)
    _say(f"  its report computed in {time.perf_counter() - t0:.1f} s (before timing, not during)")
    return v.ref


def _exists(name: str) -> bool:
    from loft.core.errors import NotFoundError
    from loft.data import catalog

    try:
        catalog.get_version(name)
    except NotFoundError:
        return False
    return True


def seed_project(dataset: str) -> None:
    from loft.core.errors import NotFoundError
    from loft.curate.store import LabellingStore

    store = LabellingStore()
    try:
        store.get_project(PROJECT)
        return
    except NotFoundError:
        pass
    t0 = time.perf_counter()
    store.create_project(
        PROJECT, dataset, [{"name": "quality", "kind": "rating", "scale": 5}],
        ["ann-a", "ann-b"], overlap=2, guidelines="Rate the answer.", actor=ADMIN,
    )  # fmt: skip
    _say(f"  labelling project over {dataset} in {time.perf_counter() - t0:.1f} s")


def seed_jobs(n: int) -> None:
    from loft.jobs.store import JobStore, NewJob

    store = JobStore()
    have = len(store.list(limit=n))
    if have >= n:
        return
    t0 = time.perf_counter()
    first_ms = int(time.time() * 1000) - n  # one submission per millisecond, like a history
    with store.transaction() as c:
        for i in range(have, n):
            spec = {"config": f"configs/run-{i}.yaml", "set": [f"training.lr={1e-4 * (1 + i % 9)}"]}
            job_id = f"j{first_ms + i:011x}{secrets.token_hex(2)}"  # new_id()'s shape
            store.insert(c, NewJob(kind="train", spec=spec, owner=f"user-{i % 7}", id=job_id))
    for _ in range(n // 10):  # some history: claimed and finished, as workers leave them
        job = store.claim("bench-worker", capacity=1, lease_s=60)
        if job is None:
            break
        store.finish(job.id, job.fence, "SUCCEEDED", result={"loss": 1.0})
    _say(f"  {n - have} jobs queued, {n // 10} finished, in {time.perf_counter() - t0:.1f} s")


def seed_versions(n: int, work: Path) -> None:
    from helpers import make_lora_adapter
    from loft.models.tiny import make_tiny_model
    from loft.registry import store

    have = {m["name"]: m for m in store.list_models()}.get(MODEL, {}).get("latest") or 0
    if have >= n:
        return
    base = make_tiny_model(work / "tiny-base", seed=0)
    adapter = make_lora_adapter(work / "adapter", base, seed=1)
    t0 = time.perf_counter()
    for i in range(have, n):
        store.register(adapter, name=MODEL, metrics={"eval_loss": 2.0 - i / (2 * n)})
        if (i + 1) % 100 == 0:
            rate = (i + 1 - have) / (time.perf_counter() - t0)
            _say(f"  {i + 1}/{n} versions registered ({rate:.1f}/s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortalProcess:
    def __init__(self, home: Path) -> None:
        self.url = f"http://127.0.0.1:{(port := _free_port())}"
        env = {**os.environ, "LOFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        self.log = (home / "bench-portal.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loft.cli.main", "portal", "--port", str(port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit("loft portal did not start; see " + self.log.name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def signed_in(url: str) -> tuple[httpx.Client, httpx.Client]:
    """(a browser-like client with a session cookie, an API client with a bearer token)."""
    pages = httpx.Client(base_url=url, timeout=30)
    form = pages.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf, "no sign-in CSRF token on /login"
    r = pages.post("/login", data={"name": ADMIN, "password": PASSWORD, "next": "/",
                                   "csrf_token": csrf.group(1)})  # fmt: skip
    assert r.status_code in (200, 303), r.text[:300]
    meta = re.search(r'<meta name="csrf-token" content="([^"]+)"', pages.get("/").text)
    assert meta
    token = pages.post("/api/tokens", json={"name": f"bench-{time.time_ns()}"},
                       headers={"X-CSRF-Token": meta.group(1)}).json()  # fmt: skip
    api = httpx.Client(base_url=url, timeout=30,
                       headers={"Authorization": f"Bearer {token['token']}"})  # fmt: skip
    return pages, api


def time_route(client: httpx.Client, path: str, requests: int) -> tuple[float, float, int]:
    r = client.get(path)  # warm-up, and the status to report
    status = r.status_code
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - t0) * 1e3)
        status = r.status_code if r.status_code != 200 else status
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return statistics.median(times), p95, status


def routes(args: argparse.Namespace, dataset: str) -> list[tuple[str, str, bool]]:
    """(kind, path, is a list) at the first, middle and last page of each big list."""
    name, ver = dataset.split(":")
    last_rec, mid_rec = args.records - 50, args.records // 2
    last_job, mid_job = args.jobs - 50, args.jobs // 2
    last_ver, mid_ver = max(0, args.versions - 50), args.versions // 2
    out = []
    for off in (0, mid_job, last_job):
        out += [("page", f"/jobs?offset={off}", True), ("api", f"/api/jobs?offset={off}", True)]
    for off in (0, mid_ver, last_ver):
        out += [("page", f"/registry/{MODEL}?offset={off}", True),
                ("api", f"/api/registry/{MODEL}?offset={off}", True)]  # fmt: skip
    for off in (0, mid_rec, last_rec):
        out += [("page", f"/datasets/{name}/{ver}?offset={off}", True),
                ("api", f"/api/datasets/{name}/{ver}/records?offset={off}", True)]  # fmt: skip
    out += [
        ("page", "/datasets", True), ("api", "/api/datasets", True),
        ("page", f"/datasets/{name}", True), ("api", f"/api/datasets/{name}/{ver}/report", False),
        ("page", "/registry", True), ("api", "/api/registry", True),
        ("page", "/labelling", True), ("api", "/api/labelling/projects", True),
        ("page", f"/labelling/{PROJECT}", False),
        ("page", "/audit", True), ("api", "/api/audit", True),
        ("page", "/serving", False), ("page", "/", False),
    ]  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--versions", type=int, default=1_000)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=30, help="timed requests per route")
    ap.add_argument("--home", type=Path, help="keep the seeded LOFT_HOME here and reuse it")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loft-bench-portal-"))
    home = args.home or work / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["LOFT_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    _say(f"LOFT_HOME {home}; seeding (reused where already there)")
    t0 = time.perf_counter()
    dataset = seed_dataset(args.records, work)
    seed_project(dataset)
    seed_jobs(args.jobs)
    seed_versions(args.versions, work)
    _say(f"seeded in {time.perf_counter() - t0:.0f} s")
    if "bench-admin" not in _loft("users", "list", home=home):
        _loft("users", "add", ADMIN, "--role", "admin", "--password-stdin", home=home,
              stdin=PASSWORD + "\n")  # fmt: skip

    portal = PortalProcess(home)
    try:
        pages, api = signed_in(portal.url)
        rows = []
        _say(f"\n{'route':<58} {'p50 ms':>8} {'p95 ms':>8}  status")
        for kind, path, is_list in routes(args, dataset):
            p50, p95, status = time_route(pages if kind == "page" else api, path, args.requests)
            rows.append((kind, path, is_list, p50, p95, status))
            flag = "  over target" if is_list and p95 >= TARGET_MS else ""
            _say(f"{kind + ' ' + path:<58} {p50:8.1f} {p95:8.1f}  {status}{flag}")
    finally:
        portal.stop()
    lists = [r for r in rows if r[2]]
    worst = max(lists, key=lambda r: r[4])
    bad = [r for r in rows if r[5] != 200]
    _say(f"\nlists: worst p95 {worst[4]:.0f} ms ({worst[0]} {worst[1]}); target p95 < "
         f"{TARGET_MS:.0f} ms: {'met' if worst[4] < TARGET_MS else 'NOT met'}")  # fmt: skip
    if bad:
        _say("routes that did not answer 200: " + ", ".join(f"{r[1]} ({r[5]})" for r in bad))
    _say(json.dumps({"state": {"jobs": args.jobs, "versions": args.versions,
                               "records": args.records},
                     "routes": [{"kind": k, "path": p, "list": li, "p50_ms": round(a, 1),
                                 "p95_ms": round(b, 1), "status": s}
                                for k, p, li, a, b, s in rows]}))  # fmt: skip


if __name__ == "__main__":
    main()
