"""Encryption at rest: AES-256-GCM in fixed-size chunks, a fresh data key per file, wrapped by a
key-encryption key (KEK).

On whenever a KEK is configured: ``LOFT_KEK_FILE`` (or ``encryption.kek_file`` in
LOFT_HOME/settings.yaml) names a file of exactly 32 random bytes that only its owner (and group)
may read; or ``LOFT_KEY_PROVIDER`` (``encryption.provider``) names ``module:factory``, a callable
returning any object with the :class:`KeyProvider` methods (a KMS, an HSM, a secrets manager).

An encrypted file is a fixed 512-byte header followed by chunks::

    header  "LOFTENC" version(1) | chunk_size u32 | file nonce prefix (8 random bytes)
            | key id length u8, key id | wrapped data key length u16, wrapped key | zeros to 512
    chunk i AES-256-GCM(data key, nonce = prefix + u32 i, plaintext[i*cs:(i+1)*cs],
                        aad = sha256(header[:20]) + u64 i + u8 final)  -> ciphertext + 16-byte tag

Every full chunk holds ``chunk_size`` plaintext bytes; the last holds the rest (0 bytes for an
empty file) and alone carries final=1, so the number of chunks and the plaintext size follow from
the file size. Dropping, truncating, reordering, duplicating or appending chunks, or moving one
from another file (another data key, another prefix), makes a chunk fail authentication. The data
key is wrapped with the header's first 20 bytes and the key id as associated data, so the header
is authenticated too; its padding must be zeros. The wrapped key and the key id are the only
bytes :func:`rewrap` changes, which is why the chunks bind only the first 20 bytes.

Every failure (wrong KEK, a changed byte, a cut, a splice) is an IntegrityError naming the file
and, for a chunk, its index. Decryption happens in memory: nothing here writes plaintext to disk.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from loft.core.errors import ConfigError, IntegrityError
from loft.core.keys import (  # the key API, re-exported: callers use crypto.provider() etc.
    KEK_BYTES,
    FileKey,
    KeyProvider,
    enabled,
    load_kek,
    load_provider,
    provider,
    require_provider,
)
from loft.core.paths import atomic_file

MAGIC = b"LOFTENC"
VERSION = 1
HEADER_SIZE = 512
TAG = 16
CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk
_FIXED = struct.Struct(">7sBI8s")  # magic, version, chunk_size, nonce prefix: 20 bytes
_IMMUTABLE = _FIXED.size
_MAX_CHUNKS = 1 << 32
_JOURNAL = ".rewrap"  # rewrap's journal beside the file: ".<name>.rewrap"
_BIG = 8 << 20  # files from this size are mapped rather than read


class WrongKeyError(IntegrityError):
    """A file's header names another KEK than the one configured (its hint says what to do)."""


# ----------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    chunk_size: int
    prefix: bytes
    key_id: str
    wrapped: bytes

    @property
    def immutable(self) -> bytes:
        return _FIXED.pack(MAGIC, VERSION, self.chunk_size, self.prefix)

    @property
    def context(self) -> bytes:
        return self.immutable + self.key_id.encode()

    def aad_base(self) -> bytes:
        return hashlib.sha256(self.immutable).digest()

    def pack(self) -> bytes:
        kid = self.key_id.encode()
        out = self.immutable + struct.pack(">B", len(kid)) + kid
        out += struct.pack(">H", len(self.wrapped)) + self.wrapped
        if len(out) > HEADER_SIZE:
            raise ConfigError(
                f"key id {self.key_id!r} and wrapped key ({len(self.wrapped)} bytes) do not fit "
                f"a {HEADER_SIZE}-byte header."
            )
        return out + bytes(HEADER_SIZE - len(out))


