"""Hashing and MANIFEST.json: the completion marker and integrity record of a stored model dir.

A stored model directory is complete when its MANIFEST.json exists (it is written last). The
manifest records the sha256 and size of every file in the directory; ``verify_manifest`` recomputes
them and raises IntegrityError naming the first file that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft import __version__
from loft.core.errors import IntegrityError
from loft.core.paths import atomic_write_json

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """sha256 of a file's plaintext, streamed: a file encrypted at rest (loft.core.crypto) is
    hashed as it decrypts, chunk by chunk in memory, so digests mean the same either way."""
    from loft.core.crypto import is_encrypted, plain_digest

    if is_encrypted(path):
        return plain_digest(path)[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def combined_digest(files: dict[str, str]) -> str:
    """One digest over many files: sha256 of the sorted ``relpath:sha256\\n`` lines."""
    lines = "".join(f"{rel}:{files[rel]}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative paths of every regular file under ``root``, skipping hidden entries and MANIFEST."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def weight_files(root: Path) -> list[str]:
    """Relative paths of the safetensors weight files in a model dir (top level, sorted)."""
    return sorted(p.name for p in root.glob(f"*{WEIGHT_SUFFIX}") if p.is_file())


def pickle_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def hash_weights(root: Path) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in weight_files(root)}


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (None when it is too short to have one); a file
    encrypted at rest has only the chunks holding its header decrypted (loft.core.crypto)."""
    from loft.core.crypto import is_encrypted, read_range, require_provider

    if is_encrypted(path):
        key = require_provider(path)
        raw = read_range(path, 0, 8, key)
        if len(raw) < 8:
            return None
        (n,) = struct.unpack("<Q", raw)
        return json.loads(read_range(path, 8, n, key))
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return None
        (n,) = struct.unpack("<Q", raw)
        return json.loads(f.read(n))


def safetensors_params(root: Path) -> int:
    """Parameter count read from the safetensors headers (no tensor data is loaded)."""
    total = 0
    for rel in weight_files(root):
        header = safetensors_header(root / rel)
        if header is None:
            continue
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in meta.get("shape", []):
                count *= int(dim)
            total += count
    return total


def write_manifest(
    root: Path, *, name: str, source: str, extra: dict[str, Any] | None = None
) -> dict:
    """Hash every file in ``root`` and write MANIFEST.json last. Returns the manifest dict."""
    files = {rel: sha256_file(root / rel) for rel in list_files(root)}
    weights = {rel: files[rel] for rel in weight_files(root)}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "source": source,
        "files": files,
        "sizes": {rel: (root / rel).stat().st_size for rel in files},
        "weights": sorted(weights),
        "sha256": combined_digest(weights),
        "loft_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path, *, hint: str) -> dict[str, Any] | None:
    """The parsed MANIFEST.json of ``root``, or None if there is none."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is unreadable or not valid JSON ({e})", hint=hint) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise IntegrityError(
            f"{path} has no 'files' mapping; it was not written by loft", hint=hint
        )
    return doc


def verify_manifest(root: Path, manifest: dict[str, Any], *, hint: str) -> dict[str, str]:
    """Recompute sha256 of every file listed in the manifest; return the weight-file hashes.

    Raises IntegrityError naming the file when one is missing, truncated, changed, or when a
    weight file is present that the manifest does not list.
    """
    files: dict[str, str] = manifest["files"]
    sizes: dict[str, int] = manifest.get("sizes", {})
    listed_weights = {rel for rel in files if rel.endswith(WEIGHT_SUFFIX)}
    extra = sorted(set(weight_files(root)) - listed_weights)
    if extra:
        raise IntegrityError(
            f"{root}: weight file(s) {', '.join(extra)} are not listed in {MANIFEST}", hint=hint
        )
    for rel in sorted(files):
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (listed in {root / MANIFEST})", hint=hint)
        size = path.stat().st_size
        if rel in sizes and size != sizes[rel]:
            kind = "truncated" if size < sizes[rel] else "larger than recorded"
            raise IntegrityError(
                f"{path} is {kind}: {size} bytes, {MANIFEST} records {sizes[rel]}", hint=hint
            )
        digest = sha256_file(path)
        if digest != files[rel]:
            raise IntegrityError(
                f"{path} has sha256 {digest[:16]}…, but {MANIFEST} records {files[rel][:16]}…; "
                "the file was modified or corrupted",
                hint=hint,
            )
    return {rel: files[rel] for rel in sorted(listed_weights)}
