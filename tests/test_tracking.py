"""loft.tracking: null and MLflow trackers on a real SQLite store, runs list/show, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import descendants, kill_pids, start_loft
from loft.core.errors import NotFoundError
from loft.core.specs import TrackingSpec
from loft.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    artifact_location,
    default_tracking_uri,
    list_runs,
    mlflow_client,
    open_tracker,
    resolve_tracking_uri,
    show_run,
)
from loft.tracking.mlflow_tracker import TRUNCATION_MARKER, clean_key, param_value

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables created once; MLflow's migrations take seconds."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow_client("sqlite:///" + db.as_posix())
    return db


def _copy_store(template: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(template)) as src,
        contextlib.closing(sqlite3.connect(dest)) as dst,
    ):
        src.backup(dst)


@pytest.fixture
def store(loft_home: Path, _template_db: Path) -> str:
    """A fresh default tracking store in this test's LOFT_HOME; returns its URI."""
    _copy_store(_template_db, loft_home / "mlflow.db")
    return default_tracking_uri()


def _open(experiment: str = "tests", **kw: Any) -> MlflowTracker:
    tracker = open_tracker(TrackingSpec(experiment=experiment), run_name="t", **kw)
    assert isinstance(tracker, MlflowTracker)
    return tracker


def _write_run(
    home: Path, run_id: str, *, mtime: float, summary: dict[str, Any] | None = None, **extra: Any
) -> Path:
    d = home / "runs" / run_id
    d.mkdir(parents=True)
    (d / "resolved.yaml").write_text(
        "base_model: smollm2-135m-instruct\nmethod: lora\ndata:\n  train: /x.jsonl\n"
    )
    if summary is not None:
        doc = {
            "run_id": run_id,
            "status": "completed",
            "method": "lora",
            "base_model": "smollm2-135m-instruct",
            "dataset_fingerprint": "abc123",
            "train_tokens": 12345,
            "steps": 10,
            "wall_s": 12.5,
            "tokens_per_s": 987.6,
            "peak_mem_bytes": 2**30,
            "final_train_loss": 1.25,
            "eval_loss": 1.5,
            "output_path": str(d / "adapter"),
            **summary,
        }
        (d / "run_summary.json").write_text(json.dumps(doc))
    for name, text in extra.items():
        (d / name).write_text(text)
    for p in (d, *d.iterdir()):
        os.utime(p, (mtime, mtime))
    return d


# ----------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_null_tracker_accepts_everything(tmp_path: Path) -> None:
    t = NullTracker()
    assert isinstance(t, Tracker)
    assert t.run_id is None
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.log_artifact(tmp_path / "missing")
    t.set_tags({"k": "v"})
    t.finish("KILLED")
    assert t.finished_status == "KILLED"
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        NullTracker().finish("DONE")
    with pytest.raises(RuntimeError), NullTracker() as t2:
        raise RuntimeError
    assert t2.finished_status == "FAILED"


