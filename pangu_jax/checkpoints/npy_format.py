"""A directory of one ``<MindSpore name>.npy`` per tensor, as the community's
``convert_mindspore_to_numpy.py`` writes it (same shapes and orientation as the ``.ckpt``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from .errors import CheckpointFormatError
from .storage import LazyTensor, implausible_dims

__all__ = ["read_npy_dir", "write_npy_dir"]


def read_npy_dir(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every ``*.npy`` in `path` by name (the file name without ``.npy``), memory-mapped on read."""
    path = Path(path)
    return {p.name[: -len(".npy")]: _npy_record(p) for p in sorted(path.glob("*.npy"))}


def _npy_record(path: Path) -> LazyTensor:
    """The array in native byte order: a big-endian file is read into a native copy."""
    def mapped() -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CheckpointFormatError(f"{path}: not a readable .npy array ({e})") from None

    def load() -> np.ndarray:
        array = mapped()
        return array.astype(array.dtype.newbyteorder("="), copy=False)

    header = mapped()  # reads the header only
    why = implausible_dims(header.shape, header.dtype.itemsize, path.stat().st_size)
    if why:
        raise CheckpointFormatError(f"{path}: {why}")
    return LazyTensor(header.shape, header.dtype.newbyteorder("="), load)


def write_npy_dir(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write each ``(name, array)`` as ``<name>.npy``, atomically (see `atomic_directory`)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        for name, array in tensors:
            _check_npy_entry(path, name, array)
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)


def _check_npy_entry(path: Path, name: str, array: np.ndarray) -> None:
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"{path}: tensor name {name!r} cannot be a file name")
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
        # .npy records bfloat16 as raw 2-byte voids, which no reader turns back into numbers.
        raise TypeError(f"{path}: tensor {name}: .npy cannot store {array.dtype}; choose float32 or float16")
