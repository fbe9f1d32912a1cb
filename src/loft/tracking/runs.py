"""Read runs back for the CLI and the portal: ``LOFT_HOME/runs/<run_id>/`` plus MLflow history,
and the command that serves the MLflow UI.

A run directory holds ``resolved.yaml`` and ``run_summary.json`` (rewritten atomically as the run
goes). A directory with a config but no summary yet is ``running`` (a ``RUNNING`` marker file says
so) or was cut off before its first summary (``incomplete``); directories with neither are ignored.
Summary statuses are the trainer's (``running``, ``completed``, ``failed``, ``interrupted``),
passed through as written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from loft.core.errors import NotFoundError
from loft.core.paths import runs_dir
from loft.tracking.mlflow_tracker import (
    artifact_env,
    artifact_location,
    mlflow_client,
    resolve_tracking_uri,
)

_log = logging.getLogger(__name__)

SUMMARY_FILE = "run_summary.json"
CONFIG_FILE = "resolved.yaml"
RUNNING_MARKER = "RUNNING"
SUMMARY_FIELDS = (
    "run_id",
    "status",
    "method",
    "base_model",
    "dataset_fingerprint",
    "train_tokens",
    "steps",
    "wall_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "final_train_loss",
    "eval_loss",
    "output_path",
    "registered",  # the registry version the run became (name:version)
)


def list_runs(limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` runs (by start time), one flat dict each with :data:`SUMMARY_FIELDS`,
    ``path`` and, when tracked, ``mlflow_run_id``."""
    rows: list[dict[str, Any]] = []
    for d in _run_dirs():
        row = _row(d)
        if row is not None:
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def show_run(run_id_or_path: str | Path, *, metrics: bool = True) -> dict[str, Any]:
    """Everything about one run: its summary fields, ``config`` (resolved.yaml) and ``metrics``.

    ``metrics`` maps each metric to its per-step history ``[{step, value, timestamp}]``, read from
    MLflow when the summary names an ``mlflow_run_id``; ``mlflow`` holds that run's status, params
    and store. If the store cannot be read, ``metrics_error`` says why and ``metrics`` is empty.
    The run may be named by id, unique id prefix, MLflow run id or directory path. With
    ``metrics=False`` the tracking store is not read (nor mlflow imported): ``metrics`` is empty.
    """
    d = find_run_dir(run_id_or_path)
    summary = _read_json(d / SUMMARY_FILE) or {}
    config = _read_yaml(d / CONFIG_FILE)
    out: dict[str, Any] = {**(_row(d) or {"run_id": d.name, "path": str(d)}), **summary}
    out["config"] = config
    out["metrics"] = {}
    mlflow_run_id = summary.get("mlflow_run_id")
    if mlflow_run_id and metrics:
        uri = summary.get("tracking_uri") or _config_tracking_uri(config)
        try:
            history = metric_history(str(mlflow_run_id), uri)
        except Exception as e:  # the summary stays useful when the store is gone or unreachable
            out["metrics_error"] = f"{type(e).__name__}: {e}"
        else:
            out["metrics"] = history.pop("metrics")
            out["mlflow"] = history
    return out


def find_run_dir(ref: str | Path) -> Path:
    """Resolve a run directory path, run id, unique run id prefix or MLflow run id."""
    path = Path(ref).expanduser()
    if path.is_file() and path.name in (SUMMARY_FILE, CONFIG_FILE):
        path = path.parent
    if path.is_dir() and _is_run_dir(path):
        return path.resolve()
    ref = str(ref)
    dirs = _run_dirs()
    exact = [d for d in dirs if d.name == ref]
    if exact:
        return exact[0]
    prefixed = [d for d in dirs if d.name.startswith(ref)] if ref else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        names = ", ".join(d.name for d in prefixed[:10])
        raise NotFoundError(
            f"run {ref!r} is ambiguous: it starts {len(prefixed)} run ids ({names})",
            hint="Give more of the run id.",
        )
    for d in dirs:
        summary = _read_json(d / SUMMARY_FILE)
        if summary and summary.get("mlflow_run_id") == ref:
            return d
    recent = ", ".join(d.name for d in dirs[:10]) or "none yet"
    raise NotFoundError(
        f"no run {ref!r} in {runs_dir()} (recent runs: {recent})",
        hint="`loft runs list` shows every run; a run directory path works too.",
    )


