"""Checks on what users hand loft, before anything is copied, loaded or served.

- ``inside(root, name)``: a user-supplied relative name (an archive member, an uploaded file's
  name, a file a manifest lists) as a path that stays inside ``root``: no absolute names, no
  ``..``, no NUL, and nothing that resolves outside through a symlink.
- ``check_tree(folder)``: a folder to register, merge or export from holds only regular files
  and folders: a symlink (which could pull ``/etc/shadow`` or another tenant's weights into the
  registry) or a FIFO/device is refused, naming it; every ``*.safetensors`` file's header is
  checked as below (one encrypted at rest is checked when decrypted: AES-GCM authenticates it).
- ``check_safetensors_header``: the strict form of the safetensors format: an 8-byte
  little-endian header length within limits, a UTF-8 JSON object, known dtypes, shapes of
  non-negative integers whose byte size matches each tensor's ``data_offsets``, tensors that
  tile the data area exactly (no overlap, no gap, no trailing bytes). The safetensors library
  checks most of this on load; loft checks it before storing or loading, with a message naming
  the file and tensor, and bench/fuzz.py fuzzes it.

Errors are ConfigError (a name or folder a user gave) and IntegrityError (a malformed file).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from loft.core.errors import ConfigError, IntegrityError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSORS = 1_000_000
MAX_RANK = 16
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def inside(root: Path, name: str, *, what: str = "file name") -> Path:
    """``root / name`` when ``name`` is a plain relative path that stays inside ``root``."""
    hint = "Use a plain relative name such as data/train.jsonl."
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConfigError(f"invalid {what} {name!r}: empty or contains NUL.", hint=hint)
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ConfigError(f"{what} {name!r} is an absolute path; refused.", hint=hint)
    if ".." in posix.parts:
        raise ConfigError(f"{what} {name!r} leaves its folder through '..'; refused.", hint=hint)
    base = Path(root).resolve()
    target = base.joinpath(*posix.parts)
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(
            f"{what} {name!r} resolves to {resolved}, outside {base} (through a symlink); refused.",
            hint=hint,
        )
    return target


def check_tree(folder: Path, *, what: str = "folder", max_files: int = 100_000) -> list[str]:
    """The relative paths of the regular files under ``folder`` (sorted); ConfigError on a
    symlink or special file anywhere under it (or ``folder`` itself a symlink's target is fine:
    the user named it), IntegrityError on a malformed ``*.safetensors`` header."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder} is not a directory.")
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ConfigError(
                    f"{what} {folder} contains a symlink, {rel} -> {os.readlink(path)}; loft "
                    "refuses symlinks in folders it copies (they can pull in files from "
                    "elsewhere on this machine).",
                    hint="Replace the link with a copy of the file (cp -L), then try again.",
                )
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ConfigError(
                    f"{what} {folder} contains {rel}, which is not a regular file (a FIFO, "
                    "socket or device); refused.",
                    hint="Remove it and try again.",
                )
            files.append(rel)
            if len(files) > max_files:
                raise ConfigError(f"{what} {folder} holds more than {max_files:,} files; refused.")
            if name.endswith(".safetensors") and not _encrypted(path):
                read_safetensors_header(path)  # an encrypted one is authenticated on decryption
    return sorted(files)


def _encrypted(path: Path) -> bool:
    from loft.core.crypto import is_encrypted

    return is_encrypted(path)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The checked header of the safetensors file at ``path`` (reads the header only)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        body = f.read(n) if 0 < n <= MAX_HEADER_BYTES and 8 + n <= size else b""
    return check_safetensors_header(head + body, size, where=str(path))


def check_safetensors_header(data: bytes, file_size: int, *, where: str) -> dict[str, Any]:
    """Check the safetensors header at the start of ``data`` (at least the 8-byte length and
    the header) for a file of ``file_size`` bytes; the header's tensors, by name."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(
            f"{where}: not a valid safetensors file: {why}.",
            hint="Re-create the file with safetensors' save_file; loft refuses malformed weights.",
        )

    if len(data) < 8 or file_size < 8:
        raise bad("shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is outside 2..{MAX_HEADER_BYTES}")
    if 8 + n > file_size or 8 + n > len(data):
        raise bad(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = bytes(data[8 : 8 + n])
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise bad("__metadata__ is not an object of strings")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) > MAX_TENSORS:
        raise bad(f"{len(tensors)} tensors, over the limit of {MAX_TENSORS}")
    spans = []
    for name, t in tensors.items():
        spans.append((*_tensor_span(name, t, bad), name))
    data_size = file_size - 8 - n
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            why = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise bad(f"tensor {name!r} at bytes {begin}..{stop} {why} (expected {end})")
        end = stop
    if end > data_size:
        raise bad(f"tensors need {end} bytes of data but the file holds {data_size} (truncated)")
    if end < data_size:
        raise bad(f"tensors end at byte {end} of a {data_size}-byte data area (trailing bytes)")
    return tensors


def _tensor_span(name: str, t: Any, bad: Any) -> tuple[int, int]:
    if not isinstance(t, dict):
        raise bad(f"tensor {name!r} is not an object")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_count(d) for d in shape)):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, stop = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if stop < begin or stop - begin != nbytes:
        raise bad(
            f"tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes but data_offsets "
            f"{offsets} span {stop - begin}"
        )
    return begin, stop


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63
