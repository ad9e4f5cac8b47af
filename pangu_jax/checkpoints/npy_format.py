"""A directory of one ``<MindSpore name>.npy`` per tensor, as the community's
``convert_mindspore_to_numpy.py`` writes it (same shapes and orientation as the ``.ckpt``).

Also home of the two pieces every directory format shares: `LazyTensor`, a
stored tensor read only when converted, and `atomic_directory`, which builds a
directory beside its destination and swaps it in at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .mindspore_format import CheckpointFormatError

__all__ = ["LazyTensor", "atomic_directory", "read_npy_dir", "write_npy_dir"]


class LazyTensor:
    """A stored tensor whose values are read only by ``np.asarray(record.data)``.

    ``data`` is the record itself: it has ``shape`` and ``dtype`` and reads the
    file in ``__array__``, each time anew, keeping nothing. So the loader can
    check every tensor's dtype before it reads any, and holds only the tensor
    it is placing.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, load: Callable[[], np.ndarray]) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._load = load

    @property
    def data(self) -> LazyTensor:
        return self

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._load()
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        return np.array(array, copy=True) if copy else array


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst`; on success it becomes `dst`.

    On any failure the temporary directory is removed and an existing `dst`
    is left as it was. An existing `dst` is replaced only once the new one
    is complete.
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dst: Path) -> None:
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def read_npy_dir(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every ``*.npy`` in `path` by name (the file name without ``.npy``), memory-mapped on read."""
    path = Path(path)
    return {p.name[: -len(".npy")]: _npy_record(p) for p in sorted(path.glob("*.npy"))}


def _npy_record(path: Path) -> LazyTensor:
    def load() -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CheckpointFormatError(f"{path}: not a readable .npy array ({e})") from None

    header = load()  # an mmap: reads the header only
    return LazyTensor(header.shape, header.dtype, load)


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
