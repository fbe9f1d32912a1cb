"""Schedules, metric triggers and pipelines (issue 17): cron and interval schedules fire each tick
exactly once across workers, processes and restarts (SQLite and PostgreSQL), missed ticks fire
once; a metric trigger queues its job once per check tick when its condition holds; a pipeline's
stages run one after another through a real worker, a failing stage stops it, and bad stages are
refused at submit with their key paths."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, run_loft, start_loft, trained_tiny_home

TURN = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _data(folder: Path, name: str = "d.jsonl", n: int = 1) -> Path:
    path = folder / name
    path.write_text((json.dumps(TURN) + "\n") * n)
    return path


def _job(data: Path) -> dict:
    return {"kind": "data-validate", "spec": {"args": [str(data)]}}


def _by_key(store, prefix: str) -> Counter:
    return Counter(j.dedup for j in store.list(limit=10_000) if (j.dedup or "").startswith(prefix))


@pytest.fixture
def store(loft_home):
    from loft.jobs import JobStore

    return JobStore()


# ------------------------------------------------------------------ the scheduler, in-process


@pytest.mark.unit
def test_a_cron_schedule_fires_each_tick_once_and_missed_ticks_once(store, tmp_path):
    from loft.jobs import JobStore
    from loft.jobs.schedules import add_schedule, fire_due, get_schedule

    s = add_schedule(store, "nightly", job=_job(_data(tmp_path)), cron="0 3 * * *", owner="ann")
    t1 = s.next_tick(s.created)
    assert time.gmtime(t1)[3:6] == (3, 0, 0) and t1 > s.created
    assert fire_due(store, s.created + 1) == []  # added now: nothing before its next tick
    assert fire_due(store, t1 - 1) == []
    [f] = fire_due(store, t1 + 5)
    assert (f.schedule, f.tick, f.kind) == ("nightly", t1, "data-validate")
    job = store.get(f.job)
    assert job.dedup == f"schedule:nightly:{int(t1)}" and job.owner == "ann"
    assert job.spec["args"] == [str(tmp_path / "d.jsonl")] and job.spec["schedule"] == "nightly"
    assert fire_due(store, t1 + 60) == []  # a tick already fired never fires again
    restarted = JobStore()  # a new process's store on the same database
    assert fire_due(restarted, t1 + 120) == []
    day = 86400
    [f2] = fire_due(restarted, t1 + day + 1)
    assert f2.tick == t1 + day
    # the workers were down for three ticks: the latest fires, once; the others are skipped
    [f5] = fire_due(store, t1 + 4 * day + 30)
    assert f5.tick == t1 + 4 * day
    assert fire_due(restarted, t1 + 4 * day + 31) == []
    keys = _by_key(store, "schedule:nightly:")
    assert sorted(keys) == [f"schedule:nightly:{int(t1 + k * day)}" for k in (0, 1, 4)]
    assert set(keys.values()) == {1}
    again = get_schedule(store, "nightly")
    assert (again.last_tick, again.fired_tick, again.fired_job) == (f5.tick, f5.tick, f5.job)
    d = again.to_dict(now=t1 + 4 * day + 40)
    assert d["next_tick"] == time.strftime("%Y-%m-%dT03:00:00Z", time.gmtime(t1 + 5 * day))
    assert d["due"] is None and d["fired_job"] == f5.job


@pytest.mark.unit
def test_an_interval_schedule_and_a_cron_in_a_time_zone(store, tmp_path):
    from loft.jobs.schedules import add_schedule, fire_due, parse_duration

    assert [parse_duration(x) for x in ("45s", "30m", "2h", "1d", "1h30m", 90, 11.25)] == [
        45, 1800, 7200, 86400, 5400, 90, 11,
    ]  # fmt: skip
    s = add_schedule(store, "half-hourly", job=_job(_data(tmp_path)), every_s="30m", owner="ann")
    anchor = int(s.created)
    assert s.next_tick(s.created) == anchor + 1800
    assert fire_due(store, anchor + 1799) == []
    nows = (1801, 1900, 3600, 3601, 9000)
    ticks = [f.tick for now in nows for f in fire_due(store, anchor + now)]
    assert ticks == [anchor + 1800, anchor + 3600, anchor + 9000]  # 5400, 7200 missed: once
    berlin = add_schedule(
        store, "berlin", job=_job(_data(tmp_path)), cron="0 3 * * *", tz="Europe/Berlin",
        owner="ann",
    )  # fmt: skip
    # 03:00 in Berlin is 01:00 or 02:00 UTC, by the season
    hour = time.gmtime(berlin.next_tick(berlin.created)).tm_hour
    assert hour in (1, 2) and "Europe/Berlin" in berlin.trigger


@pytest.mark.unit
def test_bad_schedules_are_refused_with_the_reason(store, tmp_path, capsys):
    from loft.core.errors import ConfigError, NotFoundError
    from loft.jobs.schedules import add_schedule, get_schedule, remove_schedule

    job = _job(_data(tmp_path))
    cases = [
        ({"cron": "0 3 * *"}, "4 fields, expected 5"),
        ({"cron": "61 * * * *"}, "Bad minute"),
        ({"cron": "0 0 30 2 *"}, "day-of-month"),
        ({"every_s": "30x"}, "not an interval"),
        ({"every_s": 0.4}, "at least 1 s"),
        ({"every_s": "0s"}, "at least 1 s"),
        ({"every_s": 60, "cron": "* * * * *"}, "not both"),
        ({}, "needs a trigger"),
        ({"cron": "@daily", "tz": "Mars/Olympus"}, "no such time zone"),
        ({"when": "bot@champion exact_match < 0.8"}, "--when needs --data"),
        ({"when": "exact_match < 0.8", "data": str(tmp_path / "d.jsonl")}, "REF METRIC OP"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            add_schedule(store, "s", job=job, owner="ann", **kwargs)
    with pytest.raises(ConfigError, match="schedule name"):
        add_schedule(store, "bad name", job=job, every_s=60, owner="ann")
    with pytest.raises(ConfigError, match="job kind"):
        add_schedule(store, "s", job={"kind": "nope", "spec": {}}, every_s=60, owner="ann")
    first = add_schedule(store, "s", job=job, every_s=60, owner="ann")
    with pytest.raises(ConfigError, match="exists already"):
        add_schedule(store, "s", job=job, every_s=120, owner="ann")
    replaced = add_schedule(store, "s", job=job, every_s=120, owner="bob", replace=True)
    assert (replaced.every_s, replaced.owner) == (120, "bob") and first.every_s == 60
    assert remove_schedule(store, "s") and not remove_schedule(store, "s")
    with pytest.raises(NotFoundError):
        get_schedule(store, "s")
    # the CLI: exit 2 with the reason, the condition parsed by loft's gate parser at `add`
    d = str(tmp_path / "d.jsonl")
    for argv, message in [
        (["--when", "bot@champion json_exact_macth < 0.8"], "unknown metric(s): json_exact_macth"),
        (["--when", "bot@champion exact_match <> 3"], "right-hand side '> 3'"),
        (["--when", "bot@champion eval_loss <= champion"], "not with `champion`"),
        (["--cron", "0 3 * *"], "expected 5"),
    ]:
        capsys.readouterr()
        code = run_cli("schedule", "add", "x", *argv, "--data", d, "--kind", "data-validate",
                       "--", d)  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in " ".join(err.split()), err
    capsys.readouterr()
    assert run_cli("schedule", "add", "x", "--every", "1h", "--kind", "eval", "--", "--nope") == 2
    assert "No such option: --nope" in capsys.readouterr().err
    assert run_cli("schedule", "remove", "x") == 2


@pytest.mark.unit
def test_a_version_1_queue_is_migrated_in_place(loft_home):
    import sqlite3

    from loft.jobs import JobStore, schema

    path = loft_home / "jobs.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in filter(str.strip, schema.SCHEMA.split(";")):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO jobs (id, kind, spec, owner, status, created) VALUES"
            " ('jold', 'eval', '{\"args\": []}', 'ann', 'SUCCEEDED', 1.0)"
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    store = JobStore()
    old = store.get("jold")
    assert (old.status, old.dedup, old.pipeline) == ("SUCCEEDED", None, None)
    a = store.submit("eval", {"args": []}, owner="ann", dedup="k")
    assert store.submit("eval", {"args": ["other"]}, owner="bob", dedup="k").id == a.id
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert conn.execute("SELECT COUNT(*) FROM schedules").fetchone()[0] == 0


# ------------------------------------------------------------------ racing processes

RACER = """
import sys, time
from loft.jobs import JobStore
from loft.jobs.schedules import fire_due
url, start, nows = sys.argv[1], float(sys.argv[2]), [float(t) for t in sys.argv[3:]]
store = JobStore(url)
store.list(limit=1)  # connected (and the schema read) before the start
fired = []
for i, now in enumerate(nows):  # every process calls at the same moments: each tick contended
    time.sleep(max(0.0, start + 0.05 * i - time.time()))
    fired += [f"{f.schedule}@{int(f.tick)}" for f in fire_due(store, now)]
