"""Encryption of an existing LOFT_HOME: what is encrypted, key rotation, migration.

- :func:`status`: the configured KEK and how many registry files are encrypted (under which key)
  or still plaintext.
- :func:`rotate`: re-wrap every data key from the old KEK to a new one, rewriting only each
  file's 512-byte header (:func:`loft.core.crypto.rewrap`, crash-safe through its journal); the
  data is not re-encrypted. Resumable: a file the new KEK already wraps is skipped, so after a
  kill the same command finishes the job. Objects in the S3 registry are re-wrapped too (each
  re-uploaded with its new header).
- :func:`migrate`: encrypt every plaintext file of every version (per file: temp, fsync, rename),
  verify the version against its card (the digests are the plaintext's, so they do not change),
  and re-upload the version to the S3 registry when one is configured. Resumable the same way.

Each appends one entry to the audit trail (``encryption.rotate``, ``encryption.migrate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loft.core import crypto
from loft.core.errors import ConfigError
from loft.core.paths import loft_home
from loft.registry import card as cards
from loft.registry.files import should_encrypt

Progress = Callable[[int, int, str], None]  # (done, total, what)
TOMBSTONE = "DELETED.json"


def registry_root() -> Path:
    return loft_home() / "registry"


def version_dirs() -> Iterator[tuple[str, int, Path]]:
    """(name, version, folder) of every complete version folder under LOFT_HOME/registry."""
    root = registry_root()
    if not root.is_dir():
        return
    for model in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(model.iterdir(), key=lambda p: (len(p.name), p.name)):
            if folder.name.isdigit() and (folder / cards.CARD).is_file():
                yield model.name, int(folder.name), folder


def version_files(folder: Path) -> list[Path]:
    """The files of a version that are encrypted when a KEK is configured."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and should_encrypt(p.name)
    ]


def status() -> dict[str, Any]:
    """{enabled, key_id, provider, encrypted, plaintext, by_key, versions, covers}."""
    key = crypto.provider()
    by_key: dict[str, int] = {}
    plaintext, versions = 0, 0
    for _name, _version, folder in version_dirs():
        versions += 1
        for p in version_files(folder):
            if crypto.is_encrypted(p):
                kid = crypto.read_header(p).key_id
                by_key[kid] = by_key.get(kid, 0) + 1
            else:
                plaintext += 1
    return {
        "enabled": key is not None,
        "key_id": key.key_id if key else None,
        "provider": getattr(key, "source", type(key).__name__) if key else None,
        "home": str(loft_home()),
        "versions": versions,
        "encrypted": sum(by_key.values()),
        "plaintext": plaintext,
        "by_key": by_key,
        "covers": ["registry"],
    }


def _audit(action: str, details: dict[str, Any], actor: str | None) -> None:
    from loft.core import audit

    audit.append(audit.who(actor), action, str(registry_root()), details)


def rotate(
    new: crypto.KeyProvider,
    *,
    old: crypto.KeyProvider | None = None,
    progress: Progress | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Re-wrap every data key under LOFT_HOME/registry (and the S3 registry) from ``old`` (the
    configured KEK when None) to ``new``; {rewrapped, already, objects, old_key_id, new_key_id}."""
    old = old or crypto.provider()
    if old is None:
        raise ConfigError(
            "no key-encryption key is configured, so there is nothing to rotate from.",
            hint="Set LOFT_KEK_FILE to the current KEK (or encrypt first with `loft encryption "
            "migrate`).",
        )
    if old.key_id == new.key_id:
        raise ConfigError(
            f"the new KEK is the current one (key id {new.key_id}).",
            hint="Pass a new 32-byte key file: `head -c 32 /dev/urandom > new.kek`.",
        )
    files = [p for _n, _v, f in version_dirs() for p in version_files(f) if crypto.is_encrypted(p)]
    store = _remote()
    remote = list(store.encrypted_objects()) if store is not None else []
    total = len(files) + len(remote)
    rewrapped = already = objects = 0
    for i, path in enumerate(files):
        if crypto.rewrap(path, old, new):
            rewrapped += 1
        else:
            already += 1
        if progress:
            progress(i + 1, total, str(path))
    for j, key in enumerate(remote):
        if store.rewrap_object(key, old, new):  # type: ignore[union-attr]
            objects += 1
        if progress:
            progress(len(files) + j + 1, total, f"s3://{store.bucket}/{key}")  # type: ignore[union-attr]
    result = {
        "old_key_id": old.key_id,
        "new_key_id": new.key_id,
        "rewrapped": rewrapped,
        "already": already,
        "objects": objects,
    }
    _audit("encryption.rotate", result, actor)
    return result


def migrate(
    key: crypto.KeyProvider | None = None,
    *,
    progress: Progress | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Encrypt every plaintext file of every version with ``key`` (the configured KEK when None);
    {encrypted, already, versions, uploaded, key_id}. Each version is verified against its card
    afterwards (IntegrityError names a file whose plaintext changed)."""
    from loft.registry.store import _lock

    key = key or crypto.provider()
    if key is None:
        raise ConfigError(
            "no key-encryption key is configured; migrate encrypts with the configured one.",
            hint="Create one (`umask 077; head -c 32 /dev/urandom > /secure/loft.kek`), set "
            "LOFT_KEK_FILE to it, then run `loft encryption migrate` again.",
        )
    store = _remote()
    if store is not None:
        _download_missing()
    todo = [(n, v, f) for n, v, f in version_dirs()]
    plan = {(n, v): [p for p in version_files(f) if not crypto.is_encrypted(p)] for n, v, f in todo}
    total = sum(len(ps) for ps in plan.values())
    done = encrypted = already = uploaded = 0
    for name, version, folder in todo:
        paths = plan[(name, version)]
        already += len(version_files(folder)) - len(paths)
        if not paths:
            continue
        with _lock(name):
            for path in paths:
                if crypto.encrypt_file(path, key):
                    encrypted += 1
                done += 1
                if progress:
                    progress(done, total, str(path))
            card = cards.read_card(folder, ref=f"{name}:{version}")
            cards.verify_files(folder, card, ref=f"{name}:{version}")
            if store is not None:
                store.upload_version(name, version, folder, card)
                uploaded += 1
    result = {
        "key_id": key.key_id,
        "encrypted": encrypted,
        "already": already,
        "versions": len(todo),
        "uploaded": uploaded,
    }
    _audit("encryption.migrate", result, actor)
    return result


def _remote() -> Any:
    from loft.registry import objects

    return objects.remote()


def _download_missing() -> None:
    """Every live version's files on this machine (downloaded, verified), so the S3 registry's
    plaintext objects are migrated too."""
    from loft.registry.store import get_version, reader

    r = reader()
    for name in r.names():
        for version in r.versions(name):
            get_version(f"{name}:{version}", verify=False)


__all__ = ["migrate", "rotate", "status", "version_dirs", "version_files"]