def _parse_header(raw: bytes | memoryview, where: str) -> Header:
    raw = bytes(raw)
    if len(raw) < HEADER_SIZE:
        raise IntegrityError(f"{where}: truncated header ({len(raw)} of {HEADER_SIZE} bytes).")
    magic, version, chunk_size, prefix = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise IntegrityError(f"{where} is not a loft-encrypted file (no {MAGIC.decode()} magic).")
    if version != VERSION:
        raise IntegrityError(f"{where}: unknown encryption format version {version}.")
    if chunk_size < 1:
        raise IntegrityError(f"{where}: header has chunk size 0.")
    at = _IMMUTABLE
    n = raw[at]
    kid = raw[at + 1 : at + 1 + n]
    at += 1 + n
    if at + 2 > HEADER_SIZE:
        raise IntegrityError(f"{where}: header is malformed (key id runs past it).")
    (m,) = struct.unpack_from(">H", raw, at)
    at += 2
    wrapped = raw[at : at + m]
    at += m
    if at > HEADER_SIZE or any(raw[at:HEADER_SIZE]):
        raise IntegrityError(f"{where}: header is malformed (wrapped key or padding altered).")
    try:
        key_id = kid.decode()
    except UnicodeDecodeError:
        raise IntegrityError(f"{where}: header key id is not text (altered).") from None
    return Header(chunk_size, prefix, key_id, wrapped)


def read_header(path: Path | str) -> Header:
    """The header of an encrypted file (IntegrityError when it is not one)."""
    with open(path, "rb") as f:
        return _parse_header(f.read(HEADER_SIZE), str(path))


def read_header_bytes(blob: bytes) -> Header:
    """The header of an encrypted blob (IntegrityError when it is not one)."""
    return _parse_header(bytes(blob[:HEADER_SIZE]), "<bytes>")


def is_encrypted(path: Path | str) -> bool:
    """True when ``path`` starts with the magic of this format."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_encrypted_bytes(blob: bytes | memoryview) -> bool:
    return bytes(blob[: len(MAGIC)]) == MAGIC


def _data_key(h: Header, key: KeyProvider, where: str) -> bytes:
    if h.key_id != key.key_id:
        raise WrongKeyError(
            f"{where} is encrypted with key-encryption key {h.key_id}, but the configured one is "
            f"{key.key_id}.",
            hint="Configure the KEK it was encrypted with (LOFT_KEK_FILE), or finish a rotation "
            "with `loft encryption rotate --new-kek-file NEW` (it resumes where it stopped).",
        )
    try:
        dk = key.unwrap(h.wrapped, h.context)
    except Exception as e:  # any provider's refusal to unwrap is an integrity failure here
        raise IntegrityError(
            f"{where}: its data key does not unwrap with KEK {key.key_id} ({e}); the header was "
            "altered or the key is not the one it was wrapped with.",
            hint="Do not use this file; restore it from a copy or re-create it.",
        ) from None
    if len(dk) != 32:
        raise IntegrityError(f"{where}: unwrapped data key has {len(dk)} bytes, not 32.")
    return dk


def _new_header(key: KeyProvider, chunk_size: int) -> tuple[Header, bytes]:
    if not 1 <= chunk_size < 1 << 32:
        raise ConfigError(f"chunk size {chunk_size} is out of range (1 byte .. 4 GiB).")
    dk = AESGCM.generate_key(bit_length=256)
    h = Header(chunk_size, os.urandom(8), key.key_id, b"")
    return Header(chunk_size, h.prefix, key.key_id, key.wrap(dk, h.context)), dk


# ----------------------------------------------------------------------------- encrypt


def _aad(base: bytes, index: int, final: bool) -> bytes:
    return base + struct.pack(">QB", index, 1 if final else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _read_full(src: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = src.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, key: KeyProvider, *, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt everything ``src`` yields into ``dst`` (header then chunks); the number of
    plaintext bytes. Reads one chunk ahead so the last chunk is the one flagged final."""
    h, dk = _new_header(key, chunk_size)
    aead, base = AESGCM(dk), h.aad_base()
    dst.write(h.pack())
    cur, index, total = _read_full(src, chunk_size), 0, 0
    while True:
        nxt = _read_full(src, chunk_size) if len(cur) == chunk_size else b""
        final = not nxt
        if index >= _MAX_CHUNKS:
            raise ConfigError(f"more than {_MAX_CHUNKS} chunks; use a larger chunk size.")
        dst.write(aead.encrypt(_nonce(h.prefix, index), cur, _aad(base, index, final)))
        total += len(cur)
        if final:
            return total
        cur, index = nxt, index + 1