@pytest.mark.unit
def test_tracking_uri_precedence(loft_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = default_tracking_uri()
    assert default == f"sqlite:///{(loft_home / 'mlflow.db').as_posix()}"
    local = (loft_home.resolve() / "artifacts").as_uri()
    assert artifact_location(default) == local
    assert artifact_location("http://tracking:5000") is None
    # a database store: under LOFT_HOME too, not ./mlruns wherever the process happens to start
    assert artifact_location("postgresql+psycopg://db/loft") == local
    # the deployment's setting wins for every store: object storage, or a shared directory
    monkeypatch.setenv("LOFT_ARTIFACTS_URL", "s3://runs/mlflow/")
    assert artifact_location(default) == artifact_location("http://t:5000") == "s3://runs/mlflow"
    (loft_home / "settings.yaml").write_text("artifacts: {url: ~/shared-artifacts}\n")
    monkeypatch.delenv("LOFT_ARTIFACTS_URL")
    assert artifact_location(default) == (Path.home() / "shared-artifacts").resolve().as_uri()
    (loft_home / "settings.yaml").unlink()
    assert resolve_tracking_uri(None) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")
    assert resolve_tracking_uri("") == default


@pytest.mark.unit
def test_param_values_and_keys() -> None:
    assert param_value(3) == "3"
    assert param_value(["q_proj", "v_proj"]) == '["q_proj","v_proj"]'
    assert param_value({"a": 1}) == '{"a":1}'
    long = param_value("x" * 10_000, limit=500)
    assert len(long) == 500 and long.endswith(TRUNCATION_MARKER)
    assert param_value("y" * 500, limit=500) == "y" * 500
    assert clean_key("data.column_map.my:col") == "data.column_map.my_col"
    assert clean_key("/a/../b//c/") == "a/b/c"
    assert clean_key("") == "_"


@pytest.mark.unit
def test_tracking_can_be_switched_off(loft_home: Path) -> None:
    t = open_tracker(TrackingSpec(uri="none"), run_name="x")
    assert isinstance(t, NullTracker)
    assert not (loft_home / "mlflow.db").exists()


# ----------------------------------------------------------------------------- MLflow tracker


@pytest.mark.unit
def test_mlflow_tracker_logs_params_metrics_artifacts(
    store: str, loft_home: Path, tmp_path: Path
) -> None:
    t = _open(tags={"loft.run_dir": "/runs/x"})
    assert isinstance(t, Tracker) and t.run_id
    params: dict[str, Any] = {f"training.p{i:03d}": i for i in range(150)}
    params |= {"long": "z" * 7000, "medium": "m" * 600, "lora.target_modules": ["q", "v"]}
    t.log_params(params)
    t.log_params({"training.p001": 1})  # same value again: skipped, no error
    for step in range(1, 31):
        t.log_metrics({"train/loss": 10.0 / step, "lr": 1e-4}, step=step)
    t.log_metrics({"eval/loss": 0.5}, step=30)
    f = tmp_path / "card.json"
    f.write_text("{}")
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "sub" / "w.bin").write_bytes(b"\0" * 16)
    t.log_artifact(f)
    t.log_artifact(adapter)
    t.log_artifact(f, artifact_path="extra")
    with pytest.raises(NotFoundError):
        t.log_artifact(tmp_path / "nope")
    t.finish()
    t.finish("FAILED")  # already finished: ignored

    client = mlflow_client(store)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time
    assert run.info.run_name == "t"
    p = run.data.params
    assert len(p) == 153 and p["training.p149"] == "149"
    assert len(p["long"]) == 6000 and p["long"].endswith(TRUNCATION_MARKER)
    assert p["medium"] == "m" * 600
    assert p["lora.target_modules"] == '["q","v"]'
    tags = run.data.tags
    assert tags["loft.run_dir"] == "/runs/x"
    assert tags["sys.python"] and tags["sys.torch"] and tags["sys.cpu_count"]
    history = client.get_metric_history(t.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert {m.step: m.value for m in history}[4] == pytest.approx(2.5)
    assert run.data.metrics["eval/loss"] == 0.5
    arts = {a.path for a in client.list_artifacts(t.run_id)}
    assert arts == {"card.json", "adapter", "extra"}
    assert {a.path for a in client.list_artifacts(t.run_id, "adapter")} == {
        "adapter/adapter_config.json",
        "adapter/sub",
    }
    assert run.info.artifact_uri.startswith((loft_home / "artifacts" / "tests").resolve().as_uri())
    assert (
        loft_home / "artifacts" / "tests" / t.run_id / "artifacts" / "adapter/sub/w.bin"
    ).is_file()
    with contextlib.closing(sqlite3.connect(loft_home / "mlflow.db")) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.unit
def test_metrics_are_buffered_and_written_in_batches(store: str) -> None:
    """1,498 metric points cost two store writes: one when 1,000 are pending, one on flush (the
    per-call cost is measured in bench/overheads.py)."""
    t = _open()
    t.flush_interval_s = 3600.0  # only the size bound may trigger a write in this test
    writes: list[int] = []
    log_batch = t._client.log_batch

    def counting_log_batch(run_id: str, metrics=(), **kw: Any) -> None:
        writes.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kw)

    t._client.log_batch = counting_log_batch
    t.log_metrics({"loss": 1.0}, step=0)
    client = mlflow_client(store)
    assert client.get_run(t.run_id).data.metrics == {}  # buffered, not yet written
    for step in range(1, 500):
        t.log_metrics({"loss": 1.0 / step, "grad_norm": 1.0, "lr": 1e-4}, step=step)
    assert writes == [1000]  # t.max_pending points in one batch, the rest still buffered
    t.flush()
    assert writes == [1000, 498]
    assert len(client.get_metric_history(t.run_id, "loss")) == 500
    t.finish("KILLED")
    assert writes == [1000, 498]  # nothing left to write
    assert client.get_run(t.run_id).info.status == "KILLED"


