"""Model registry: versions with lineage cards and sha256s, aliases, traffic splits, history and
rollback.

Built on MLflow's Model Registry (same tracking URI as runs); files under LOFT_HOME/registry.
Importing this package is cheap; mlflow is imported only when the store is first used.
"""

from loft.registry.aliases import history, move_alias, rollback
from loft.registry.names import parse_ref
from loft.registry.splits import clear_split, get_split, set_split
from loft.registry.store import (
    ModelVersion,
    delete_version,
    diff,
    get_version,
    list_models,
    mark_degraded,
    record_evaluation,
    register,
    verify,
    versions_built_on,
)

__all__ = [
    "ModelVersion",
    "clear_split",
    "delete_version",
    "diff",
    "get_split",
    "get_version",
    "history",
    "list_models",
    "mark_degraded",
    "move_alias",
    "parse_ref",
    "record_evaluation",
    "register",
    "rollback",
    "set_split",
    "verify",
    "versions_built_on",
]
