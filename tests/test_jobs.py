"""The job queue (issue 16): rows claimed in priority / fair-share / age order with a lease and a
fencing token, workers that run each job in its own process group, requeue on SIGTERM, resume a
dead worker's job from its checkpoint, and refuse at submit what fits no worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def store(loft_home):
    from loft.jobs import JobStore

    return JobStore()


def claims_go_by_priority_then_fair_share_then_age(store):
    a1 = store.submit("data-validate", {"args": ["a1"]}, owner="ann")
    a2 = store.submit("data-validate", {"args": ["a2"]}, owner="ann")
    b1 = store.submit("data-validate", {"args": ["b1"]}, owner="bob")
    hi = store.submit("data-validate", {"args": ["hi"]}, owner="cy", priority=5)
    order = [store.claim(f"w{i}", capacity=1, lease_s=60).id for i in range(4)]
    # hi first (priority); then ann's oldest; then bob's, though ann's second is older: ann
    # already has a job running
    assert order == [hi.id, a1.id, b1.id, a2.id]
    assert store.claim("w9", capacity=1, lease_s=60) is None
    assert all(store.get(j).status == "RUNNING" and store.get(j).attempts == 1 for j in order)


def a_job_needing_more_memory_waits_for_a_worker_with_room(store):
    big = store.submit("train", {"config": "x"}, owner="ann", resources={"mem_bytes": 8 << 30})
    assert store.claim("small", capacity=4 << 30, lease_s=60) is None
    assert store.claim("large", capacity=16 << 30, lease_s=60).id == big.id


def a_worker_that_lost_its_lease_cannot_write_the_job(store):
    job = store.submit("data-validate", {"args": ["x"]}, owner="ann")
    first = store.claim("w1", capacity=1, lease_s=0.05)
    assert store.heartbeat(job.id, first.fence, 0.05)[0]
    time.sleep(0.2)  # w1 is presumed dead: its lease expired
    second = store.claim("w2", capacity=1, lease_s=60)
    assert second.id == job.id and second.fence == first.fence + 1 and second.attempts == 2
    assert second.history[-1]["after"] == "lease of w1 expired"
    assert store.heartbeat(job.id, first.fence, 60) == (False, False)  # fenced out
    assert not store.finish(job.id, first.fence, "FAILED", error="stale")
    assert not store.requeue(job.id, first.fence, "stale")
    assert store.get(job.id).status == "RUNNING" and store.get(job.id).worker == "w2"
    assert store.finish(job.id, second.fence, "SUCCEEDED", result={"ok": 1})
    done = store.get(job.id)
    assert (done.status, done.result, done.error) == ("SUCCEEDED", {"ok": 1}, None)


def cancel_and_retry(store):
    from loft.core.errors import ConfigError, NotFoundError

    queued = store.submit("data-validate", {"args": ["x"]}, owner="ann")
    assert store.cancel(queued.id[:12]).status == "CANCELLED"  # a unique prefix is enough
    assert store.claim("w", capacity=1, lease_s=60) is None
    again = store.retry(queued.id)
    assert again.status == "ADMITTED" and again.history[-1]["event"] == "retry"
    running = store.claim("w", capacity=1, lease_s=60)
    assert store.cancel(running.id).status == "RUNNING"  # its worker stops it
    assert store.heartbeat(running.id, running.fence, 60) == (True, True)
    assert store.finish(running.id, running.fence, "CANCELLED")
    with pytest.raises(ConfigError, match="only a FAILED or CANCELLED job"):
        store.retry(store.submit("eval", {"args": []}, owner="x").id)
    with pytest.raises(NotFoundError):
        store.get("nope")


SCENARIOS = [
    claims_go_by_priority_then_fair_share_then_age,
    a_job_needing_more_memory_waits_for_a_worker_with_room,
    a_worker_that_lost_its_lease_cannot_write_the_job,
    cancel_and_retry,
]


@pytest.mark.unit
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_the_queue_on_sqlite(scenario, store):
    scenario(store)


@pytest.mark.integration
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_the_queue_on_postgresql(scenario, pg_url, loft_home):
    from loft.jobs import JobStore

    store = JobStore(pg_url)
    assert store.pg
    scenario(store)


@pytest.mark.unit
def test_a_training_job_runs_as_loft_train_and_resumes_on_a_later_attempt(tmp_path):
    from loft.jobs import kinds

    spec = {"config": "/c.yaml", "set": ["training.lr=1e-4"]}
    first = kinds.argv("train", spec, tmp_path, resume=True)  # nothing to resume yet
    assert first == ["train", "/c.yaml", "--set", f"output_dir={tmp_path / 'run'}", "--set",
                     "training.lr=1e-4"]  # fmt: skip
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resolved.yaml").write_text("{}")
    assert kinds.argv("train", spec, tmp_path, resume=True)[-1] == "--resume"
    assert kinds.argv("data-validate", {"args": ["f.jsonl"]}, tmp_path, False) == [
        "data", "validate", "f.jsonl",
    ]  # fmt: skip
    log = "run x\nstep 4/10  loss 1.2345  1,234 tok/s  lr 1.00e-04  eta 12s\n"
    assert kinds.progress("train", log) == {
        "step": 4, "total": 10, "loss": 1.2345, "tokens_per_s": 1234.0, "eta_s": 12,
    }  # fmt: skip


# ------------------------------------------------------------------ real workers


def _workers(n: int, *args: str, env: dict | None = None) -> list[subprocess.Popen]:
    from helpers import start_loft

    return [
        start_loft("worker", *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(n)
    ]


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _many_jobs_each_once(tmp_path: Path, store, n_jobs: int, env: dict | None = None) -> None:
    """8 workers over ``n_jobs`` jobs: each run exactly once, none lost (the rows and each job's
    own output say so)."""
    from helpers import run_loft
    from loft.jobs import job_dir

    files, ids = {}, []
    for i in range(n_jobs):  # each job validates its own file, with its own record count
        f = tmp_path / f"d{i}.jsonl"
        n = i % 7 + 1
        turns = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
        f.write_text((json.dumps({"messages": turns}) + "\n") * n)
        if i == 0:  # one through the CLI, as a user submits
            r = run_loft("jobs", "submit", "--kind", "data-validate", "--", str(f), env=env)
            assert r.returncode == 0, r.stderr
            job_id = r.stdout.strip()
        else:
            job_id = store.submit("data-validate", {"args": [str(f)]}, owner=f"u{i % 3}").id
        ids.append(job_id)
        files[job_id] = n
    procs = _workers(8, "--until-idle", "--poll", "0.05", "--lease", "10", env=env)
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        _stop(procs)
    errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    ran = [int(e.rsplit("ran ", 1)[1].split()[0]) for e in errs]
    assert sum(ran) == n_jobs and sum(1 for n in ran if n) >= 2  # shared between workers
    jobs = {j.id: j for j in store.list(limit=1000)}
    assert sorted(jobs) == sorted(ids)  # none lost, none invented
    for job_id, n in files.items():
        job = jobs[job_id]
        assert (job.status, job.attempts) == ("SUCCEEDED", 1), job.to_dict()
        log = (job_dir(job_id) / "log.txt").read_text()
        assert log.count("=== attempt") == 1  # run exactly once
        assert f"OK: {n} record{'s' if n > 1 else ''}" in log, log
    assert len({j.worker for j in jobs.values()}) == sum(1 for n in ran if n)


@pytest.mark.integration
@pytest.mark.slow
def test_eight_workers_run_two_hundred_jobs_each_exactly_once(tmp_path, loft_home):
    from loft.jobs import JobStore

    _many_jobs_each_once(tmp_path, JobStore(), 200)


@pytest.mark.integration
@pytest.mark.slow
def test_eight_workers_share_a_postgresql_queue(tmp_path, loft_home, pg_url):
    from loft.jobs import JobStore

    _many_jobs_each_once(tmp_path, JobStore(pg_url), 60, env={"LOFT_JOBS_URL": pg_url})
    assert not (loft_home / "jobs.db").exists()  # the queue was on the server, not SQLite


def _train_config(tmp_path: Path, tiny_model: Path, steps: int) -> Path:
    from test_train import tiny_config

    cfg = tiny_config(tmp_path, tiny_model, max_steps=steps, save_every=2, eval_every=steps)
    cfg.pop("output_dir")
    cfg["register"] = False
    cfg["tracking"] = {"uri": "none"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait(cond, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.05)
    assert cond(), "timed out"


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_workers_job_is_finished_by_another_with_the_same_weights(
    tmp_path, tiny_model, loft_home
):
    from safetensors.torch import load_file

    from helpers import descendants, run_loft
    from loft.core.config import load_config
    from loft.jobs import JobStore, job_dir
    from loft.train import train

    config = _train_config(tmp_path, tiny_model, steps=40)
    ref = train(load_config(config, [f"output_dir={tmp_path / 'ref'}"]), progress=False)
    r = run_loft("jobs", "submit", str(config), "--priority", "5")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert "needs ~" in r.stderr and f"loft jobs logs {job_id} -f" in r.stderr
    run = job_dir(job_id) / "run"
    first = _workers(1, "--lease", "1", "--max-jobs", "1")
    children: list[int] = []
    try:
        _wait(lambda: len(list((run / "checkpoints").glob("step-*"))) >= 2)
        children = descendants(first[0].pid)
        assert children  # the job's own process, in its own session
        os.killpg(first[0].pid, signal.SIGKILL)  # the worker dies; its job dies with it
        first[0].wait()
        _wait(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 30)
        assert JobStore().get(job_id).status == "RUNNING"  # until its lease runs out
        second = _workers(1, "--lease", "1", "--until-idle", "--poll", "0.1")
        try:
            _wait(lambda: JobStore().get(job_id).status not in ("RUNNING", "ADMITTED"), 600)
        finally:
            _stop(second)
    finally:
        _stop(first)
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
    job = JobStore().get(job_id)
    assert (job.status, job.attempts) == ("SUCCEEDED", 2), job.to_dict()
    assert any("expired" in h.get("after", "") for h in job.history)
    assert job.result["status"] == "completed" and job.result["steps"] == 40
    sessions = json.loads((run / "run_summary.json").read_text())["sessions"]
    assert sessions[-1]["resumed_from"].startswith("step-")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(ref.run_dir / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-6
    log = (job_dir(job_id) / "log.txt").read_text()
    assert log.count("=== attempt") == 2 and "--resume" in log.split("=== attempt 2")[1]


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_hands_the_job_back_and_the_cli_verbs(tmp_path, tiny_model, loft_home):
    from helpers import run_loft
    from loft.jobs import JobStore, job_dir

    config = _train_config(tmp_path, tiny_model, steps=400)
    store = JobStore()
    job = store.submit("train", {"config": str(config), "set": []}, owner="ann")
    run = job_dir(job.id) / "run"
    worker = _workers(1, "--lease", "5")
    try:
        _wait(lambda: list((run / "checkpoints").glob("step-*")))
        _wait(lambda: (store.get(job.id).progress or {}).get("step"), 60)  # progress in the row
        os.killpg(worker[0].pid, signal.SIGTERM)
        worker[0].wait(timeout=120)
    finally:
        _stop(worker)
    back = store.get(job.id)
    assert back.status == "ADMITTED" and back.history[-1]["event"] == "requeued"
    assert json.loads((run / "run_summary.json").read_text())["status"] == "interrupted"
    listed = json.loads(run_loft("jobs", "list", "--json").stdout)
    assert [(j["id"], j["status"], j["attempts"]) for j in listed] == [(job.id, "ADMITTED", 1)]
    assert run_loft("jobs", "cancel", job.id).returncode == 0
    assert store.get(job.id).status == "CANCELLED"
    assert run_loft("jobs", "retry", job.id).returncode == 0
    shown = json.loads(run_loft("jobs", "show", job.id, "--json").stdout)
    assert shown["status"] == "ADMITTED" and shown["kind"] == "train"
    logs = run_loft("jobs", "logs", job.id)
    assert "=== attempt 1" in logs.stdout and "step " in logs.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_fails_without_retry_and_a_job_too_big_is_refused_at_submit(tmp_path, loft_home):
    from helpers import run_loft
    from loft.jobs import JobStore

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    r = run_loft("jobs", "submit", "--kind", "data-validate", "--", str(bad))
    job_id = r.stdout.strip()
    w = run_loft("worker", "--until-idle", "--poll", "0.05")
    assert w.returncode == 0, w.stderr
    job = JobStore().get(job_id)
    assert (job.status, job.attempts) == ("FAILED", 1)  # exit 2: the same input fails again
    assert job.error.startswith("exit 2")
    r = run_loft("jobs", "submit", "--kind", "eval", "--", "--nope")
    assert r.returncode == 2 and "No such option: --nope" in r.stderr
    tickets = Path(__file__).resolve().parents[1] / "examples" / "support_tickets" / "lora.yaml"
    r = run_loft(
        "jobs", "submit", str(tickets), "--set", "base_model=llama-3.1-70b", "--set", "method=full"
    )
    assert r.returncode == 2
    assert "this job needs an estimated" in r.stderr and "optimizer" in r.stderr
    assert len(JobStore().list()) == 1  # nothing queued for it


@pytest.mark.integration
def test_a_gpu_worker_hands_its_devices_to_each_job(tmp_path, loft_home):
    from helpers import run_loft
    from loft.jobs import JobStore, job_dir

    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": turns}) + "\n")
    job = JobStore().submit("data-validate", {"args": [str(data)]}, owner="ann")
    w = run_loft("worker", "--gpus", "1,3", "--capacity-gb", "80", "--until-idle")
    assert w.returncode == 0, w.stderr
    assert "GPUs 1,3" in w.stderr
    log = (job_dir(job.id) / "log.txt").read_text()
    assert "(CUDA_VISIBLE_DEVICES=1,3)" in log and "OK: 1 record" in log
    if not any(Path(p, "nvidia-smi").exists() for p in os.environ["PATH"].split(":")):
        r = run_loft("worker", "--gpus", "0", "--until-idle")  # its memory cannot be known
        assert r.returncode == 2 and "pass --capacity-gb" in r.stderr.lower()


@pytest.mark.integration
@pytest.mark.slow
def test_loft_up_runs_workers_server_and_portal_and_stops_them(tmp_path, tiny_model, loft_home):
    import urllib.request

    from helpers import descendants, free_port, start_loft
    from loft.jobs import JobStore

    port, portal = free_port(), free_port()
    proc = start_loft(
        "up", "--workers", "1", "--portal-port", str(portal), "--", "--no-auth",
        "--base-model", str(tiny_model), "--port", str(port), stdout=subprocess.DEVNULL,
    )  # fmt: skip
    children: list[int] = []
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(healthy, 300)
        with urllib.request.urlopen(f"http://127.0.0.1:{portal}/login", timeout=10) as r:
            assert r.status == 200 and b"csrf-token" in r.read()  # the portal, same LOFT_HOME
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps({"messages": turns}) + "\n")
        job = JobStore().submit("data-validate", {"args": [str(data)]}, owner="ann")
        _wait(lambda: JobStore().get(job.id).status == "SUCCEEDED", 120)
        children = descendants(proc.pid)
        assert len(children) >= 3  # the worker, the server and the portal
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    assert "loft up: worker 0 (pid" in err and "server (pid" in err and "portal (pid" in err
    assert not any(Path(f"/proc/{c}").exists() for c in children)  # both stopped with it
    assert not healthy()


@pytest.fixture(scope="module")
def ray_head():
    from ray_head import RayHead

    head = RayHead()
    yield head
    head.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_run_through_a_ray_head_with_logs_status_and_cancel(
    tmp_path, tiny_model, loft_home, ray_head
):
    from ray.job_submission import JobSubmissionClient

    from helpers import run_loft
    from loft.jobs import JobStore, job_dir

    store = JobStore()
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps({"messages": turns}) + "\n") * 3)
    quick = store.submit("data-validate", {"args": [str(data)]}, owner="ann")
    # the deployment's settings file chooses Ray, as a team configures it once per machine
    (loft_home / "settings.yaml").write_text(
        yaml.safe_dump({"executor": {"kind": "ray"}, "ray": {"address": ray_head.address}})
    )
    w = run_loft("worker", "--until-idle", "--lease", "3")
    assert w.returncode == 0, w.stderr
    done = store.get(quick.id)
    assert (done.status, done.attempts) == ("SUCCEEDED", 1), done.to_dict()
    assert done.progress["ray_submission_id"] == f"loft-{quick.id}-1"
    log = (job_dir(quick.id) / "log.txt").read_text()
    assert "on Ray at" in log and "OK: 3 records" in log  # the Ray job's output, mirrored
    ray = JobSubmissionClient(ray_head.address)
    assert ray.get_job_info(f"loft-{quick.id}-1").status.value == "SUCCEEDED"

    long = store.submit(
        "train", {"config": str(_train_config(tmp_path, tiny_model, steps=4000)), "set": []},
        owner="ann",
    )  # fmt: skip
    worker = _workers(1, "--lease", "3")
    try:
        _wait(lambda: store.get(long.id).progress.get("ray_status") == "RUNNING", 300)
        _wait(lambda: list((job_dir(long.id) / "run" / "checkpoints").glob("step-*")), 300)
        assert run_loft("jobs", "cancel", long.id).returncode == 0
        _wait(lambda: store.get(long.id).status == "CANCELLED", 300)
    finally:
        _stop(worker)
    assert ray.get_job_info(f"loft-{long.id}-1").status.value == "STOPPED"  # propagated
    assert "run " in (job_dir(long.id) / "log.txt").read_text()  # its training output came back
