"""What every checkpoint reader shares: `LazyTensor`, a stored tensor read only
when converted, `implausible_dims`, the check of a tensor header's dims, and
`read_json_object` for the JSON files beside the tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import CheckpointFormatError


__all__ = ["JSON_TYPES", "LazyTensor", "implausible_dims", "read_json_object"]

JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "an object", type(None): "null"}


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


def implausible_dims(shape: tuple[int, ...], itemsize: int, file_size: int) -> str | None:
    """Why a stored tensor's dims cannot be real, or None if they can.

    Matching the content length is not enough: beside a 0, a dim of any size
    still makes an empty tensor. So with each 0 taken as 1 the dims must fit
    in the file that holds them.
    """
    need = math.prod(max(dim, 1) for dim in shape) * itemsize
    if need <= file_size:
        return None
    return (f"dims {list(shape)} cannot be real: with each 0 taken as 1 they need {need} bytes, "
            f"more than the whole file ({file_size} bytes); corrupt tensor header")


def read_json_object(path: Path, needed_by: str) -> dict:
    """The JSON object `path` holds; a CheckpointFormatError names the file and what is wrong (missing: `needed_by`)."""
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path} does not exist; {needed_by}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointFormatError(f"{path}: holds {JSON_TYPES[type(fields)]}; expected a JSON object")
    return fields
