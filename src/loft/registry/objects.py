"""Registry files in S3-compatible object storage (AWS S3, MinIO, Ceph, ...), for a team whose
machines share one registry.

Set ``LOFT_REGISTRY_URL`` (or ``registry.url`` in LOFT_HOME/settings.yaml) to ``s3://BUCKET/PREFIX``
and, for anything but AWS itself, ``LOFT_S3_ENDPOINT_URL`` (``s3.endpoint_url``) to the server, as a
MinIO user sets boto3's endpoint; credentials come from boto3's usual chain (environment, shared
files, instance roles). A version lives at ``PREFIX/NAME/VERSION/``: its files first, its
``card.json`` last (the completion marker, as on disk). Each machine keeps a verified copy under
``LOFT_HOME/registry``: a version is downloaded into a temporary folder, every file checked against
the sha256 its card lists while it streams (a file encrypted at rest, by decrypting it in memory
after the download: the card records the plaintext's digest), and renamed into place only when
all match; a mismatch names the object and leaves nothing behind. The card (evaluations, flags)
is re-read from the bucket each time a version is opened, so what one machine records the others
see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loft.core.crypto import (
    KeyProvider,
    is_encrypted,
    is_encrypted_bytes,
    plain_digest,
    rewrap_bytes,
)
from loft.core.errors import ConfigError, IntegrityError
from loft.core.paths import atomic_dir, atomic_write_bytes

CARD = "card.json"
CHUNK = 8 << 20


def remote() -> S3Registry | None:
    """The configured object store, or None (files on local disk only)."""
    from loft.core.settings import setting

    url = setting("LOFT_REGISTRY_URL", "registry.url")
    if not url:
        return None
    url = str(url)
    if not url.startswith("s3://"):
        raise ConfigError(
            f"registry.url {url!r}: only s3:// URLs are understood (S3, MinIO and other "
            "S3-compatible servers)",
            hint="Unset LOFT_REGISTRY_URL to keep registry files under LOFT_HOME.",
        )
    return S3Registry(url, setting("LOFT_S3_ENDPOINT_URL", "s3.endpoint_url"))


class S3Registry:
    def __init__(self, url: str, endpoint: str | None = None) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"registry.url {url!r}: no bucket (s3://BUCKET/PREFIX)")
        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError:
                raise ConfigError(
                    "registry.url is an s3:// URL but boto3 is not installed",
                    hint="pip install 'loft[team]'.",
                ) from None
            self._client = boto3.client("s3", endpoint_url=self.endpoint or None)
        return self._client

    def key(self, name: str, version: int, rel: str = "") -> str:
        return "/".join(p for p in (self.prefix, name, str(version), rel) if p)

    def uri(self, name: str, version: int) -> str:
        return f"s3://{self.bucket}/{self.key(name, version)}/"

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(kw.get("Key", "")) from None
            raise ConfigError(
                f"{what} s3://{self.bucket}/{kw.get('Key', kw.get('Prefix', ''))}: {code}: "
                f"{e.response.get('Error', {}).get('Message', '')}",
                hint="Check the bucket, the credentials and LOFT_S3_ENDPOINT_URL.",
            ) from None
        except BotoCoreError as e:
            raise ConfigError(
                f"{what} s3://{self.bucket}: {e}",
                hint="Check LOFT_S3_ENDPOINT_URL and that the server is reachable.",
            ) from None

    # ---------------------------------------------------------------- write

    def upload_version(self, name: str, version: int, root: Path, card: dict[str, Any]) -> None:
        """Every file the card lists, then the card (the completion marker)."""
        for rec in card.get("files") or []:
            with open(root / rec["path"], "rb") as f:
                self._call("upload to", self.client.put_object,
                           Key=self.key(name, version, rec["path"]), Body=f)  # fmt: skip
        self.upload_card(name, version, root)

    def upload_card(self, name: str, version: int, root: Path, file: str = CARD) -> None:
        body = (root / file).read_bytes()
        self._call("upload to", self.client.put_object, Key=self.key(name, version, file),
                   Body=body)  # fmt: skip

    def delete_files(self, name: str, version: int, keep: str) -> None:
        """Every object of the version but ``keep`` (its tombstone)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(name, version) + "/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/" + keep):
                    self._call("delete", self.client.delete_object, Key=obj["Key"])

    # ---------------------------------------------------------------- encryption at rest

    def encrypted_objects(self) -> Iterator[str]:
        """Keys of every object that is stored encrypted when a KEK is configured (all but the
        cards, tombstones and tokenizer files; see loft.registry.files)."""
        from loft.registry.files import should_encrypt

        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                if should_encrypt(obj["Key"].rsplit("/", 1)[-1]):
                    yield obj["Key"]

    def rewrap_object(self, key: str, old: KeyProvider, new: KeyProvider) -> bool:
        """Re-wrap an encrypted object's data key from ``old`` to ``new`` (its header replaced,
        the object re-uploaded); False when it is plaintext or ``new`` already wraps it."""
        body = self._call("read", self.client.get_object, Key=key)["Body"].read()
        if not is_encrypted_bytes(body):
            return False
        out = rewrap_bytes(body, old, new, name=f"s3://{self.bucket}/{key}")
        if out is None:
            return False
        self._call("upload to", self.client.put_object, Key=key, Body=out)
        return True

    # ---------------------------------------------------------------- read

    def card(self, name: str, version: int) -> bytes | None:
        try:
            resp = self._call("read", self.client.get_object, Key=self.key(name, version, CARD))
        except FileNotFoundError:
            return None
        return resp["Body"].read()

    def fetch_version(self, name: str, version: int, dest: Path) -> None:
        """Download the version into ``dest``, every file verified against its card's sha256;
        IntegrityError (and nothing at ``dest``) on the first mismatch."""
        ref = f"{name}:{version}"
        raw = self.card(name, version)
        if raw is None:
            raise IntegrityError(
                f"{ref}: its files are neither here nor in {self.uri(name, version)} (no {CARD}).",
                hint=f"Re-register it, or roll back with `loft registry rollback {name}`.",
            )
        card = json.loads(raw)
        with atomic_dir(dest, overwrite=True) as tmp:
            for rec in card.get("files") or []:
                self._fetch_file(name, version, rec, tmp / rec["path"], ref)
            atomic_write_bytes(tmp / CARD, raw)

    def _fetch_file(self, name: str, version: int, rec: dict[str, Any], out: Path,
                    ref: str) -> None:  # fmt: skip
        key = self.key(name, version, rec["path"])
        try:
            resp = self._call("read", self.client.get_object, Key=key)
        except FileNotFoundError:
            raise IntegrityError(
                f"{ref}: s3://{self.bucket}/{key} is missing (listed in {CARD})."
            ) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with open(out, "wb") as f:
            for chunk in resp["Body"].iter_chunks(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if is_encrypted(out):  # stored encrypted: its card records the plaintext's digest
            try:
                sha, size = plain_digest(out)
            except IntegrityError as e:
                raise IntegrityError(
                    f"{ref}: s3://{self.bucket}/{key}: {e.message}", hint=e.hint
                ) from None
            digest_hex = sha
        else:
            digest_hex = digest.hexdigest()
        if digest_hex != rec["sha256"] or size != int(rec["bytes"]):
            raise IntegrityError(
                f"{ref}: s3://{self.bucket}/{key} does not match its card (sha256 "
                f"{digest_hex[:12]}..., {size} bytes; the card says "
                f"{rec['sha256'][:12]}..., {rec['bytes']} bytes).",
                hint=f"Do not load {ref}: the object was changed after it was registered. "
                f"Re-register it from its run, or roll back (`loft registry rollback {name}`).",
            )


__all__ = ["S3Registry", "remote"]