@pytest.mark.unit
def test_resume_continues_the_same_run(store: str) -> None:
    first = _open()
    first.log_params({"lr": 0.001, "seed": 1})
    for step in (1, 2, 3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finish("KILLED")

    again = _open(resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    client = mlflow_client(store)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_params({"lr": 0.001, "seed": 2, "new": "x"})  # unchanged, changed, new
    for step in (4, 5):
        again.log_metrics({"loss": float(step)}, step=step)
    again.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "seed": "1", "new": "x"}
    assert run.data.tags["loft.param_changed.seed"] == "2"
    assert run.data.tags["loft.resumed"] == "true"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    with pytest.raises(NotFoundError, match="no such run"):
        _open(resume_run_id="0" * 32)


@pytest.mark.unit
def test_parent_active_run_is_left_alone(
    store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    parent = mlflow.start_run(run_name="parent")
    try:
        mlflow.log_param("who", "parent")
        t = _open()
        assert t.run_id != parent.info.run_id
        t.log_params({"who": "child"})
        t.log_metrics({"loss": 1.0}, step=1)
        t.finish()
        active = mlflow.active_run()
        assert active is not None and active.info.run_id == parent.info.run_id
        mlflow.log_metric("parent_metric", 2.0)
        client = mlflow_client(store)
        p = client.get_run(parent.info.run_id)
        c = client.get_run(t.run_id)
        assert p.info.status == "RUNNING" and p.data.params == {"who": "parent"}
        assert p.data.metrics == {"parent_metric": 2.0}
        assert c.info.status == "FINISHED" and c.data.params == {"who": "child"}
        assert c.data.metrics == {"loss": 1.0}
    finally:
        mlflow.end_run()
    assert mlflow_client(store).get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.unit
def test_env_tracking_uri_is_honoured(
    store: str, _template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere" / "other.db"
    _copy_store(_template_db, other)
    uri = "sqlite:///" + other.as_posix()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with _open(experiment="env exp/1") as t:
        t.log_metrics({"x": 1.0}, step=0)
    assert t.tracking_uri == uri
    run = mlflow_client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((other.parent / "artifacts" / "env_exp_1").as_uri())
    assert mlflow_client(store).get_experiment_by_name("env exp/1") is None


@pytest.mark.unit
def test_context_manager_marks_failure(store: str) -> None:
    with pytest.raises(RuntimeError), _open() as t:
        t.log_metrics({"loss": 3.0}, step=7)
        raise RuntimeError("boom")
    run = mlflow_client(store).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 3.0}


_CHILD = """
import os, signal, sys
from loft.core.specs import TrackingSpec
from loft.tracking import open_tracker
t = open_tracker(TrackingSpec(experiment="crash"), run_name="child")
for step in range(10):
    t.log_metrics({"loss": float(step)}, step=step)
t.flush()
t.log_metrics({"loss": 99.0}, step=10)  # buffered only
print(t.run_id, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_process_death_leaves_a_consistent_store(store: str, loft_home: Path, how: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, how], capture_output=True, text=True, timeout=120
    )
    run_id = out.stdout.strip()
    assert run_id, out.stderr
    with contextlib.closing(sqlite3.connect(loft_home / "mlflow.db")) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    client = mlflow_client(store)
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    if how == "exit":  # exited without finish(): buffered metrics written, run marked FAILED
        assert run.info.status == "FAILED" and steps == list(range(11))
    else:  # SIGKILL: what was flushed is intact, the run stays RUNNING
        assert run.info.status == "RUNNING" and steps == list(range(10))


# ----------------------------------------------------------------------------- runs list / show


@pytest.mark.unit
def test_list_runs_newest_first(loft_home: Path) -> None:
    now = time.time()
    _write_run(loft_home, "run-old", mtime=now - 300, summary={"status": "failed"})
    _write_run(loft_home, "run-new", mtime=now - 10, summary={"mlflow_run_id": "m1"})
    _write_run(loft_home, "run-live", mtime=now, RUNNING="")
    _write_run(loft_home, "run-cut", mtime=now - 200)
    (loft_home / "runs" / "not-a-run").mkdir()
    (loft_home / "runs" / ".tmp-run-x").mkdir()

    rows = list_runs()
    assert [r["run_id"] for r in rows] == ["run-live", "run-new", "run-cut", "run-old"]
    live, new, cut, old = rows
    assert live["status"] == "running" and live["method"] == "lora"
    assert cut["status"] == "incomplete" and cut["base_model"] == "smollm2-135m-instruct"
    assert new["status"] == "completed" and new["mlflow_run_id"] == "m1"
    assert new["train_tokens"] == 12345 and new["eval_loss"] == 1.5
    assert old["status"] == "failed" and "mlflow_run_id" not in old
    assert [r["run_id"] for r in list_runs(limit=2)] == ["run-live", "run-new"]


@pytest.mark.unit
def test_show_run_resolves_and_reports_missing(loft_home: Path) -> None:
    now = time.time()
    d = _write_run(loft_home, "20260101-abc", mtime=now - 5, summary={})
    _write_run(loft_home, "20260102-def", mtime=now, summary={"note": "extra"})
    info = show_run("20260101-abc")
    assert info["run_id"] == "20260101-abc" and info["steps"] == 10
    assert info["config"]["method"] == "lora" and info["metrics"] == {}
    assert show_run("20260102")["note"] == "extra"  # unique prefix
    assert show_run(str(d))["run_id"] == "20260101-abc"  # directory path
    with pytest.raises(NotFoundError, match="ambiguous"):
        show_run("2026")
    with pytest.raises(NotFoundError) as err:
        show_run("nope")
    assert "20260102-def, 20260101-abc" in err.value.message
    assert "loft runs list" in (err.value.hint or "")


@pytest.mark.unit
def test_show_run_reads_metric_history(store: str, loft_home: Path) -> None:
    t = _open()
    for step in range(1, 6):
        t.log_metrics({"train/loss": 1.0 / step}, step=step)
    t.finish()
    _write_run(loft_home, "tracked", mtime=time.time(), summary={"mlflow_run_id": t.run_id})
    _write_run(loft_home, "lost", mtime=time.time(), summary={"mlflow_run_id": "f" * 32})
    info = show_run(t.run_id)  # found by its MLflow id too
    assert info["run_id"] == "tracked" and info["mlflow"]["status"] == "FINISHED"
    hist = info["metrics"]["train/loss"]
    assert [p["step"] for p in hist] == [1, 2, 3, 4, 5]
    assert hist[-1]["value"] == pytest.approx(0.2)
    lost = show_run("lost")
    assert lost["metrics"] == {} and "metrics_error" in lost


# ----------------------------------------------------------------------------- CLI


@pytest.mark.unit
@pytest.mark.parametrize("args", [["runs"], ["runs", "list"], ["runs", "show"], ["ui"]])
def test_cli_help(args: list[str]) -> None:
    from loft.cli.main import app

    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.unit
def test_cli_runs_list_and_show(loft_home: Path) -> None:
    from loft.cli.main import app

    runner = CliRunner()
    empty = runner.invoke(app, ["runs", "list"])
    assert empty.exit_code == 0 and "No runs yet" in empty.output
    _write_run(loft_home, "run-a", mtime=time.time() - 60, summary={})
    _write_run(loft_home, "run-b", mtime=time.time(), summary={"status": "failed"})
    result = runner.invoke(app, ["runs", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["run_id"] for r in rows] == ["run-b", "run-a"]
    assert rows[1]["tokens_per_s"] == pytest.approx(987.6)
    table = runner.invoke(app, ["runs", "list", "--limit", "1"])
    assert table.exit_code == 0 and "run-b" in table.output and "run-a" not in table.output
    shown = runner.invoke(app, ["runs", "show", "run-a"])
    assert shown.exit_code == 0 and "1.0 GiB" in shown.output and "config" in shown.output
    as_json = json.loads(runner.invoke(app, ["runs", "show", "run-a", "--json"]).output)
    assert as_json["config"]["data"]["train"] == "/x.jsonl"


@pytest.mark.unit
def test_cli_missing_run_exits_2(loft_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loft.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["runs", "show", "nope"])
    assert exc.value.code == 2
    assert "no run 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loft ui


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest.mark.slow
def test_loft_ui_serves_the_store(store: str, loft_home: Path) -> None:
    with _open(experiment="ui") as t:
        t.log_metrics({"loss": 1.0}, step=1)
    experiment_id = mlflow_client(store).get_run(t.run_id).info.experiment_id
    port = _free_port()
    # output to a file, not a pipe: a server that outlived a failed test would hold a pipe open
    log = loft_home / "ui.log"
    with log.open("w") as sink:
        proc = start_loft("ui", "--port", str(port), stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 180  # ~10 s alone; much longer on a loaded 2-core machine
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/", timeout=2) as r:
                    status = r.status
                break
            time.sleep(0.5)
        assert status == 200, f"UI did not come up; exit={proc.poll()}\n{log.read_text()}"
        req = urllib.request.Request(
            base + "/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert [r["info"]["run_id"] for r in runs] == [t.run_id]
        tree = descendants(proc.pid)  # the MLflow server and its workers
        assert tree, "loft ui started no server process"
        proc.send_signal(signal.SIGINT)  # loft forwards it to the server and waits
        assert proc.wait(timeout=60) == 0
        assert not [pid for pid in tree if _alive(pid)], "loft ui left server processes behind"
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(base + "/", timeout=2)
    finally:
        tree += descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        kill_pids(tree + ([proc.pid] if proc.poll() is None else []))  # what this test started
    out = log.read_text()
    assert f"http://127.0.0.1:{port}/" in out


@pytest.mark.integration
def test_piped_tables_keep_whole_cells(loft_home: Path) -> None:
    """Piped into grep or a file, `loft runs list` prints every cell whole (no 80-column cut)."""
    from helpers import run_loft

    base = "/models/" + "a-very-long-directory-name/" * 6 + "base-model"
    _write_run(loft_home, "run-with-a-long-base", mtime=time.time(), summary={"base_model": base})
    out = run_loft("runs", "list", env={"COLUMNS": ""})
    assert out.returncode == 0, out.stderr
    assert base in out.stdout and "…" not in out.stdout
