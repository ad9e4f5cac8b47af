"""What every checkpoint reader shares: `LazyTensor`, a stored tensor read only
when converted, and `import_torch` for the formats that are PyTorch pickles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .mindspore_format import CheckpointFormatError

__all__ = ["LazyTensor", "import_torch"]


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


def import_torch(file: Path, reading: str, advice: str):
    """torch, imported only when a pickle must be read; else an error naming the file and what to do."""
    try:
        import torch
    except ImportError:
        raise CheckpointFormatError(
            f"{file}: reading {reading} needs torch, which is not installed; install torch, or {advice}"
        ) from None
    return torch
