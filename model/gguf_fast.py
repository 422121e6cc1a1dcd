"""A fast GGUF reader: metadata decoded in one pass, tensors as memory-mapped views.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata
field, so a file with a 49k-token vocabulary takes seconds before the first
tensor (3.9 s of SmolLM2's load). This reader decodes the header with
``struct`` straight from a memory map (~0.1 s) and offers the same two things
the loaders use: ``fields`` (``name -> Field`` with ``contents()`` and
``data``) and ``tensors`` (``name``, ``tensor_type``, ``shape`` in ggml order,
``data`` shaped as ``GGUFReader`` shapes it, so ``gguf.quants.dequantize``
takes it unchanged). ``read_metadata`` is the one header decoder; the
tokenizer builder (``model/gguf_tokenizer.py``) reads only its keys with it. Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any, Callable

import numpy as np

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian (gguf.constants.GGUF_MAGIC)
_GGUF_VERSIONS = (2, 3)

# gguf.GGUFValueType codes -> struct / numpy formats (little-endian files only).
_STRING, _ARRAY = 8, 9
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}


@dataclasses.dataclass
class Field:
    """One metadata value; ``contents()`` as in ``gguf.ReaderField`` (lists for arrays)."""

    name: str
    value: Any

    def contents(self) -> Any:
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        return self.value

    @property
    def data(self):
        """The array's items (numpy array or list of str); ``len`` is the count."""
        return self.value


@dataclasses.dataclass
class Tensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # ggml order (fastest-varying first), as GGUFReader
    data: np.ndarray  # memory-mapped view


class GGUFFile:
    """The metadata and tensors of one GGUF file (``fields``, ``tensors``)."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._buf = memoryview(self._map)
        metadata, self._pos = read_metadata(self._map, os.fspath(path))
        self.fields: dict[str, Field] = {k: Field(k, v) for k, v in metadata.items()}
        n_tensors, = struct.unpack_from("<Q", buf, 8)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims, = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, dims, kind, offset))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in \
            self.fields else 32
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _unpack(self, fmt: str):
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        n, = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + n
        return str(self._buf[start:self._pos], "utf-8")

    def _tensor(self, start: int, name: str, dims, kind: int, offset: int) -> Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(kind)
        n = int(np.prod(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}
        np_dims = tuple(reversed([int(d) for d in dims]))
        if qtype in plain:
            dtype, count = plain[qtype], n
        else:
            dtype, count = np.uint8, n * type_size // block
            np_dims = quant_shape_to_byte_shape(np_dims, qtype)
        data = np.frombuffer(self._buf, dtype, count, start + offset).reshape(np_dims)
        return Tensor(name, qtype, np.asarray(dims, np.uint64), data)


def read_metadata(m, path: str, wanted: Callable[[str], bool] = lambda key: True
                  ) -> tuple[dict, int]:
    """Decodes a GGUF header's metadata: ``({key: value}, offset after it)``.

    Keys ``wanted`` rejects are skipped without decoding. String arrays become
    ``list[str]``, numeric arrays numpy arrays, scalars Python values.

    Raises:
        ValueError, struct.error, UnicodeDecodeError: not a readable GGUF header.
    """
    unpack = struct.unpack_from
    magic, version, _tensor_count, kv_count = unpack("<IIQQ", m, 0)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} does not start with the GGUF magic")
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; supported: {_GGUF_VERSIONS}")
    pos = 24
    out: dict = {}
    for _ in range(kv_count):
        (klen,) = unpack("<Q", m, pos)
        pos += 8
        key = m[pos:pos + klen].decode("utf-8")
        pos += klen
        (vtype,) = unpack("<I", m, pos)
        pos += 4
        keep = wanted(key)
        value, pos = _read_value(m, pos, vtype, keep)
        if keep:
            out[key] = value
    return out, pos


def _read_value(m: mmap.mmap, pos: int, vtype: int, keep: bool):
    unpack = struct.unpack_from
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is not None:
        return unpack(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        (n,) = unpack("<Q", m, pos)
        pos += 8
        if pos + n > len(m):
            raise ValueError("string runs past the end of the file")
        return (m[pos:pos + n].decode("utf-8") if keep else None), pos + n
    if vtype == _ARRAY:
        etype, count = unpack("<IQ", m, pos)
        pos += 12
        dtype = _NUMPY_DTYPE.get(etype)
        if dtype is not None:
            nbytes = count * np.dtype(dtype).itemsize
            if pos + nbytes > len(m):
                raise ValueError("array runs past the end of the file")
            value = np.frombuffer(m[pos:pos + nbytes], dtype=dtype) if keep else None
            return value, pos + nbytes
        if etype == _STRING:
            if not keep:
                for _ in range(count):
                    (n,) = unpack("<Q", m, pos)
                    pos += 8 + n
                return None, pos
            values = []
            append = values.append
            for _ in range(count):
                (n,) = unpack("<Q", m, pos)
                pos += 8
                append(m[pos:pos + n].decode("utf-8"))
                pos += n
            if pos > len(m):
                raise ValueError("string array runs past the end of the file")
            return values, pos
        if etype == _ARRAY:  # arrays of arrays: each element is a full array value
            values = []
            for _ in range(count):
                value, pos = _read_value(m, pos, _ARRAY, keep)
                values.append(value)
            return (values if keep else None), pos
        raise ValueError(f"unknown GGUF array element type {etype}")
    raise ValueError(f"unknown GGUF value type {vtype}")


