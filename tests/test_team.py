"""The team deployment on a real PostgreSQL server (issue 16): tracking and the registry's
names, versions and aliases in PostgreSQL through MLflow's SQLAlchemy store, artifacts under
LOFT_HOME (never ./mlruns wherever a process starts)."""

from __future__ import annotations

import pytest
import yaml


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_registers_and_promotes_on_a_postgresql_tracking_store(
    tmp_path, tiny_model, loft_home, pg_url, monkeypatch
):
    import psycopg

    from loft import registry
    from loft.core.config import load_config
    from loft.train import train
    from test_train import tiny_config

    tracking = "postgresql+psycopg://" + pg_url.split("://", 1)[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, tiny_model, max_steps=2)
    cfg["run_name"] = "team"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), progress=False)
    assert result.summary["registered"] == "team:1"
    registry.move_alias("team", "champion", 1)
    mv = registry.get_version("team@champion")  # files verified against the card's sha256
    assert (mv.name, mv.version, mv.aliases) == ("team", 1, ["champion"])
    with psycopg.connect(pg_url) as conn:  # the metadata is in the server, not a SQLite file
        assert conn.execute("SELECT name FROM registered_models").fetchall() == [("team",)]
        runs = conn.execute("SELECT artifact_uri FROM runs").fetchall()
    root = (loft_home.resolve() / "artifacts").as_uri()
    assert runs and all(uri.startswith(root) for (uri,) in runs)
    assert not (loft_home / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