print(" ".join(fired))
"""


def _race(url: str, nows: list[float], n: int) -> list[list[str]]:
    """``n`` processes each calling ``fire_due`` at the same ``nows``, at the same moments; the
    ticks each one says it fired."""
    env = {**os.environ, "LOFT_JOBS_URL": url}
    start = time.time() + 2  # each one started and connected by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, str(start), *map(str, nows)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        for _ in range(n)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    return [out.split() for out, _ in outs]


def _processes_race_on_the_same_ticks(store, url: str, tmp_path: Path) -> None:
    from loft.jobs.schedules import add_schedule

    data = _data(tmp_path)
    every = add_schedule(store, "every", job=_job(data), every_s=60, owner="ann")
    cron = add_schedule(store, "minutely", job=_job(data), cron="* * * * *", owner="ann")
    anchor = int(every.created)
    nows = [anchor + 60 * k + 1 for k in range(1, 21)]
    each = _race(url, nows, 4)
    fired = [t for ticks in each for t in ticks]
    # every tick fired by exactly one process (not always the same one), one job queued for it
    assert len(fired) == len(set(fired)) == 40 and sum(1 for ticks in each if ticks) >= 2
    minutes = {now // 60 * 60 for now in nows}  # the latest minute at each call
    assert {int(t.split("@")[1]) for t in fired if t.startswith("minutely@")} == minutes
    assert min(minutes) > cron.created
    for name in ("every", "minutely"):
        keys = _by_key(store, f"schedule:{name}:")
        assert len(keys) == 20 and set(keys.values()) == {1}
    # restarted: fresh processes over the same ticks fire nothing; ticks missed while down, once
    assert _race(url, nows, 2) == [[], []]
    now = nows[-1] + 600
    later = [t for ticks in _race(url, [now], 3) for t in ticks]
    assert sorted(later) == [f"every@{anchor + 60 * 30}", f"minutely@{now // 60 * 60}"]
    assert len(store.list(limit=1000)) == 42


@pytest.mark.integration
@pytest.mark.slow
def test_processes_racing_on_sqlite_fire_each_tick_once(store, tmp_path):
    _processes_race_on_the_same_ticks(store, str(store.path), tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_processes_racing_on_postgresql_fire_each_tick_once(pg_url, loft_home, tmp_path):
    from loft.jobs import JobStore

    store = JobStore(pg_url)
    assert store.pg
    _processes_race_on_the_same_ticks(store, pg_url, tmp_path)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return err


def _wait(cond, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.1)
    assert cond(), "timed out"


@pytest.mark.integration
@pytest.mark.slow
def test_workers_fire_an_interval_schedule_once_per_tick_across_a_restart(store, tmp_path):
    from loft.jobs import job_dir
    from loft.jobs.schedules import get_schedule

    data = _data(tmp_path, n=2)
    r = run_loft("schedule", "add", "often", "--every", "1s", "--kind", "data-validate", "--",
                 str(data))  # fmt: skip
    assert r.returncode == 0 and "every 1s" in r.stderr, r.stderr

    def done() -> int:
        return sum(j.status == "SUCCEEDED" for j in store.list() if j.dedup)

    args = ("worker", "--poll", "0.05", "--lease", "3")
    workers = [start_loft(*args, stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        _wait(lambda: done() >= 3)
    finally:
        errs = [_stop(w) for w in workers]
    first = done()
    restarted = start_loft(*args, stdout=subprocess.DEVNULL)  # after a restart it carries on
    try:
        _wait(lambda: done() >= first + 2)
    finally:
        errs.append(_stop(restarted))
    said = [ln for e in errs for ln in e.splitlines() if ln.startswith("schedule often: tick")]
    jobs = [j for j in store.list(limit=1000) if j.dedup]
    assert len(said) == len(jobs) >= first + 2  # each firing done by one worker only
    keys = Counter(j.dedup for j in jobs)
    assert set(keys.values()) == {1}
    ticks = sorted(int(k.rsplit(":", 1)[1]) for k in keys)
    assert len(set(ticks)) == len(ticks)
    for j in jobs:
        if j.status == "SUCCEEDED":
            log = (job_dir(j.id) / "log.txt").read_text()  # requeued by a stop: 2 attempts
            assert log.count("=== attempt") == j.attempts and "OK: 2 records" in log
    s = get_schedule(store, "often")
    assert s.last_tick == ticks[-1]
    assert s.fired_job == store.by_dedup(f"schedule:often:{ticks[-1]}").id
    listed = json.loads(run_loft("schedule", "list", "--json").stdout)
    assert [d["name"] for d in listed] == ["often"] and listed[0]["fired_job"] == s.fired_job


# ------------------------------------------------------------------ metric triggers


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """A LOFT_HOME with one tiny LoRA run registered as trig:1, alias champion; its data."""
    from loft.core.config import validate_config
    from loft.train import train

    root = tmp_path_factory.mktemp("trig")
    home, run_dir, data, cfg = trained_tiny_home(root, _session_home, tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        train(validate_config(cfg), progress=False)
        from loft.registry import move_alias, register

        register(run_dir, name="trig")
        move_alias("trig", "champion", 1, reason="first")
        yield home, data


@pytest.fixture
def trig_home(champion, monkeypatch):
    home, data = champion
    monkeypatch.setenv("LOFT_HOME", str(home))
    return home, data


def _add_trigger(name: str, condition: str, data: Path) -> None:
    code = run_cli("schedule", "add", name, "--when", f"trig@champion {condition}", "--data",
                   str(data), "--kind", "data-validate", "--", str(data))  # fmt: skip
    assert code == 0


@pytest.mark.unit
def test_a_metric_trigger_fires_once_per_check_tick_when_its_condition_holds(trig_home, capsys):
    from loft.jobs import JobStore
    from loft.jobs.schedules import fire_due, get_schedule

    _, data = trig_home
    store = JobStore()
    _add_trigger("drop", "eval_loss > 0.5", data)  # a random tiny model: loss ~10, it holds
    _add_trigger("fine", "eval_loss > 1000", data)  # it does not
    drop = get_schedule(store, "drop")
    assert drop.every_s == 3600 and "checked every 1h" in drop.trigger
    t1 = drop.next_tick(drop.created)
    checks = {f.schedule: f for f in fire_due(store, t1 + 2)}
    assert {f.kind for f in checks.values()} == {"schedule-check"} and len(checks) == 2
    job = store.get(checks["drop"].job)
    assert job.spec["args"] == ["drop", "--tick", str(int(t1))]
    assert job.dedup == f"schedule:drop:{int(t1)}:check"
    assert fire_due(store, t1 + 3) == []

    for _ in range(2):  # the check job run twice for one tick (a retry): one job queued
        capsys.readouterr()
        assert run_cli("schedule", "check", "drop", "--tick", str(int(t1))) == 0
    assert "was queued for this tick already" in capsys.readouterr().err
    assert _by_key(store, "schedule:drop:") == {
        f"schedule:drop:{int(t1)}": 1, f"schedule:drop:{int(t1)}:check": 1,
    }  # fmt: skip
    fired = store.by_dedup(f"schedule:drop:{int(t1)}")
    assert fired.kind == "data-validate" and fired.spec["args"] == [str(data)]
    drop = get_schedule(store, "drop")
    check = drop.last_check
    assert check["holds"] and check["job"] == fired.id and check["value"] > 0.5
    assert check["ref"] == "trig:1" and check["metric"] == "eval_loss"
    assert drop.fired_job == fired.id

    assert run_cli("schedule", "check", "fine", "--tick", str(int(t1))) == 0
    fine = get_schedule(store, "fine")
    assert not fine.last_check["holds"] and fine.last_check["job"] is None
    assert fine.fired_job is None and _by_key(store, "schedule:fine:") == {
        f"schedule:fine:{int(t1)}:check": 1
    }
    capsys.readouterr()  # without --tick: measured and said, nothing queued or recorded
    assert run_cli("schedule", "check", "drop", "--json") == 0
    said = json.loads(capsys.readouterr().out)
    assert said["holds"] and said["job"] is None
    assert get_schedule(store, "drop").last_check == check

    # the drop lasts: later checks queue nothing while the job fired before is unfinished
    t2, t3 = drop.next_tick(t1 + 1), drop.next_tick(drop.next_tick(t1 + 1) + 1)
    capsys.readouterr()
    assert run_cli("schedule", "check", "drop", "--tick", str(int(t2))) == 0
    assert f"holds, but nothing is submitted: job {fired.id}" in capsys.readouterr().err
    assert get_schedule(store, "drop").last_check["held"].startswith(f"job {fired.id} ")
    assert store.by_dedup(f"schedule:drop:{int(t2)}") is None
    store.cancel(fired.id)  # once it has finished, the next check that holds fires again
    assert run_cli("schedule", "check", "drop", "--tick", str(int(t3))) == 0
    assert store.by_dedup(f"schedule:drop:{int(t3)}") is not None
    assert run_cli("schedule", "remove", "drop") == 0 and run_cli("schedule", "remove", "fine") == 0


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_runs_the_check_and_then_the_job_it_queued(trig_home, tmp_path):
    from loft.jobs import JobStore
    from loft.jobs.schedules import fire_due, get_schedule

    _, data = trig_home
    store = JobStore()
    _add_trigger("w-drop", "eval_loss > 0.5", data)
    s = get_schedule(store, "w-drop")
    t1 = s.next_tick(s.created)
    [f] = fire_due(store, t1 + 1)
    w = run_loft("worker", "--until-idle", "--poll", "0.05")
    assert w.returncode == 0, w.stderr
    check = store.get(f.job)
    fired = store.by_dedup(f"schedule:w-drop:{int(t1)}")
    assert check.status == "SUCCEEDED" and check.result["holds"], check.to_dict()
    assert check.result["job"] == fired.id and fired.status == "SUCCEEDED"
    assert get_schedule(store, "w-drop").last_check["job"] == fired.id
    run_cli("schedule", "remove", "w-drop")


# ------------------------------------------------------------------ pipelines


@pytest.mark.unit
def test_bad_stages_are_refused_at_submit_with_their_key_paths(loft_home, tmp_path, capsys):
    from loft.jobs import JobStore

    _data(tmp_path)
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(
        "name: nightly\n"  # 1
        "stages:\n"  # 2
        "  - kind: nope\n"  # 3
        "  - kind: eval\n"  # 4
        "    argz: [x]\n"  # 5
        "  - kind: data-validate\n"  # 6
        "    args: ['{registered}']\n"  # 7
        "  - kind: data-validate\n"  # 8
        "    args: ['{foo}']\n"  # 9
        "  - kind: eval\n"  # 10
        "    args: [--nope]\n"  # 11
        "  - kind: train\n"  # 12
        "    config: missing.yaml\n"  # 13
        "  - kind: data-validate\n"  # 14
        "    args: [d.jsonl, {a: 1}]\n"  # 15
    )
    capsys.readouterr()
    assert run_cli("jobs", "submit", str(pipeline)) == 2
    err = " ".join(capsys.readouterr().err.split())
    for at, key, what in [
        (1, "name", "unknown key"),
        (3, "stages[0].kind", "'nope' is not a job kind"),
        (5, "stages[1].argz", "unknown key for a stage of kind eval"),
        (7, "stages[2].args[0]", "{registered} comes from a training stage's result, and no"),
        (9, "stages[3].args[0]", "unknown placeholder {foo}"),
        (11, "stages[4].args", "job of kind eval: `loft eval --nope`: No such option: --nope"),
        (13, "stages[5].config", f"no file {tmp_path / 'missing.yaml'}"),
        (15, "stages[6].args[1]", "an argument is a string"),
    ]:
        assert f"{pipeline}:{at} {key}: {what}" in err, (key, err)
    assert "8 problem(s)" in err and JobStore().list() == []


@pytest.mark.unit
def test_placeholders_are_filled_from_earlier_results_or_stop_the_pipeline():
    from loft.jobs.pipelines import follow_up
    from loft.jobs.store import Job

    then = [
        {"kind": "eval", "spec": {"args": ["{registered}", "--data", "h.jsonl"], "cwd": "/p"},
         "resources": {}, "at": "p.yaml:4", "max_attempts": 2},
        {"kind": "rollout", "spec": {"args": ["start", "{registered_name}", "--candidate",
         "{registered_version}", "{run_dir}/x"], "cwd": "/p"}, "resources": {}, "at": "p.yaml:6"},
    ]  # fmt: skip
    train = Job("j1", "train", {"config": "c", "pipeline": "p1", "stage": 0, "then": then,
                "context": {}}, "ann", 4, {}, "SUCCEEDED", 1, 3, 0.0)  # fmt: skip
    new, stopped = follow_up(train, {"registered": "tickets:7", "run_dir": "/r"})
    assert stopped is None and new.kind == "eval" and new.parent == "j1"
    assert (new.owner, new.priority, new.max_attempts) == ("ann", 4, 2)
    assert new.dedup == "pipeline:p1:1" and new.spec["args"][0] == "tickets:7"
    assert new.spec["stage"] == 1 and new.spec["then"] == then[1:]
    evaluated = Job("j2", "eval", new.spec, "ann", 4, {}, "SUCCEEDED", 1, 3, 0.0)
    last, _ = follow_up(evaluated, {})  # the context carries on past a stage with no result
    assert last.spec["args"] == ["start", "tickets", "--candidate", "7", "/r/x"]
    assert follow_up(Job("j3", "rollout", last.spec, "ann", 4, {}, "SUCCEEDED", 1, 3, 0.0),
                     {}) == (None, None)  # fmt: skip
    new, stopped = follow_up(train, {"run_dir": "/r"})  # not registered
    assert new is None and "stages[1] (p.yaml:4) needs {registered}" in stopped


def _pipeline(folder: Path, stages: list[dict]) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_stage_stops_the_pipeline(loft_home, tmp_path):
    from loft.jobs import JobStore

    _data(tmp_path, "good.jsonl", n=3)
    (tmp_path / "bad.jsonl").write_text("not json\n")
    path = _pipeline(tmp_path, [
        {"kind": "data-validate", "args": ["good.jsonl"]},  # relative to the file
        {"kind": "data-validate", "args": ["bad.jsonl"]},
        {"kind": "data-validate", "args": ["good.jsonl"]},
    ])  # fmt: skip
    r = run_loft("jobs", "submit", str(path), "--priority", "3", cwd=Path("/"))
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip()
    assert "stage 1 of 3" in r.stderr
    store = JobStore()
    pipeline = store.get(first).pipeline
    # a stage whose placeholder has no value when it is due stops there, as the row says
    odd = store.submit("data-validate", {
        "args": [str(tmp_path / "good.jsonl")], "pipeline": "pmanual", "stage": 0, "context": {},
        "then": [{"kind": "eval", "spec": {"args": ["{registered}"]}, "at": "x.yaml:3"}],
    }, owner="ann")  # fmt: skip
    w = run_loft("worker", "--until-idle", "--poll", "0.05", cwd=Path("/"))
    assert w.returncode == 0, w.stderr
    jobs = sorted(store.list(pipeline=pipeline[:8]), key=lambda j: j.created)
    assert [(j.status, j.spec["stage"]) for j in jobs] == [("SUCCEEDED", 0), ("FAILED", 1)]
    assert jobs[1].parent == jobs[0].id and jobs[1].priority == 3
    assert jobs[0].result["next_job"] == jobs[1].id and jobs[1].error.startswith("exit 2")
    shown = run_loft("jobs", "show", jobs[1].id).stdout
    assert f"pipeline:     {pipeline} (stage 2 of 3" in shown
    assert "then stages[2]: data-validate good.jsonl" in shown and "loft jobs retry" in shown
    stopped = store.get(odd.id)
    assert stopped.status == "SUCCEEDED" and "needs {registered}" in stopped.result[
        "pipeline_stopped"]  # fmt: skip
    assert "pipeline stopped" in stopped.history[-1]
    assert store.list(pipeline="pmanual") == [stopped]
    listed = json.loads(run_loft("jobs", "list", "--pipeline", pipeline, "--json").stdout)
    assert [d["id"] for d in listed] == [jobs[1].id, jobs[0].id]


@pytest.mark.integration
@pytest.mark.slow
def test_a_three_stage_pipeline_trains_evaluates_the_registered_version_and_goes_on(
    loft_home, tmp_path, tiny_model, _session_home
):
    from loft.jobs import JobStore, job_dir

    (tmp_path / "t").mkdir()
    _, _, data, cfg = trained_tiny_home(tmp_path / "t", _session_home, tiny_model)
    cfg.pop("output_dir")
    cfg["register"] = {"name": "piped"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    path = _pipeline(tmp_path, [
        {"kind": "train", "config": "train.yaml"},
        {"kind": "eval", "args": ["{registered}", "--data", "t/chat.jsonl", "--metrics",
                                  "eval_loss"]},
        {"kind": "data-validate", "args": ["t/chat.jsonl"]},
    ])  # fmt: skip
    r = run_loft("jobs", "submit", str(path), cwd=Path("/"))
    assert r.returncode == 0, r.stderr
    store = JobStore()
    pipeline = store.get(r.stdout.strip()).pipeline
    w = run_loft("worker", "--until-idle", "--poll", "0.05")
    assert w.returncode == 0, w.stderr
    train, evaluate, validate = sorted(store.list(pipeline=pipeline), key=lambda j: j.created)
    assert [j.status for j in (train, evaluate, validate)] == ["SUCCEEDED"] * 3, w.stderr
    assert [j.kind for j in (train, evaluate, validate)] == ["train", "eval", "data-validate"]
    assert (evaluate.parent, validate.parent) == (train.id, evaluate.id)
    assert train.result["registered"] == "piped:1"
    assert evaluate.spec["args"][0] == "piped:1"  # {registered}, filled
    assert validate.spec["cwd"] == str(tmp_path) and data == tmp_path / "t" / "chat.jsonl"
    assert "piped:1" in (job_dir(evaluate.id) / "log.txt").read_text()
    assert "OK: 3 records" in (job_dir(validate.id) / "log.txt").read_text()
