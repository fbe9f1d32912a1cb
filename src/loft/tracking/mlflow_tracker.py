"""The MLflow tracker: explicit run ids through ``MlflowClient``, never mlflow's global active run.

The default store is SQLite at ``LOFT_HOME/mlflow.db``, artifacts under ``LOFT_HOME/artifacts``;
``tracking.uri`` in the config or ``MLFLOW_TRACKING_URI`` point it elsewhere (PostgreSQL, a
tracking server) and ``LOFT_ARTIFACTS_URL`` the artifacts (S3-compatible storage) with no code
change. mlflow is imported inside functions, so importing
``loft.tracking`` is cheap.

Choices worth knowing:

* Params are write-once in MLflow. A key already logged with the same value is skipped (so a resumed
  run re-logging its config never fails); a key re-logged with a *different* value keeps its first
  value, logs a warning, and the new value is recorded as the tag ``loft.param_changed.<key>``.
* Param values longer than MLflow's limit are cut and end with :data:`TRUNCATION_MARKER`.
* Metrics are buffered in memory with their own timestamps and written with ``log_batch`` every
  ``flush_interval_s`` seconds (or 1000 values), on :meth:`MlflowTracker.flush` and on ``finish``,
  so a training step pays only a list append. A failed write is retried at the next flush; tracking
  trouble never stops training. The interval is 5 s unless ``LOFT_TRACKING_FLUSH_S`` (or
  ``tracking.flush_s`` in LOFT_HOME/settings.yaml) says otherwise: how often the portal's live
  curves can move.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import getpass
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loft.core.errors import NotFoundError
from loft.core.paths import file_lock, loft_home
from loft.core.settings import positive_setting, setting
from loft.core.specs import TrackingSpec
from loft.tracking.base import NullTracker, Tracker, check_status, status_for_exception

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)

TRUNCATION_MARKER = "...[truncated]"
PARAM_CHANGED_TAG = "loft.param_changed."
DISABLED_URIS = ("none", "off")
MAX_KEY_LENGTH = 250
MAX_BUFFERED_METRICS = 100_000
DEFAULT_FLUSH_S = 5.0
SYSTEM_PACKAGES = ("loft", "torch", "transformers", "peft", "trl", "accelerate", "mlflow")

_INITIALISED: set[str] = set()
_INIT_LOCK = threading.Lock()
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")
T = TypeVar("T")


# ----------------------------------------------------------------------------- store and URIs


def default_tracking_uri() -> str:
    """``sqlite:///<LOFT_HOME>/mlflow.db``; artifacts go to ``LOFT_HOME/artifacts``."""
    return "sqlite:///" + (loft_home() / "mlflow.db").as_posix()


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """The config's ``tracking.uri`` if set, else ``MLFLOW_TRACKING_URI``, else the default."""
    for candidate in (spec_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and candidate.strip():
            return candidate.strip()
    return default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep their runs' artifacts, as a URI.

    ``LOFT_ARTIFACTS_URL`` (``artifacts.url`` in settings.yaml) when set: ``s3://BUCKET/PREFIX``
    (MLflow's S3 artifact store, through ``LOFT_S3_ENDPOINT_URL`` for MinIO and other
    S3-compatible servers) or a directory. Else ``artifacts/`` beside a SQLite store's file, and
    ``LOFT_HOME/artifacts`` for a database store (PostgreSQL: MLflow would otherwise write to
    ``./mlruns`` in whatever directory the process started in). None for a tracking server, whose
    own configuration decides.
    """
    configured = setting("LOFT_ARTIFACTS_URL", "artifacts.url")
    if configured:
        configured = str(configured).rstrip("/")
        if "://" in configured:
            return configured
        return Path(configured).expanduser().resolve().as_uri()
    db = sqlite_path(uri)
    if db:
        return (db.expanduser().resolve().parent / "artifacts").as_uri()
    if uri.split(":", 1)[0].split("+", 1)[0].lower() in DATABASE_SCHEMES:
        return (loft_home().resolve() / "artifacts").as_uri()
    return None


def artifact_env() -> dict[str, str]:
    """The environment MLflow's S3 artifact store needs beyond boto3's own: loft's S3 endpoint
    (``LOFT_S3_ENDPOINT_URL`` / ``s3.endpoint_url``) as ``MLFLOW_S3_ENDPOINT_URL``, unless that is
    set already."""
    endpoint = setting("LOFT_S3_ENDPOINT_URL", "s3.endpoint_url")
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        return {"MLFLOW_S3_ENDPOINT_URL": str(endpoint)}
    return {}


@contextlib.contextmanager
def _artifact_environment() -> Iterator[None]:
    """:func:`artifact_env` in ``os.environ`` for the duration of an upload (MLflow reads it
    there), restored afterwards."""
    extra = artifact_env()
    for k, v in extra.items():
        os.environ[k] = v
    try:
        yield
    finally:
        for k in extra:
            os.environ.pop(k, None)


def mlflow_client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` for ``uri`` (resolved as :func:`resolve_tracking_uri` does).

    The first call per store and process creates a SQLite store's tables (MLflow's migrations take
    a few seconds, once) under a file lock, so concurrent first runs do not race, and switches the
    database to WAL so the UI can read while a run writes.
    """
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    with _INIT_LOCK:
        if uri not in _INITIALISED:
            _prepare_store(uri)
            _INITIALISED.add(uri)
    return MlflowClient(tracking_uri=uri)


def _prepare_store(uri: str) -> None:
    db = sqlite_path(uri)
    if db is None:
        return
    from mlflow.tracking import MlflowClient

    db = db.expanduser()
    db.parent.mkdir(parents=True, exist_ok=True)
    first = not db.exists() or db.stat().st_size == 0
    with file_lock(db.with_name(f".{db.name}.init.lock")):
        _enable_wal(db)
        if first:
            _log.info("creating the MLflow tracking store %s (first use, a few seconds)", db)
        with _quiet_loggers("mlflow.store.db.utils", "alembic"):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _enable_wal(db: Path) -> None:
    """WAL lets readers (the UI, ``loft runs show``) work while a run writes; it is persistent."""
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(db, timeout=30)) as c,
    ):
        if str(c.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            c.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created with artifacts in ``<artifact root>/<name>``."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_location(uri)
        location = f"{root}/{_safe_dirname(name)}" if root else None
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except MlflowException as e:  # another process created it between our two calls
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


# ----------------------------------------------------------------------------- values and tags


@functools.lru_cache(maxsize=4096)
def clean_key(key: str) -> str:
    """A param/metric/tag key MLflow accepts on every OS: other characters become ``_``."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:MAX_KEY_LENGTH]


def param_value(value: Any, limit: int | None = None) -> str:
    """A param value as text: mappings and lists as compact JSON, cut to MLflow's length limit."""
    if limit is None:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    if isinstance(value, dict | list | tuple):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    if len(text) > limit:
        text = text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
    return text


def system_tags() -> dict[str, str]:
    """Where and with what a run ran: interpreter, library versions, host, git commit."""
    tags = {
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.cpu_count": str(os.cpu_count() or 0),
        "sys.hostname": socket.gethostname(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "loft",
    }
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    for pkg in SYSTEM_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"sys.{pkg}"] = importlib.metadata.version(pkg)
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ----------------------------------------------------------------------------- the tracker


class MlflowTracker:
    """A :class:`~loft.tracking.Tracker` writing to one MLflow run by explicit id."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        tracking_uri: str,
        experiment_id: str,
        logged_params: dict[str, str] | None = None,
        flush_interval_s: float = DEFAULT_FLUSH_S,
        max_pending: int = 1000,
    ) -> None:
        self.run_id: str | None = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.finished_status: str | None = None
        self._client = client
        self._run_id = run_id
        self._params: dict[str, str] = dict(logged_params or {})
        self._pending: list[tuple[str, float, int, int]] = []
        self._last_flush = time.monotonic()
        self._flush_failures = 0
        self._lock = threading.RLock()
        atexit.register(self._at_exit)

    # -- Tracker protocol

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        with self._lock:
            new: dict[str, str] = {}
            changed: dict[str, str] = {}
            for k, v in params.items():
                key, value = clean_key(k), param_value(v)
                old = self._params.get(key, new.get(key))
                if old is None:
                    new[key] = value
                elif old != value:
                    changed[key] = value
            items = [Param(k, v) for k, v in new.items()]
            for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self._run_id, params=chunk)
                self._params.update((p.key, p.value) for p in chunk)
            if changed:
                _log.warning(
                    "run %s: params are write-once in MLflow; keeping the first value of %s and "
                    "recording the new value as tag %s<key>",
                    self._run_id,
                    ", ".join(sorted(changed)),
                    PARAM_CHANGED_TAG,
                )
                self.set_tags({f"{PARAM_CHANGED_TAG}{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            if v is None:
                continue
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric {k!r} at step {step}: {v!r} is not a number") from None
            # plain tuples: the GC stops tracking them, so a long buffer adds no collection work
            batch.append((clean_key(k), value, ts, int(step)))
        with self._lock:
            self._pending.extend(batch)
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if due or len(self._pending) >= self.max_pending:
                self._flush_locked()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's tree (under ``artifact_path``, default: its own name)."""
        path = Path(path)
        if not path.exists():
            raise NotFoundError(f"cannot log artifact {path}: no such file or directory")
        try:
            with _artifact_environment():
                if path.is_dir():
                    self._client.log_artifacts(self._run_id, str(path), artifact_path or path.name)
                else:
                    self._client.log_artifact(self._run_id, str(path), artifact_path)
        except Exception as e:  # tracking trouble never stops training; the files stay on disk
            _log.warning("could not upload %s to the run's artifacts: %s", path, e)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        items = [RunTag(clean_key(k), param_value(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        with self._lock:
            for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self._run_id, tags=chunk)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics and end the run with ``status``; later calls do nothing."""
        check_status(status)
        with self._lock:
            if self.finished_status is not None:
                return
            self._flush_locked()
            try:
                self._client.set_terminated(self._run_id, status)
            except Exception as e:
                _log.warning("run %s: could not mark it %s: %s", self._run_id, status, e)
            self.finished_status = status
            atexit.unregister(self._at_exit)

    # -- extras

    def flush(self) -> None:
        """Write buffered metrics now (e.g. after an eval or a checkpoint)."""
        with self._lock:
            self._flush_locked()

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.finish(status_for_exception(exc_type))

    def _flush_locked(self) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        self._last_flush = time.monotonic()
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=[Metric(*m) for m in chunk])
            self._flush_failures = 0
        except Exception as e:  # keep training; retry at the next flush
            self._pending = (batch + self._pending)[-MAX_BUFFERED_METRICS:]
            self._flush_failures += 1
            if self._flush_failures in (1, 10) or self._flush_failures % 100 == 0:
                _log.warning(
                    "run %s: writing metrics to %s failed (%d times; %d values kept, retrying): %s",
                    self._run_id,
                    self.tracking_uri,
                    self._flush_failures,
                    len(self._pending),
                    e,
                )

    def _at_exit(self) -> None:
        """The process is exiting without ``finish``: keep the metrics, mark the run FAILED."""
        with contextlib.suppress(Exception):
            self.finish("FAILED")


def open_tracker(
    spec: TrackingSpec,
    *,
    run_name: str,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Tracker:
    """Start a run in ``spec.experiment`` (or continue ``resume_run_id``) and return its tracker.

    ``spec.uri`` of ``none``/``off`` gives a :class:`NullTracker`. A resumed run is set back to
    RUNNING and keeps its params; a ``resume_run_id`` the store does not have raises NotFoundError.
    """
    if spec.uri and spec.uri.strip().lower() in DISABLED_URIS:
        return NullTracker()
    uri = resolve_tracking_uri(spec.uri)
    client = mlflow_client(uri)
    run_tags = {**system_tags(), **(tags or {})}
    if resume_run_id:
        return _resume(client, uri, resume_run_id, run_tags)
    experiment_id = get_or_create_experiment(client, spec.experiment, uri)
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={clean_key(k): param_value(v) for k, v in run_tags.items()},
    )
    return MlflowTracker(
        client, run.info.run_id, tracking_uri=uri, experiment_id=str(experiment_id),
        flush_interval_s=flush_interval(),
    )  # fmt: skip


def flush_interval() -> float:
    """Seconds between metric writes: LOFT_TRACKING_FLUSH_S, else ``tracking.flush_s`` in
    LOFT_HOME/settings.yaml, else 5."""
    return positive_setting(
        "LOFT_TRACKING_FLUSH_S", "tracking.flush_s", DEFAULT_FLUSH_S, most=3600,
        expected="seconds above 0 and at most 3600, e.g. 5 or 0.5",
    )  # fmt: skip


def _resume(client: MlflowClient, uri: str, run_id: str, tags: dict[str, str]) -> MlflowTracker:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise NotFoundError(
            f"cannot resume MLflow run {run_id!r}: the tracking store {uri} has no such run",
            hint="Check tracking.uri / MLFLOW_TRACKING_URI point at the store the run was "
            "started with, or train without --resume to start a new run.",
        ) from None
    if run.info.lifecycle_stage == "deleted":
        client.restore_run(run_id)
    client.update_run(run_id, status="RUNNING")
    tracker = MlflowTracker(
        client,
        run_id,
        tracking_uri=uri,
        experiment_id=str(run.info.experiment_id),
        logged_params=dict(run.data.params),
        flush_interval_s=flush_interval(),
    )
    tracker.set_tags({**tags, "loft.resumed": "true"})
    return tracker
