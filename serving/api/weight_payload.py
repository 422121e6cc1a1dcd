"""Decodes LMDeploy's ``serialized_named_tensors`` (``POST /update_weights``) into arrays.

LMDeploy's own clients send ``base64(ForkingPickler.dumps([(name,
reduce_tensor(t)), ...]))``: CUDA IPC handles that only another process on
the same GPU can open. Such handles cannot reach this server, so it takes the
same field with tensors that carry their bytes:

* a string: base64 of one of
    - safetensors bytes (``safetensors.numpy.save`` / ``safetensors.torch.save``;
      detected by the 8-byte header length and ``{``);
    - a pickle (``pickle.dumps``) of a list of ``(name, tensor)`` pairs or a
      ``{name: tensor}`` dict, tensors being numpy arrays or CPU torch tensors;
    - a ``torch.save`` zip of the same, read with ``torch.load(weights_only=True)``.
* a list of such strings (LMDeploy: one per tensor-parallel rank): every item
  is decoded and merged, later names winning;
* an empty list or object: no tensors (a last call that only says ``finished``);
* an object ``{name: value}``, value a JSON nested list of numbers or
  ``{"data": base64 raw little-endian bytes, "dtype": "float32", "shape": [...]}``.

``load_format`` may be ``None``/``"auto"`` (detect), ``"safetensors"``,
``"pickle"``, ``"torch"`` or ``"json"``; LMDeploy's ``"flattened_bucket"``
is refused (its metadata is an LMDeploy class).

Security: unpickling client bytes is code execution unless restricted.
``_TensorUnpickler`` resolves only the globals that rebuild numpy arrays and
CPU torch tensors (``find_class`` refuses everything else, e.g. ``os.system``
or LMDeploy's ``rebuild_cuda_tensor``), and torch storages nested in a
``pickle.dumps`` payload are read with ``torch.load(weights_only=True)``.
Object-dtype arrays are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import struct
from typing import Any

import numpy as np

FORMATS = (None, "auto", "safetensors", "pickle", "torch", "json")


class PayloadError(ValueError):
    """The payload cannot be decoded into named tensors (reported as a 400)."""


def decode_named_tensors(payload: Any, load_format: str | None = None) -> dict[str, np.ndarray]:
    """``serialized_named_tensors`` -> ``{hf_name: numpy array}`` (see the module doc).

    Raises:
        PayloadError: unknown format, bad base64, a refused pickle global, a
            value that is not a tensor, or a name that is not a string.
    """
    if load_format not in FORMATS:
        raise PayloadError(f"load_format {load_format!r} is not supported; use one of "
                           "auto, safetensors, pickle, torch, json (CUDA IPC handles and "
                           "flattened buckets cannot cross to this server)")
    if isinstance(payload, (list, dict)) and not payload:
        return {}  # e.g. a last call that only says finished=true
    if isinstance(payload, str):
        return _decode_bytes(_b64(payload), load_format)
    if isinstance(payload, list) and all(isinstance(p, str) for p in payload):
        merged: dict[str, np.ndarray] = {}
        for item in payload:
            merged.update(_decode_bytes(_b64(item), load_format))
        return merged
    if isinstance(payload, dict):
        if load_format not in (None, "auto", "json"):
            raise PayloadError(f"an object payload is JSON tensors, not {load_format!r}")
        return {name: _json_tensor(name, value) for name, value in payload.items()}
    raise PayloadError("`serialized_named_tensors` must be a base64 string, a list of them, "
                       "or an object {name: tensor}")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"`serialized_named_tensors` is not valid base64: {exc}") from None


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _decode_bytes(data: bytes, load_format: str | None) -> dict[str, np.ndarray]:
    fmt = load_format if load_format not in (None, "auto") else (
        "safetensors" if _is_safetensors(data) else
        "torch" if data[:2] == b"PK" else
        "pickle" if data[:1] == b"\x80" else None)
    if fmt == "safetensors":
        named = _read_safetensors(data)
    elif fmt == "pickle":
        try:
            named = _TensorUnpickler(io.BytesIO(data)).load()
        except PayloadError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed pickles raise anything
            raise PayloadError(f"bad pickle payload: {type(exc).__name__}: {exc}") from None
    elif fmt == "torch":
        torch = _torch()
        try:
            named = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise PayloadError(f"bad torch.save payload: {exc}") from None
    elif fmt == "json":
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise PayloadError(f"bad JSON payload: {exc}") from None
        return decode_named_tensors(obj, "json")
    else:
        raise PayloadError("cannot tell the payload's format (expected safetensors, a pickle "
                           "or a torch.save zip after base64); set `load_format`")
    return _named_arrays(named)


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16",
                      "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                      "BOOL": "?"}


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Parses safetensors bytes (BF16 included, which ``safetensors.numpy`` cannot read)."""
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
        body = memoryview(data)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_dtype_name(_SAFETENSORS_DTYPES[info["dtype"]]))
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"{name}: data_offsets {start}..{end} outside the buffer")
            out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PayloadError(f"bad safetensors payload: {type(exc).__name__}: {exc}") from None


