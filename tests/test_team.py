"""The team deployment on a real PostgreSQL server (issue 16): tracking and the registry's
names, versions and aliases in PostgreSQL through MLflow's SQLAlchemy store, artifacts under
LOFT_HOME (never ./mlruns wherever a process starts), or in the S3-compatible server."""

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


@pytest.mark.integration
@pytest.mark.slow
def test_registry_files_in_s3_are_verified_on_every_machine(
    tmp_path, tiny_model, loft_home, s3_server, s3_bucket, monkeypatch, _session_home
):
    from helpers import linked_home
    from loft import registry
    from loft.core.config import load_config
    from loft.core.errors import IntegrityError
    from loft.train import train
    from test_train import tiny_config

    # two machines: their own LOFT_HOME, one tracking store and one bucket between them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared-mlflow.db'}")
    monkeypatch.setenv("LOFT_REGISTRY_URL", f"s3://{s3_bucket}/registry")
    monkeypatch.setenv("LOFT_ARTIFACTS_URL", f"s3://{s3_bucket}/mlflow")  # and the run artifacts
    cfg = tiny_config(tmp_path, tiny_model, max_steps=2)
    cfg["run_name"] = "shared"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train(load_config(path), progress=False).summary["registered"] == "shared:1"
    s3 = s3_server.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert "registry/shared/1/card.json" in keys
    assert "registry/shared/1/adapter_model.safetensors" in keys
    run = registry.get_version("shared:1").card["lineage"]["run"]["mlflow_run_id"]
    arts = [k for k in keys if k.startswith("mlflow/")]
    logged = {"resolved.yaml", "run_summary.json", "lineage.json"}
    assert {k.rsplit("/", 1)[1] for k in arts} >= logged
    assert all(f"/{run}/artifacts/" in k for k in arts), arts
    from loft.tracking import mlflow_client

    # MLflow's own client lists them from the bucket, given the endpoint as MLflow spells it
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint)
    client = mlflow_client()
    assert client.get_run(run).info.artifact_uri.startswith(f"s3://{s3_bucket}/mlflow/")
    listed = {a.path for a in client.list_artifacts(run)}
    assert logged <= listed
    here = registry.get_version("shared:1")

    (tmp_path / "second").mkdir()
    second = linked_home(tmp_path / "second", _session_home)
    monkeypatch.setenv("LOFT_HOME", str(second))
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    there = registry.get_version("shared:1")  # downloaded, every file checked against the card
    assert there.path == second / "registry" / "shared" / "1" and there.path.is_dir()
    for rec in here.card["files"]:
        assert (there.path / rec["path"]).read_bytes() == (here.path / rec["path"]).read_bytes()
    from loft.registry.evaluations import make_entries

    registry.record_evaluation("shared:1", make_entries({"exact_match": 0.5}, on=None,
                                                        source="eval"))  # fmt: skip
    monkeypatch.setenv("LOFT_HOME", str(loft_home))  # the first machine sees that evaluation
    assert registry.get_version("shared:1").card["metrics"]["exact_match"] == 0.5

    body = s3.get_object(Bucket=s3_bucket, Key="registry/shared/1/adapter_model.safetensors")
    data = bytearray(body["Body"].read())
    data[-1] ^= 1  # one bit changed in the bucket after registration
    s3.put_object(Bucket=s3_bucket, Key="registry/shared/1/adapter_model.safetensors", Body=data)
    (tmp_path / "third").mkdir()
    third = linked_home(tmp_path / "third", _session_home)
    monkeypatch.setenv("LOFT_HOME", str(third))
    with pytest.raises(IntegrityError, match=r"adapter_model.safetensors does not match its card"):
        registry.get_version("shared:1")
    assert not (third / "registry" / "shared" / "1").exists()  # nothing half-downloaded


SUITES = (  # test_serve_keys.py touches neither tracking nor the registry
    "tests/test_registry.py",
    "tests/test_promotion.py",
    "tests/test_serve_api.py",
    "tests/test_serve_engine.py",
)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.split("/")[-1].removesuffix(".py"))
def test_the_registry_promotion_and_serving_suites_pass_on_postgresql_and_s3(
    suite, pg_server, s3_server, request
):
    """Each suite in its own pytest process, as a team runs loft: tracking and the registry's
    names, versions and aliases in a fresh PostgreSQL database, its files in a fresh bucket."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import psycopg

    from s3_server import CREDENTIALS

    name = re.sub(r"[^a-z0-9]", "-", suite.split("/")[-1].lower()).strip("-")
    url = pg_server.new_database(name.replace("-", "_"))
    bucket = s3_server.new_bucket(f"team-{name}")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        **CREDENTIALS,
        "LOFT_TEST_TRACKING_URI": "postgresql+psycopg://" + url.split("://", 1)[1],
        "LOFT_REGISTRY_URL": f"s3://{bucket}/registry",
        "LOFT_S3_ENDPOINT_URL": s3_server.endpoint,
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("LOFT_HOME", None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite],
        env=env, cwd=root, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout) and " failed" not in r.stdout
    with psycopg.connect(url) as conn:  # it ran on the server and the bucket, not SQLite
        versions = conn.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    objects = s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    assert versions > 0 and objects > 0
