"""`loft encryption status / migrate / rotate` on a LOFT_HOME with registered versions: migration
encrypts every plaintext file with digests unchanged, rotation re-wraps headers only, both resume
after an interruption, both are audited; the S3 registry's objects follow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import make_lora_adapter, run_cli

WEIGHTS = "adapter_model.safetensors"


class Interrupted(Exception):
    pass


def write_kek(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def stop_after(n: int):
    def progress(done: int, _total: int, _what: str) -> None:
        if done >= n:
            raise Interrupted  # as a kill between two files would

    return progress


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(root / f"a{i}", tiny_model, seed=i) for i in (1, 2)]


def status(capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert run_cli("encryption", "status", "--json") == 0
    return json.loads(capsys.readouterr().out)


def registry_files(home: Path) -> list[Path]:
    from loft.registry.encryption import version_dirs, version_files

    return [p for _n, _v, f in version_dirs() for p in version_files(f)]


@pytest.mark.unit
def test_migrate_then_rotate_resumably(
    adapters: list[Path], loft_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from loft import registry
    from loft.core import audit, crypto
    from loft.core.errors import IntegrityError
    from loft.registry.encryption import migrate, rotate

    monkeypatch.delenv("LOFT_KEK_FILE", raising=False)
    monkeypatch.delenv("LOFT_KEY_PROVIDER", raising=False)
    for folder in adapters:
        registry.register(folder, name="bot")
    cards = {v: registry.get_version(f"bot:{v}").card["files"] for v in (1, 2)}
    s = status(capsys)
    assert s["enabled"] is False and s["encrypted"] == 0 and s["plaintext"] >= 4
    assert run_cli("encryption", "migrate") == 2  # no KEK: a ConfigError, exit code 2

    old = write_kek(tmp_path / "old.kek")
    monkeypatch.setenv("LOFT_KEK_FILE", str(old))
    total = s["plaintext"]
    with pytest.raises(Interrupted):  # killed after the first file
        migrate(progress=stop_after(1))
    s = status(capsys)
    assert (s["encrypted"], s["plaintext"]) == (1, total - 1)
    assert run_cli("encryption", "migrate", "-q") == 0  # resumes
    s = status(capsys)
    old_id = crypto.load_kek(old).key_id
    assert s == {**s, "enabled": True, "key_id": old_id, "encrypted": total, "plaintext": 0}
    assert s["by_key"] == {old_id: total}
    for v in (1, 2):  # digests unchanged: still the plaintext's, still verified
        assert registry.verify(f"bot:{v}").card["files"] == cards[v]
    weights = (adapters[0] / WEIGHTS).read_bytes()
    for p in registry_files(loft_home):
        assert crypto.is_encrypted(p)
        assert weights[-64:] not in p.read_bytes()
    assert not [p for p in (loft_home / "registry").rglob(".*") if p.is_file()
                and p.name != ".lock"]  # no temp file left  # fmt: skip

    new = write_kek(tmp_path / "new.kek")
    bodies = {p: p.read_bytes() for p in registry_files(loft_home)}
    with pytest.raises(Interrupted):  # killed after two files
        rotate(crypto.load_kek(new), progress=stop_after(2))
    new_id = crypto.load_kek(new).key_id
    assert sorted(status(capsys)["by_key"].values()) == [2, total - 2]
    assert run_cli("encryption", "rotate", "--new-kek-file", str(new), "-q") == 0  # resumes
    for p, before in bodies.items():  # only the headers changed
        after = p.read_bytes()
        assert after[crypto.HEADER_SIZE :] == before[crypto.HEADER_SIZE :]
        assert crypto.read_header(p).key_id == new_id
    wrong_key = "(?s)is encrypted with key-encryption key.*finish a rotation"
    with pytest.raises(IntegrityError, match=wrong_key):
        registry.verify("bot:1")  # the old KEK no longer opens anything
    monkeypatch.setenv("LOFT_KEK_FILE", str(new))
    assert registry.verify("bot:2").card["files"] == cards[2]
    assert status(capsys)["by_key"] == {new_id: total}
    assert run_cli("encryption", "rotate", "--new-kek-file", str(new)) == 2  # same key: refused

    entries = audit.read(limit=10, action="encryption.")
    assert [e["action"] for e in entries] == ["encryption.rotate", "encryption.migrate"]
    assert entries[0]["details"]["old_key_id"] == old_id
    assert entries[0]["details"]["new_key_id"] == new_id
    assert entries[1]["details"]["key_id"] == old_id


@pytest.mark.unit
def test_kek_problems_are_clear_cli_errors(
    loft_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    loose = write_kek(tmp_path / "loose.kek")
    loose.chmod(0o644)
    monkeypatch.setenv("LOFT_KEK_FILE", str(loose))
    assert run_cli("encryption", "status") == 2
    err = capsys.readouterr().err
    assert "every user" in err and "chmod 600" in err and "Traceback" not in err


@pytest.mark.integration
def test_rotate_and_migrate_reach_the_s3_registry(
    adapters: list[Path], loft_home: Path, tmp_path: Path, s3_server, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from loft import registry
    from loft.core import crypto

    monkeypatch.setenv("LOFT_REGISTRY_URL", f"s3://{s3_bucket}/registry")
    monkeypatch.delenv("LOFT_KEK_FILE", raising=False)
    registry.register(adapters[0], name="remote")  # plaintext, before encryption was on
    s3 = s3_server.client()
    key = f"registry/remote/1/{WEIGHTS}"

    def body() -> bytes:
        return s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    assert not crypto.is_encrypted_bytes(body())
    old, new = write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")
    monkeypatch.setenv("LOFT_KEK_FILE", str(old))
    assert run_cli("encryption", "migrate", "-q") == 0
    assert crypto.read_header_bytes(body()).key_id == crypto.load_kek(old).key_id
    assert run_cli("encryption", "rotate", "--new-kek-file", str(new), "-q") == 0
    assert crypto.read_header_bytes(body()).key_id == crypto.load_kek(new).key_id
    plain = (adapters[0] / WEIGHTS).read_bytes()
    assert crypto.decrypt_bytes(body(), crypto.load_kek(new)) == plain