def _named_arrays(named: Any) -> dict[str, np.ndarray]:
    if isinstance(named, dict):
        items = list(named.items())
    elif isinstance(named, (list, tuple)):
        items = list(named)
    else:
        raise PayloadError(f"the payload holds a {type(named).__name__}, expected a list of "
                           "(name, tensor) pairs or a {name: tensor} dict")
    out: dict[str, np.ndarray] = {}
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise PayloadError("every entry must be a (name, tensor) pair with a string name")
        name, value = item
        if isinstance(value, tuple) and len(value) == 2 and callable(value[0]):
            raise PayloadError(f"{name!r} is a tensor handle (reduce_tensor), not a tensor; "
                               "send the tensor itself")
        out[name] = _to_numpy(name, value)
    return out


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        array = value
    elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        torch = _torch()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            array = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            array = t.numpy()
    else:
        raise PayloadError(f"{name!r} is a {type(value).__name__}, not a tensor")
    if array.dtype.kind not in "fiub" and array.dtype.name != "bfloat16":
        raise PayloadError(f"{name!r} has dtype {array.dtype}, expected a numeric tensor")
    return array


def _json_tensor(name: str, value: Any) -> np.ndarray:
    if not isinstance(name, str):
        raise PayloadError("tensor names must be strings")
    if isinstance(value, dict):
        try:
            dtype = np.dtype(_dtype_name(value["dtype"]))
            shape = tuple(int(d) for d in value["shape"])
            raw = _b64(value["data"])
            return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
        except PayloadError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PayloadError(f"{name!r}: expected {{data, dtype, shape}} ({exc})") from None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise PayloadError(f"{name!r} is not a nested list of numbers") from None
    return array


def _dtype_name(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    if not isinstance(name, str) or np.dtype(name).kind not in "fiub?":
        raise ValueError(f"unsupported dtype {name!r}")
    return name


def _torch():
    try:
        import torch
    except ImportError:
        raise PayloadError("this payload holds torch tensors but torch is not installed on "
                           "the server; send safetensors or numpy arrays") from None
    return torch


def _load_storage_from_bytes(data: bytes):
    """Safe stand-in for ``torch.storage._load_from_bytes`` (which allows any pickle)."""
    return _torch().load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _ml_dtype(name: str):
    import ml_dtypes
    return getattr(ml_dtypes, name)


# (module, name) -> how to resolve it; nothing else may be loaded.
_ALLOWED = {
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _np_attr("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _np_attr("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _np_attr("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _np_attr("numeric", "_frombuffer"),
    ("ml_dtypes", "bfloat16"): lambda: _ml_dtype("bfloat16"),
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _torch()._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): lambda: _torch()._utils._rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage_from_bytes,
}


def _np_attr(module: str, name: str):
    import importlib
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise PayloadError(f"numpy has no {module}.{name}")


class _TensorUnpickler(pickle.Unpickler):
    """An Unpickler that can rebuild numpy arrays and CPU torch tensors, and nothing else."""

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            hint = (" (a CUDA IPC handle from ForkingPickler/reduce_tensor; send the tensor "
                    "bytes instead)" if "multiprocessing" in module or "cuda" in name else "")
            raise PayloadError(f"refused to unpickle {module}.{name}: only numpy arrays and "
                               f"CPU torch tensors are accepted{hint}")
        return resolve()

    def persistent_load(self, pid):
        raise PayloadError("persistent ids are not accepted in a pickle payload")
