"""The registry's fast SQLite reader answers exactly what MLflow's client answers, and the read
commands no longer start MLflow (the timing is in bench/overheads.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_lora_adapter


@pytest.fixture
def registry_home(loft_home: Path, tiny_model: Path, tmp_path: Path) -> Path:
    """Two models: alpha with versions 1-3 (2 deleted through MLflow, aliases on 1 and 3, a
    traffic split to 1) and an empty registered model."""
    from loft import registry
    from loft.registry.store import client

    folder = make_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    for _ in range(3):
        registry.register(folder, name="alpha")
    registry.move_alias("alpha", "champion", 3, reason="test")
    registry.move_alias("alpha", "old", 1, reason="test")
    registry.set_split("alpha", 1, 0.2, reason="test")
    c = client()
    c.delete_model_version("alpha", "2")
    c.create_registered_model("empty")
    return loft_home


@pytest.mark.unit
def test_sqlite_reader_agrees_with_mlflow(registry_home: Path):
    from loft.registry.reader import MlflowReader, SqliteReader, fast_reader
    from loft.registry.store import client
    from loft.tracking import resolve_tracking_uri

    fast = fast_reader(resolve_tracking_uri(None))
    assert isinstance(fast, SqliteReader) and fast.workspaces
    stock = MlflowReader(client())
    assert fast.names() == stock.names() == ["alpha", "empty"]
    for name in ("alpha", "empty", "nope"):
        assert fast.aliases(name) == stock.aliases(name), name
        assert fast.versions(name) == stock.versions(name), name
        assert fast.aliases_and_tags(name) == stock.aliases_and_tags(name), name
    assert fast.versions("alpha") == [1, 3]  # the deleted version is gone for both
    assert fast.aliases("alpha") == {"champion": 3, "old": 1}
    assert fast.aliases("nope") is None
    aliases, tags = fast.aliases_and_tags("alpha")
    assert aliases == {"champion": 3, "old": 1} and json.loads(tags["loft.split"])["share"] == 0.2
    assert fast.aliases_and_tags("empty") == ({}, {})


@pytest.mark.unit
def test_other_stores_go_through_mlflow(tmp_path: Path):
    from loft.registry.reader import fast_reader, sqlite_path

    assert fast_reader("http://tracking:5000") is None
    assert fast_reader("postgresql://u@db/mlflow") is None
    assert fast_reader(f"sqlite:///{tmp_path}/absent.db") is None  # MLflow creates it
    (tmp_path / "other.db").write_bytes(b"")  # a SQLite file without MLflow's tables
    assert fast_reader(f"sqlite:///{tmp_path}/other.db") is None
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")


_READS = """
import json, sys
from loft.cli.main import main
for args in (["registry", "list", "--json"], ["registry", "show", "alpha@champion", "--json"],
             ["registry", "history", "alpha", "--json"]):
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "sqlalchemy"})))
"""


@pytest.mark.integration
def test_read_commands_do_not_start_mlflow(registry_home: Path):
    out = subprocess.run(
        [sys.executable, "-c", _READS], capture_output=True, text=True, check=True, timeout=120
    )
    *printed, modules = out.stdout.strip().splitlines()
    assert json.loads(modules) == []
    assert '"name": "alpha"' in "\n".join(printed)  # and they answered
