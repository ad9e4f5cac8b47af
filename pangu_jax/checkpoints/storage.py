"""What every checkpoint format shares: `LazyTensor`, a stored tensor read only
when converted, and `atomic_directory`, which builds a directory beside its
destination and swaps it in at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .mindspore_format import CheckpointFormatError

__all__ = ["LazyTensor", "atomic_directory", "import_torch"]


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


def import_torch(file: Path, reading: str, advice: str):
    """torch, imported only when a pickle must be read; else an error naming the file and what to do."""
    try:
        import torch
    except ImportError:
        raise CheckpointFormatError(
            f"{file}: reading {reading} needs torch, which is not installed; install torch, or {advice}"
        ) from None
    return torch
