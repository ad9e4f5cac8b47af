"""PyTorch pickles (``torch.save`` files), read by torch's weights-only unpickler.

torch >= 1.6 writes a zip archive, which is memory-mapped: a tensor is read
only when converted. The legacy format (older torch, or
``_use_new_zipfile_serialization=False``) is a sequence of plain pickles
that torch cannot map, so such a file is read whole.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .errors import CheckpointFormatError
from .storage import implausible_dims

__all__ = ["check_dims", "import_torch", "load_torch", "pickled_globals", "torch_dtype", "torch_to_numpy"]


def import_torch(file: Path, reading: str, advice: str):
    """torch, imported only when a pickle must be read; else an error naming the file and what to do."""
    try:
        import torch
    except ImportError:
        raise CheckpointFormatError(
            f"{file}: reading {reading} needs torch, which is not installed; install torch, or {advice}"
        ) from None
    return torch


def load_torch(file: Path, allowed: Iterable = ()):
    """What `file` holds, on the CPU; a zip archive is memory-mapped.

    Callers call `import_torch` first, so that a missing torch is named as such.
    `allowed` is passed to ``torch.serialization.safe_globals``: classes, or
    (stand-in, "module.name") pairs, let through beside torch's own allowlist.
    torch raises many error types for corrupt or unsafe files; callers name the file.
    """
    import torch

    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))


def check_dims(file: Path, tensors: Mapping) -> None:
    """Refuse a tensor of `file` whose dims cannot be real (`implausible_dims`)."""
    size = file.stat().st_size
    for name, tensor in tensors.items():
        why = implausible_dims(tuple(tensor.shape), tensor.element_size(), size)
        if why:
            raise CheckpointFormatError(f"{file}: tensor {name}: {why}")


def pickled_globals(file: Path) -> set[str]:
    """Every ``module.name`` the pickle refers to, read without unpickling.

    torch.save writes pickle protocol 2, which names globals by GLOBAL
    opcodes only. A zip file keeps the pickle in ``<archive>/data.pkl``; a
    legacy file is a magic number, a protocol version and system info, each
    a small pickle, before the object's pickle.
    """
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            record = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
            return _globals_in(io.BytesIO(archive.read(record)), pickles=1)
    with open(file, "rb") as stream:
        return _globals_in(stream, pickles=4)


def _globals_in(stream, pickles: int) -> set[str]:
    names = set()
    for _ in range(pickles):
        names |= {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL"}
    return names


def torch_dtype(tensor) -> np.dtype:
    import torch

    if tensor.dtype == torch.bfloat16:
        return _bfloat16()
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def torch_to_numpy(tensor) -> np.ndarray:
    """Zero-copy view of a CPU tensor; numpy has no bfloat16, so those go through int16 bits."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_bfloat16())
    return tensor.numpy()


def _bfloat16() -> np.dtype:
    import ml_dtypes  # ships with jax

    return np.dtype(ml_dtypes.bfloat16)
