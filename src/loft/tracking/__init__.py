"""Experiment tracking: the Tracker protocol the trainer sees, a null tracker, the MLflow tracker.

Importing this package is cheap; mlflow is imported only when a store is first used.
"""

from loft.tracking.base import NullTracker, Tracker
from loft.tracking.mlflow_tracker import (
    MlflowTracker,
    artifact_location,
    default_tracking_uri,
    get_or_create_experiment,
    mlflow_client,
    open_tracker,
    resolve_tracking_uri,
    system_tags,
)
from loft.tracking.runs import delete_run, list_runs, metric_history, show_run, ui_command

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "artifact_location",
    "default_tracking_uri",
    "delete_run",
    "get_or_create_experiment",
    "list_runs",
    "metric_history",
    "mlflow_client",
    "open_tracker",
    "resolve_tracking_uri",
    "show_run",
    "system_tags",
    "ui_command",
]