def delete_run(ref: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Delete a run's directory (checkpoints, outputs) and mark its MLflow run deleted.

    Registered versions are copies under LOFT_HOME/registry and are not touched. A run whose
    summary still says "running" is refused unless ``force`` (its process may be alive; a run
    killed without a chance to say so looks the same)."""
    from loft.core.errors import ConfigError
    from loft.core.paths import remove_dir

    d = find_run_dir(ref)
    summary = _read_json(d / SUMMARY_FILE) or {}
    status = summary.get("status") or ("running" if (d / RUNNING_MARKER).exists() else None)
    if status == "running" and not force:
        raise ConfigError(
            f"run {d.name} says it is still running; deleting it under a live process would "
            "lose its work.",
            hint="Stop it first (Ctrl-C or SIGTERM saves a checkpoint). If its process is gone "
            "(killed or crashed), pass --force.",
        )
    remove_dir(d)
    out: dict[str, Any] = {
        "run_id": d.name,
        "path": str(d),
        "registered": summary.get("registered"),
    }
    mlflow_run_id = summary.get("mlflow_run_id")
    if mlflow_run_id:
        uri = summary.get("tracking_uri") or None
        try:
            mlflow_client(uri).delete_run(mlflow_run_id)
            out["mlflow_run_deleted"] = mlflow_run_id
        except Exception as e:  # the directory is gone either way; say what is left
            out["mlflow_error"] = f"{type(e).__name__}: {e}"
    return out


def metric_history(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """A run's status, params and every metric's per-step history, read from the tracking store."""
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    metrics = {
        key: [
            {"step": m.step, "value": m.value, "timestamp": m.timestamp}
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
        for key in sorted(run.data.metrics)
    }
    return {
        "run_id": run_id,
        "tracking_uri": resolve_tracking_uri(uri),
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "metrics": metrics,
    }


def ui_command(
    uri: str, *, host: str = "127.0.0.1", port: int = 5000
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that serve the MLflow UI over tracking store ``uri``.

    Creates the store's tables first. MLflow's GenAI job runner (seven extra processes) is off
    unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise.
    """
    mlflow_client(uri)
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    argv += ["--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_location(uri)
    if root is not None:
        if root.startswith("file://"):
            Path(urlsplit(root).path).mkdir(parents=True, exist_ok=True)
        argv += ["--default-artifact-root", root, "--no-serve-artifacts"]
    env = dict(os.environ) | artifact_env()
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return argv, env


def _run_dirs() -> list[Path]:
    """Run directories, newest first (by when resolved.yaml, else the summary, was written)."""
    root = runs_dir()
    found = []
    for d in root.iterdir():
        if d.name.startswith(".") or not d.is_dir() or not _is_run_dir(d):
            continue
        marker = d / CONFIG_FILE if (d / CONFIG_FILE).exists() else d / SUMMARY_FILE
        try:
            found.append((marker.stat().st_mtime, d.name, d))
        except OSError:
            continue
    return [d for _, _, d in sorted(found, reverse=True)]


def _is_run_dir(d: Path) -> bool:
    return (d / SUMMARY_FILE).is_file() or (d / CONFIG_FILE).is_file()


def _row(d: Path) -> dict[str, Any] | None:
    summary = _read_json(d / SUMMARY_FILE)
    if summary is not None:
        row = {f: summary.get(f) for f in SUMMARY_FIELDS}
        row["run_id"] = row["run_id"] or d.name
        if summary.get("mlflow_run_id"):
            row["mlflow_run_id"] = summary["mlflow_run_id"]
    else:
        config = _read_yaml(d / CONFIG_FILE)
        if config is None:
            return None
        row = dict.fromkeys(SUMMARY_FIELDS)
        row["run_id"] = d.name
        row["status"] = "running" if (d / RUNNING_MARKER).exists() else "incomplete"
        row["method"] = config.get("method")
        row["base_model"] = config.get("base_model")
        row["output_path"] = str(d)
    row["path"] = str(d)
    return row


def _config_tracking_uri(config: dict[str, Any] | None) -> str | None:
    tracking = (config or {}).get("tracking")
    return tracking.get("uri") if isinstance(tracking, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _log.warning("skipping unreadable %s: %s", path, e)
        return None
    return doc if isinstance(doc, dict) else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError) as e:
        _log.warning("skipping unreadable %s: %s", path, e)
        return None
    return doc if isinstance(doc, dict) else None
