"""Reading the registry's names, versions and aliases without starting MLflow, where that is safe.

Every ``loft registry`` read (list, show, history, resolving ``name@alias``) needs only names,
version numbers and aliases; the server's routing also needs a model's tags (its traffic split).
Through MLflow's client that costs ~2 s before the first query (importing mlflow and its
SQLAlchemy store; bench/overheads.py measures it). On the default embedded store, a SQLite file,
the same facts are read here with the standard library's ``sqlite3``, read-only, from MLflow's own
tables (``registered_models``, ``model_versions``, ``registered_model_aliases``,
``registered_model_tags``), honouring what MLflow's queries honour: soft-deleted versions are
skipped and, when the schema has workspaces, only the default one is read. Any other store
(PostgreSQL, an HTTP tracking server), a schema this code does not recognise, or a database
file that does not exist yet goes through MLflow's client. Writes always go through MLflow.
tests/test_registry_reader.py checks both readers give the same answers.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

DELETED_STAGE = "Deleted_Internal"  # MLflow's soft-delete marker for model versions
_TABLES = {
    "registered_models",
    "model_versions",
    "registered_model_aliases",
    "registered_model_tags",
}


class RegistryReader(Protocol):
    def names(self) -> list[str]: ...

    def aliases(self, name: str) -> dict[str, int] | None:
        """{alias: version} of a registered model; None when no model has that name."""
        ...

    def versions(self, name: str) -> list[int]:
        """Live (not deleted) version numbers, ascending."""
        ...

    def aliases_and_tags(self, name: str) -> tuple[dict[str, int], dict[str, str]] | None:
        """({alias: version}, {tag: value}) of a registered model in one read (the server's
        routing needs both on every refresh); None when no model has that name."""
        ...


class SqliteReader:
    """MLflow's registry tables in a SQLite file, read-only."""

    def __init__(self, path: Path, workspaces: bool) -> None:
        self.path = path
        self.workspaces = workspaces

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(_ro(self.path), uri=True, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def _where(self) -> str:
        return " AND workspace = 'default'" if self.workspaces else ""

    def names(self) -> list[str]:
        with self._db() as db:
            rows = db.execute(f"SELECT name FROM registered_models WHERE 1=1{self._where()}")
            return sorted(r[0] for r in rows)

    def aliases(self, name: str) -> dict[str, int] | None:
        with self._db() as db:
            return self._aliases(db, name)

    def _aliases(self, db: sqlite3.Connection, name: str) -> dict[str, int] | None:
        found = db.execute(
            f"SELECT 1 FROM registered_models WHERE name = ?{self._where()}", (name,)
        ).fetchone()
        if found is None:
            return None
        rows = db.execute(
            f"SELECT alias, version FROM registered_model_aliases WHERE name = ?{self._where()}",
            (name,),
        )
        return {alias: int(version) for alias, version in rows}

    def aliases_and_tags(self, name: str) -> tuple[dict[str, int], dict[str, str]] | None:
        with self._db() as db:
            aliases = self._aliases(db, name)
            if aliases is None:
                return None
            rows = db.execute(
                f"SELECT key, value FROM registered_model_tags WHERE name = ?{self._where()}",
                (name,),
            )
            return aliases, {key: value for key, value in rows}

    def versions(self, name: str) -> list[int]:
        with self._db() as db:
            rows = db.execute(
                f"SELECT version FROM model_versions WHERE name = ? AND "
                f"(current_stage IS NULL OR current_stage != ?){self._where()}",
                (name, DELETED_STAGE),
            )
            return sorted(int(r[0]) for r in rows)


class MlflowReader:
    """The same answers through MLflow's client (any store MLflow supports)."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def names(self) -> list[str]:
        out: list[str] = []
        token: str | None = None
        while True:
            page = self.c.search_registered_models(max_results=1000, page_token=token)
            out += [rm.name for rm in page]
            token = page.token
            if not token:
                return sorted(out)

    def _model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.c.get_registered_model(name)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise

    def aliases(self, name: str) -> dict[str, int] | None:
        rm = self._model(name)
        if rm is None:
            return None
        return {alias: int(v) for alias, v in (rm.aliases or {}).items()}

    def aliases_and_tags(self, name: str) -> tuple[dict[str, int], dict[str, str]] | None:
        rm = self._model(name)  # one get_registered_model answers both
        if rm is None:
            return None
        aliases = {alias: int(v) for alias, v in (rm.aliases or {}).items()}
        return aliases, dict(rm.tags or {})

    def versions(self, name: str) -> list[int]:
        out: list[int] = []
        token: str | None = None
        while True:
            page = self.c.search_model_versions(
                f"name = '{name}'", max_results=1000, page_token=token
            )
            out += [int(mv.version) for mv in page]
            token = page.token
            if not token:
                return sorted(out)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI, as SQLAlchemy reads it (``sqlite:////abs/x.db``,
    ``sqlite:///rel/x.db``); None for any other store or an in-memory one."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = unquote(uri[len(prefix) :].split("?", 1)[0])
    return Path(path).resolve() if path and path != ":memory:" else None


def _ro(path: Path) -> str:
    return f"{path.as_uri()}?mode=ro"


def fast_reader(uri: str) -> SqliteReader | None:
    """A SqliteReader for ``uri`` when it is a SQLite file whose registry tables this module
    knows; None when MLflow's client must answer (it also creates a store that is missing)."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return None
    try:
        conn = sqlite3.connect(_ro(path), uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables >= _TABLES:
            return None
        columns = {
            table: {r[1] for r in conn.execute(f"PRAGMA table_info({table})")} for table in _TABLES
        }
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    needed = {
        "registered_models": {"name"},
        "model_versions": {"name", "version", "current_stage"},
        "registered_model_aliases": {"alias", "version", "name"},
        "registered_model_tags": {"key", "value", "name"},
    }
    if any(not cols <= columns[t] for t, cols in needed.items()):
        return None
    workspaces = all("workspace" in columns[t] for t in _TABLES)
    return SqliteReader(path, workspaces)
