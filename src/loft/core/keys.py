"""Key-encryption keys for encryption at rest (loft.core.crypto): the KeyProvider protocol a KMS
or HSM implements, the default provider (a 32-byte key file), and which one is configured.

``LOFT_KEK_FILE`` (or ``encryption.kek_file`` in LOFT_HOME/settings.yaml) names a file of exactly
32 random bytes that only its owner (and group) may read; ``LOFT_KEY_PROVIDER``
(``encryption.provider``) names ``module:factory``, a callable returning a KeyProvider.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from loft.core.errors import ConfigError

KEK_BYTES = 32


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys. ``key_id`` names the key-encryption key (recorded in every
    header it wraps); ``context`` is associated data the wrapped key must be bound to (a KMS
    passes it as its encryption context). The file provider below is the default."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...


class FileKey:
    """A 32-byte KEK held in memory; data keys wrapped with AES-256-GCM (nonce + ct + tag)."""

    def __init__(self, kek: bytes, source: str = "key") -> None:
        if len(kek) != KEK_BYTES:
            raise ConfigError(f"{source}: a KEK is {KEK_BYTES} bytes, not {len(kek)}.")
        self._aead = AESGCM(kek)
        self._id = hashlib.sha256(b"loft-kek-id\0" + kek).hexdigest()[:16]
        self.source = source

    @property
    def key_id(self) -> str:
        return self._id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], context)
        except InvalidTag:
            raise ValueError("the wrapped data key does not authenticate") from None

    def __repr__(self) -> str:
        return f"FileKey(id={self._id}, source={self.source})"


def load_kek(path: str | Path) -> FileKey:
    """The KEK in ``path``: exactly 32 bytes, not readable or writable by other users."""
    path = Path(path).expanduser()
    make = (
        f"Create one with `umask 077; head -c {KEK_BYTES} /dev/urandom > {path}` (keep a copy "
        "somewhere safe: without it nothing encrypted can be read)."
    )
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"KEK file {path}: {e.strerror or e}.", hint=make) from None
    if not path.is_file():
        raise ConfigError(f"KEK file {path} is not a regular file.", hint=make)
    if st.st_mode & 0o007:
        raise ConfigError(
            f"KEK file {path} is accessible to every user on this machine (mode "
            f"{st.st_mode & 0o777:o}); a key-encryption key must not be.",
            hint=f"Restrict it with `chmod 600 {path}` (or 640 for a group of service users).",
        )
    if st.st_size != KEK_BYTES:
        raise ConfigError(
            f"KEK file {path} holds {st.st_size} bytes; a KEK is exactly {KEK_BYTES} random "
            "bytes (raw, not hex or base64).",
            hint=make,
        )
    return FileKey(path.read_bytes(), source=str(path))


def provider() -> KeyProvider | None:
    """The configured key provider, or None when encryption is off. ``LOFT_KEY_PROVIDER`` /
    ``encryption.provider`` (``module:factory``) wins over ``LOFT_KEK_FILE`` /
    ``encryption.kek_file``."""
    from loft.core.settings import setting

    spec = setting("LOFT_KEY_PROVIDER", "encryption.provider")
    if spec:
        return load_provider(str(spec))
    kek = setting("LOFT_KEK_FILE", "encryption.kek_file")
    return load_kek(str(kek)) if kek else None


def enabled() -> bool:
    """True when a KEK (or a key provider) is configured: new artifacts are then encrypted."""
    return provider() is not None


def require_provider(path: Path | str) -> KeyProvider:
    """The configured provider; a ConfigError naming ``path`` when none is configured."""
    p = provider()
    if p is None:
        raise ConfigError(
            f"{path} is encrypted, but no key-encryption key is configured.",
            hint="Set LOFT_KEK_FILE to the 32-byte key file it was encrypted with (or "
            "encryption.kek_file in LOFT_HOME/settings.yaml).",
        )
    return p


def load_provider(spec: str) -> KeyProvider:
    """``module:factory`` → ``factory()``, checked to have key_id, wrap and unwrap."""
    module, _, attr = spec.partition(":")
    where = "encryption.provider (LOFT_KEY_PROVIDER)"
    if not module or not attr:
        raise ConfigError(f"{where} is {spec!r}; expected 'module:factory'.")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where} {spec!r} cannot be imported: {e}.") from None
    made = factory()
    if not isinstance(made, KeyProvider) or not isinstance(made.key_id, str) or not made.key_id:
        raise ConfigError(
            f"{where} {spec!r} returned {type(made).__name__}, which lacks key_id (a non-empty "
            "str), wrap(data_key, context) or unwrap(wrapped, context)."
        )
    return made