def encrypt_bytes(data: bytes, key: KeyProvider, *, chunk_size: int = CHUNK_SIZE) -> bytes:
    import io

    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, key, chunk_size=chunk_size)
    return out.getvalue()


def encrypt_to(
    src: Path | str, dest: Path | str, key: KeyProvider, *, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt the file ``src`` into ``dest`` (temp + fsync + rename); plaintext bytes read."""
    dest = Path(dest)
    with open(src, "rb") as f, atomic_file(dest) as out:
        return encrypt_stream(f, out, key, chunk_size=chunk_size)


def encrypt_file(path: Path | str, key: KeyProvider, *, chunk_size: int = CHUNK_SIZE) -> bool:
    """Encrypt ``path`` in place, atomically: the encrypted copy is written beside it and renamed
    over it, so the plaintext name never holds a partial file. False when already encrypted."""
    path = Path(path)
    if is_encrypted(path):
        return False
    encrypt_to(path, path, key, chunk_size=chunk_size)
    return True


def write_encrypted(
    path: Path | str, data: bytes, key: KeyProvider, *, chunk_size: int = CHUNK_SIZE
) -> None:
    """Write ``data`` encrypted to ``path`` atomically."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out:
        encrypt_stream(io.BytesIO(data), out, key, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- decrypt


@dataclass(frozen=True)
class _Layout:
    chunk_size: int
    n_chunks: int
    plain_size: int

    def span(self, i: int) -> tuple[int, int]:
        """(offset in the file, ciphertext length) of chunk ``i``."""
        step = self.chunk_size + TAG
        start = HEADER_SIZE + i * step
        n = self.chunk_size if i < self.n_chunks - 1 else self.plain_size - i * self.chunk_size
        return start, n + TAG


def _layout(h: Header, file_size: int, where: str) -> _Layout:
    body = file_size - HEADER_SIZE
    step = h.chunk_size + TAG
    n = -(-body // step) if body > 0 else 0
    last = body - (n - 1) * step if n else 0
    if n == 0 or last < TAG:
        raise IntegrityError(
            f"{where} is truncated: {file_size} bytes leave no whole final chunk "
            f"(chunk {max(n - 1, 0)} has {max(last, 0)} bytes, under the {TAG}-byte tag)."
        )
    if n > _MAX_CHUNKS:
        raise IntegrityError(f"{where}: {n} chunks exceed the format's limit.")
    return _Layout(h.chunk_size, n, body - n * TAG)


class _Reader:
    """Chunk-by-chunk authenticated decryption of one encrypted file or blob."""

    def __init__(self, raw: BinaryIO | bytes | memoryview, size: int, key: KeyProvider,
                 where: str) -> None:  # fmt: skip
        self.raw, self.where = raw, where
        self._scratch: bytearray | None = None  # one reused read buffer for a file
        head = bytes(self._read(0, HEADER_SIZE))
        self.h = _parse_header(head, where)
        self.lay = _layout(self.h, size, where)
        self.aead = AESGCM(_data_key(self.h, key, where))
        self.base = self.h.aad_base()

    def _read(self, offset: int, n: int) -> memoryview:
        """``n`` bytes at ``offset``: a view of the blob, or of a read buffer reused per file
        (no allocation per chunk: on some machines a fresh 1 MiB costs more than decrypting)."""
        if isinstance(self.raw, bytes | bytearray | memoryview | mmap.mmap):
            return memoryview(self.raw)[offset : offset + n]
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = bytearray(n)
        view = memoryview(self._scratch)[:n]
        self.raw.seek(offset)
        got = 0
        while got < n:
            k = self.raw.readinto(view[got:])  # type: ignore[attr-defined]
            if not k:
                break
            got += k
        return view[:got]

    def _fail(self, i: int) -> IntegrityError:
        return IntegrityError(
            f"{self.where}: chunk {i} of {self.lay.n_chunks} does not authenticate (wrong key, "
            "or the file was altered, truncated, extended, reordered or spliced).",
            hint="Do not use this file; restore it from a copy or re-create it.",
        )

    def chunk(self, i: int, out: memoryview | None = None) -> bytes | None:
        start, n = self.lay.span(i)
        ct = self._read(start, n)
        if len(ct) != n:
            raise self._fail(i)
        nonce = _nonce(self.h.prefix, i)
        aad = _aad(self.base, i, i == self.lay.n_chunks - 1)
        try:
            if out is not None:
                self.aead.decrypt_into(nonce, ct, aad, out)
                return None
            return self.aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            raise self._fail(i) from None

    def buffer(self) -> bytearray | mmap.mmap:
        """The whole plaintext, every chunk decrypted straight into one buffer."""
        buf = _alloc(self.lay.plain_size)
        view, cs = memoryview(buf), self.lay.chunk_size
        for i in range(self.lay.n_chunks):
            _start, n = self.lay.span(i)
            self.chunk(i, view[i * cs : i * cs + n - TAG])
        return buf

    def range(self, offset: int, length: int) -> bytes:
        size, cs = self.lay.plain_size, self.lay.chunk_size
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        end = min(offset + length, size)
        if offset >= end:
            # still authenticate the final chunk, so a cut file is never read as shorter
            self.chunk(self.lay.n_chunks - 1)
            return b""
        first, last = offset // cs, (end - 1) // cs
        parts = [self.chunk(i) or b"" for i in range(first, last + 1)]
        joined = b"".join(parts)
        return joined[offset - first * cs : end - first * cs]


def decrypt_bytes(blob: bytes, key: KeyProvider, *, name: str = "<bytes>") -> bytes:
    """The plaintext of an encrypted blob, every chunk authenticated."""
    return bytes(_Reader(blob, len(blob), key, name).buffer())


def decrypt_file(path: Path | str, key: KeyProvider) -> bytes:
    """The plaintext of an encrypted file, in memory, every chunk authenticated."""
    return bytes(decrypt_file_buffer(path, key))


def decrypt_file_buffer(path: Path | str, key: KeyProvider) -> bytearray | mmap.mmap:
    """:func:`decrypt_file` into a mutable buffer, without the final copy: for large files
    (weights are viewed in place, see ``loft.models.memory.load_tensors``). A large file is read
    through a read-only mapping and decrypted into anonymous memory mapped in one call: on
    machines where page faults are dear, allocating the plaintext costs more than decrypting."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < _BIG or not hasattr(mmap, "MAP_POPULATE"):
            return _Reader(f, size, key, str(path)).buffer()
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ)  # fmt: skip
    return _Reader(mapped, size, key, str(path)).buffer()  # unmapped when collected


def _alloc(n: int) -> bytearray | mmap.mmap:
    """A zeroed writable buffer of ``n`` bytes: prefaulted anonymous memory when large."""
    if n < _BIG or not hasattr(mmap, "MAP_POPULATE"):
        return bytearray(n)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return mmap.mmap(-1, n, flags=flags)


def read_range(path: Path | str, offset: int, length: int, key: KeyProvider) -> bytes:
    """Plaintext bytes [offset, offset+length) of an encrypted file, decrypting only the chunks
    they fall in (random access for paged readers); shorter at the end of the file."""
    with open(path, "rb") as f:
        return _Reader(f, os.fstat(f.fileno()).st_size, key, str(path)).range(offset, length)


def plain_size(path: Path | str) -> int:
    """The plaintext size of an encrypted file, from its header and size (not authenticated)."""
    path = Path(path)
    return _layout(read_header(path), path.stat().st_size, str(path)).plain_size


def iter_plain(path: Path | str, key: KeyProvider | None = None) -> Iterator[bytes]:
    """The plaintext of ``path`` chunk by chunk (authenticated); a plaintext file as it is."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            f.seek(0)
            while block := f.read(CHUNK_SIZE):
                yield block
            return
        r = _Reader(f, os.fstat(f.fileno()).st_size, key or require_provider(path), str(path))
        for i in range(r.lay.n_chunks):
            yield r.chunk(i) or b""


def read_plain(path: Path | str, key: KeyProvider | None = None) -> bytes:
    """The bytes of ``path``: decrypted in memory when it is encrypted (with ``key``, else the
    configured provider), as they are when it is not."""
    if is_encrypted(path):
        return decrypt_file(path, key or require_provider(path))
    return Path(path).read_bytes()


def plain_digest(path: Path | str, key: KeyProvider | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of the plaintext of ``path``, encrypted or not; an encrypted file is
    decrypted chunk by chunk into one reused buffer, every chunk authenticated."""
    if not is_encrypted(path):
        h, n = hashlib.sha256(), 0
        for block in iter_plain(path):
            h.update(block)
            n += len(block)
        return h.hexdigest(), n
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, key or require_provider(path), str(path))
        out = memoryview(bytearray(min(r.lay.chunk_size, max(r.lay.plain_size, 1))))
        for i in range(r.lay.n_chunks):
            _start, n = r.lay.span(i)
            r.chunk(i, out[: n - TAG])
            h.update(out[: n - TAG])
    return h.hexdigest(), r.lay.plain_size


# ----------------------------------------------------------------------------- rewrap


def rewrap_header(raw: bytes, old: KeyProvider, new: KeyProvider, *, where: str) -> bytes | None:
    """The header ``raw`` with its data key re-wrapped from ``old`` to ``new``; None when it is
    already wrapped by ``new`` (checked to unwrap)."""
    h = _parse_header(raw, where)
    if h.key_id == new.key_id:
        _data_key(h, new, where)
        return None
    if h.key_id != old.key_id:
        raise IntegrityError(
            f"{where} is wrapped by KEK {h.key_id}, neither the old ({old.key_id}) nor the new "
            f"({new.key_id}) one."
        )
    dk = _data_key(h, old, where)
    fresh = Header(h.chunk_size, h.prefix, new.key_id, b"")
    return Header(h.chunk_size, h.prefix, new.key_id, new.wrap(dk, fresh.context)).pack()


def rewrap_bytes(blob: bytes, old: KeyProvider, new: KeyProvider, *, name: str) -> bytes | None:
    """An encrypted blob with its header re-wrapped (data untouched); None when already new."""
    head = rewrap_header(bytes(blob[:HEADER_SIZE]), old, new, where=name)
    return None if head is None else head + bytes(blob[HEADER_SIZE:])


def _journal(path: Path) -> Path:
    return path.with_name(f".{path.name}{_JOURNAL}")


def rewrap(path: Path | str, old: KeyProvider, new: KeyProvider) -> bool:
    """Re-wrap the data key of ``path`` from ``old`` to ``new``, rewriting only its header, in
    place. True when it changed, False when ``new`` already wraps it (so a rotation resumes).

    Crash-safe: the new header is first written to a journal beside the file (``.NAME.rewrap``,
    fsynced), then over the header, then the journal is removed; a journal found on the next call
    is replayed, so a header torn by a crash is repaired from it."""
    from loft.core.paths import atomic_write_bytes, fsync_dir

    path = Path(path)
    journal = _journal(path)
    with open(path, "r+b") as f:
        current = f.read(HEADER_SIZE)
        if journal.is_file():
            pending = journal.read_bytes()
            if pending == current:
                journal.unlink()
                fsync_dir(path.parent)
                return False
            if len(pending) == HEADER_SIZE and current[:_IMMUTABLE] == pending[:_IMMUTABLE]:
                _data_key(_parse_header(pending, str(journal)), new, str(journal))
                head: bytes | None = pending
            else:  # a journal of another file's header: ignore it
                journal.unlink()
                head = rewrap_header(current, old, new, where=str(path))
        else:
            head = rewrap_header(current, old, new, where=str(path))
        if head is None:
            return False
        atomic_write_bytes(journal, head)
        os.pwrite(f.fileno(), head, 0)
        f.flush()
        os.fsync(f.fileno())
    journal.unlink()
    fsync_dir(path.parent)
    return True


__all__ = [
    "CHUNK_SIZE",
    "HEADER_SIZE",
    "KEK_BYTES",
    "FileKey",
    "Header",
    "KeyProvider",
    "WrongKeyError",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_file_buffer",
    "enabled",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_stream",
    "encrypt_to",
    "is_encrypted",
    "is_encrypted_bytes",
    "iter_plain",
    "load_kek",
    "load_provider",
    "plain_digest",
    "plain_size",
    "provider",
    "read_header",
    "read_header_bytes",
    "read_plain",
    "read_range",
    "require_provider",
    "rewrap",
    "rewrap_bytes",
    "write_encrypted",
]
