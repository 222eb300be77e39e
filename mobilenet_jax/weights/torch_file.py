"""Reads PyTorch ``.pth`` state dicts as NumPy arrays without importing torch.

``torch.save`` writes one of two formats, both a pickle whose tensors point into raw
storages:

* the zip format (PyTorch >= 1.6, torchvision's newer files): ``<archive>/data.pkl`` plus one
  ``<archive>/data/<key>`` entry of raw little-endian bytes per storage;
* the legacy format (older files such as torchvision's ``mobilenet_v2-b0353104.pth``): a
  magic-number pickle, a protocol pickle, a system-info pickle, the main pickle, the list of
  storage keys, then each storage as an int64 element count and its bytes.

The unpickler resolves only the names a state dict needs (``OrderedDict``, torch's tensor
rebuild functions and storage types); anything else is refused, so reading a file never
runs code from it, as ``torch.load(weights_only=True)`` promises.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from mobilenet_jax.errors import UnreadableFileError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsupportedFormatError(UnreadableFileError):
    """A well-formed file using a feature this reader does not implement (torch.load reads it)."""


class _Unsupported(pickle.UnpicklingError):
    pass


class _Storage:
    """A storage's dtype and key; its bytes are attached once read (legacy files list them after the pickle)."""

    def __init__(self, dtype: Any, key: str):
        self.dtype, self.key, self.data = dtype, key, None


class _Tensor:
    """A tensor waiting for its storage's bytes: storage, element offset, shape and strides."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def array(self) -> np.ndarray:
        flat = np.frombuffer(self.storage.data, dtype=self.storage.dtype)
        if not self.shape:
            return flat[self.offset].copy()
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage, offset, shape, stride, *_):
    return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *_):
    return data


def _storage_dtype(name: str) -> Any:
    if name == "BFloat16Storage":
        import ml_dtypes  # installed with JAX

        return ml_dtypes.bfloat16
    if name not in _STORAGE_DTYPES:
        raise _Unsupported(f"unsupported storage type torch.{name}")
    return _STORAGE_DTYPES[name]


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name.endswith("Storage"):
            return name  # the storage type travels as its name
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r:.60}")
        storage_type, key = saved_id[1], str(saved_id[2])
        if key not in self.storages:
            self.storages[key] = _Storage(_storage_dtype(storage_type), key)
        storage = self.storages[key]
        view = saved_id[5] if len(saved_id) > 5 else None
        if view is not None:  # legacy storage views: (view key, element offset, size)
            raise _Unsupported("storage views are not supported")
        return storage


def _materialize(tree: Any) -> Any:
    if isinstance(tree, _Tensor):
        return tree.array()
    if isinstance(tree, dict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_materialize(v) for v in tree)
    return tree


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("no <archive>/data.pkl entry")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise _Unsupported("big-endian files are not supported")
        storages: dict[str, _Storage] = {}
        result = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            storage.data = archive.read(f"{prefix}data/{key}")
    return result


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _Unpickler(f, {}).load()
        except Exception:  # any bytes at all may be here
            magic = None
        if magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("neither a complete zip archive nor a legacy PyTorch file; truncated?")
        if _Unpickler(f, {}).load() != LEGACY_PROTOCOL:
            raise _Unsupported("unsupported legacy protocol version")
        _Unpickler(f, {}).load()  # the system info: a dict of plain values
        storages: dict[str, _Storage] = {}
        result = _Unpickler(f, storages).load()
        keys = _Unpickler(f, {}).load()
        for key in keys:
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            size = count * np.dtype(storage.dtype).itemsize
            storage.data = f.read(size)
            if len(storage.data) != size:
                raise EOFError("the file ends inside a tensor")
    return result


def load(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path`` (a state dict), with tensors as NumPy arrays.

    Raises :class:`UnreadableFileError` (one sentence) for a truncated or corrupt file, or
    for a pickle that holds anything but tensors, dicts, lists and numbers.
    """
    try:
        result = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
        return _materialize(result)
    except _Unsupported as error:
        raise UnsupportedFormatError(f"{path!r} uses a PyTorch format feature this reader lacks ({error}).") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, zipfile.BadZipFile, struct.error) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableFileError(f"Could not read {path!r} as a PyTorch state dict ({detail}).") from None
