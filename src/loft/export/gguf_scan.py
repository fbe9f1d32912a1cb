"""A GGUF file's metadata and tensor table without building every field.

``gguf.GGUFReader`` turns every metadata value into numpy views on open, one per element of
each array; for a 49k-token vocabulary (tokens, scores, types, merges) that is ~1.6M small
arrays and ~5 s on a 2-core CPU, paid for every read even when only one string or the tensor
table is wanted. :func:`scan` walks the same layout with ``struct`` over a memory map, skips
arrays it is not asked for, and returns the scalar fields and the tensor table; tensor bytes are
numpy views shaped as ``GGUFReader`` shapes them, so ``gguf.quants.dequantize`` takes them as is
(tests/test_export_gguf.py compares both readers tensor by tensor).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import IntegrityError

MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# value type -> struct format of one element (strings and arrays are variable)
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest-varying dimension first)
    type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GgufIndex:
    version: int
    fields: dict[str, Any]  # scalars and strings; arrays as their length unless asked for
    tensors: list[TensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise IntegrityError(f"{self.path}: GGUF header ends early at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise IntegrityError(f"{self.path}: a GGUF string runs past the end (byte {self.pos})")
        raw = bytes(self.buf[self.pos : end])
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, keep_arrays: bool) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise IntegrityError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")
        item, count = self.take("I"), self.take("Q")
        if keep_arrays:
            return [self.value(item, True) for _ in range(count)]
        if item in _SCALARS:
            self.pos += count * struct.calcsize("<" + _SCALARS[item])
        else:
            for _ in range(count):
                self.value(item, False)
        return count


def scan(path: Path, *, arrays: tuple[str, ...] = ()) -> GgufIndex:
    """Metadata and tensor table of the GGUF file at ``path``; only the arrays named in
    ``arrays`` are read (the others are given as their lengths)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise IntegrityError(f"{path}: not a GGUF file (no GGUF magic)")
        c = _Cursor(buf, Path(path))
        c.pos = 4
        version = c.take("I")
        if version & 0xFFFF == 0:
            raise IntegrityError(f"{path}: a big-endian GGUF file (not supported here)")
        n_tensors, n_fields = c.take("Q"), c.take("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = c.string()
            fields[key] = c.value(c.take("I"), key in arrays)
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.take("Q") for _ in range(c.take("I")))
            tensors.append((name, dims, c.take("I"), c.take("Q")))
        align = int(fields.get("general.alignment", 32))
        data_start = -(-c.pos // align) * align
    return GgufIndex(
        version=version,
        fields=fields,
        tensors=[TensorInfo(n, d, t, data_start + o) for n, d, t, o in tensors],
        data_start=data_start,
    )


def tensor_data(path: Path, info: TensorInfo) -> Any:
    """The tensor's stored values as a read-only numpy view, shaped as ``GGUFReader`` shapes
    them (float types as floats, quantised types as rows of bytes)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    kind = GGMLQuantizationType(info.type)
    shape = tuple(reversed(info.shape))
    plain = {
        GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
        GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
        GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
        GGMLQuantizationType.I64: np.int64,
    }  # fmt: skip
    n = int(np.prod(info.shape))
    if kind in plain:
        return np.memmap(path, dtype=plain[kind], mode="r", offset=info.offset, shape=(n,)).reshape(
            shape
        )
    block, size = GGML_QUANT_SIZES[kind]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(n * size // block,))
    return raw.reshape(quant_shape_to_byte_shape(shape, kind))


__all__ = ["GgufIndex", "TensorInfo", "scan", "tensor_data"]
