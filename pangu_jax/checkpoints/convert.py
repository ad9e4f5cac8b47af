"""Convert a checkpoint to another format, and the checks around it (destination, MD5, logits).

Every format maps its names to MindSpore's (layout.py), so a conversion
streams source tensors, under their MindSpore names, into the target's
writer one at a time, cast on the way. An orbax target is written a leaf of
our tree at a time instead (a stacked blocks leaf gathers one tensor per
layer), each built from the source only when it is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..atomic import clear_stale
from ..config import PanguConfig, dtype_name, numpy_dtype
from ..model import forward
from .errors import CheckpointFormatError, ConversionCancelled, DestinationError
from .hf_format import write_hf
from .layout import is_layernorm, mindspore_slots
from .loader import check_tensors, infer_config, iter_leaves
from .loading import Source, detect_format, load_checkpoint, open_source
from .mindspore_format import iter_mindspore, write_mindspore
from .npy_format import write_npy_dir
from .orbax_store import save_orbax_stream
from .storage import LazyTensor

__all__ = ["FORMATS", "RELEASE_MD5", "ConversionSummary", "check_destination", "compare_logits", "convert",
           "verify_md5"]

FORMATS = ("orbax", "hf", "mindspore", "npy")

# PANGU.md, "Released checkpoints".
RELEASE_MD5 = {
    "Pangu-alpha_2.6B.ckpt": "da404a985671f1b5ad913631a4e52219",
    "PanguAlpha_2.6B_fp16.ckpt": "3a14e8bf50548a717160e89df7c14b63",
    "PanguAlpha_13b_fp16.ckpt": "f2734649b9b859ff4cf62d496291249a",
}


# --- conversion ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    source_format: str
    target_format: str
    config: PanguConfig  # as written: param_dtype is the target dtype
    source_dtype: str  # of the word embedding
    tensors: int
    bytes_written: int
    seconds: float
    tidied: tuple[str, ...] = ()  # what an earlier, interrupted write had left beside dst (`atomic.clear_stale`)


# The top-level names a checkpoint of each directory format may hold: an
# existing destination is replaced only when it holds nothing else.
_CHECKPOINT_NAMES = {
    "orbax": re.compile(r"(pangu_jax\.json|config\.json|params)"),
    "hf": re.compile(r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                     r"model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)"),
    "npy": re.compile(r"[^/]+\.npy"),
}


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, to: str, overwrite: bool = False) -> None:
    """Raise `DestinationError` unless writing a `to` checkpoint at `dst` can lose nothing the user has.

    The folder that will hold `dst` must exist and be writable. An existing
    `dst` is replaced only with `overwrite`, only by the same kind of thing
    (a file by a file), and only when it is a checkpoint of the `to` format
    and holds nothing else; an empty folder is always taken. Never the
    folder that holds `src`, nor the current folder.
    """
    dst, src = Path(dst), Path(src)
    where = Path(os.path.abspath(dst))
    if not where.parent.exists():
        raise DestinationError(f"{dst}: the folder {where.parent} does not exist; create it first")
    if not where.parent.is_dir():
        raise DestinationError(f"{dst}: {where.parent} is a file, not a folder")
    if not os.access(where.parent, os.W_OK | os.X_OK):
        raise DestinationError(f"{dst}: cannot write in {where.parent} (permission denied)")
    real, cwd = dst.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise DestinationError(f"{dst} is the current folder (or holds it); name a new folder for the {to} checkpoint")
    if real == src.resolve() or real in src.resolve().parents:
        raise DestinationError(f"{dst} holds the source {src}; choose another destination")
    if not os.path.lexists(dst):
        return
    if to == "mindspore":
        if dst.is_dir():
            raise DestinationError(f"{dst} is a folder; --to mindspore writes one .ckpt file: name a file")
    elif not dst.is_dir():
        raise DestinationError(f"{dst} is a file; --to {to} writes a folder: name a new folder")
    elif not any(dst.iterdir()):
        return
    if not overwrite:
        raise DestinationError(f"{dst} already exists; pass --overwrite to replace it (only a {to} checkpoint "
                               "is replaced)")
    if to == "mindspore":
        try:
            next(iter_mindspore(dst))
        except (CheckpointFormatError, StopIteration):
            raise DestinationError(f"{dst} is not a MindSpore checkpoint; --overwrite replaces only one") from None
        return
    foreign = sorted(p.name for p in dst.iterdir() if not _CHECKPOINT_NAMES[to].fullmatch(p.name))
    if foreign:
        raise DestinationError(f"{dst} holds {', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}, "
                               f"which no {to} checkpoint holds; --overwrite replaces only a {to} checkpoint: "
                               "move them or choose another destination")
    try:
        found = detect_format(dst)
    except CheckpointFormatError:
        found = None
    if found != to:
        raise DestinationError(f"{dst} is not a {to} checkpoint; --overwrite replaces only one")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "orbax",
    model: PanguConfig | str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    cancel: threading.Event | None = None,
) -> ConversionSummary:
    """Convert `src` (any format) to `dst` in format `to`, atomically.

    `model` overrides the config (needed for MindSpore/npy sources whose
    shapes match no preset); `dtype` casts every float tensor except the
    LayerNorm parameters, which stay float32 as in the original fp16
    network; None keeps each tensor's own dtype.

    `dst` is checked first (`check_destination`: an existing one is
    replaced only with `overwrite`), and what an interrupted earlier write
    to it left beside it is tidied away (`ConversionSummary.tidied`). Once
    `cancel` is set, the conversion stops before the next tensor, leaves
    nothing and raises `ConversionCancelled`.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected one of {FORMATS}")
    dtype = None if dtype is None else dtype_name(dtype)
    start = time.perf_counter()
    source = open_source(src)
    check_destination(source.path, dst, to, overwrite)
    config = _resolve_config(source, model)
    slots = mindspore_slots(config)
    check_tensors(str(source.path), source.tensors, slots, config)
    source_dtype = np.dtype(source.tensors["backbone.word_embedding.embedding_table"].data.dtype).name
    config = config.replace(param_dtype=dtype or source_dtype, dtype=dtype or source_dtype)
    plan = {name: _target_dtype(source.tensors[name].data.dtype, slot.path, dtype) for name, slot in slots.items()}
    if to == "npy" and any(d.name == "bfloat16" for d in plan.values()):
        raise ValueError(f"{dst}: .npy files cannot hold bfloat16 (no reader turns them back into numbers); "
                         "pass --dtype float32 or float16")
    tidied = tuple(clear_stale(dst))

    def tick_unless_cancelled(nbytes: int) -> None:
        if cancel is not None and cancel.is_set():
            raise ConversionCancelled(f"conversion to {dst} stopped before it finished; nothing was written")
        tick(nbytes)

    with _Progress(source, to, slots, progress) as tick:
        tensors = {name: _ticking(source.tensors[name], tick_unless_cancelled) for name in slots}
        if to == "orbax":
            save_orbax_stream(dst, config, iter_leaves(tensors, config))
        else:
            stream = ((name, np.asarray(tensors[name].data).astype(plan[name], copy=False))
                      for name in mindspore_slots(config))
            _write_stream(to, dst, config, stream, plan)
    seconds = time.perf_counter() - start
    return ConversionSummary(source.format, to, config, source_dtype, len(slots), _disk_size(Path(dst)), seconds,
                             tidied)


def _resolve_config(source: Source, model: PanguConfig | str | None) -> PanguConfig:
    if isinstance(model, str):
        return PanguConfig.preset(model)
    return model or source.config or infer_config(str(source.path), source.tensors)


def _target_dtype(stored: np.dtype, path: tuple[str, ...], dtype: str | None) -> np.dtype:
    if dtype is None:
        return np.dtype(stored)
    return np.dtype(np.float32) if is_layernorm(path) else numpy_dtype(dtype)


def _write_stream(to: str, dst, config: PanguConfig, stream: Iterator, plan: dict) -> None:
    if to == "mindspore":
        write_mindspore(dst, stream)
    elif to == "npy":
        write_npy_dir(dst, stream)
    else:
        write_hf(dst, config, stream, plan)


def _ticking(record, tick: Callable[[int], None]) -> LazyTensor:
    """The record, reporting its bytes to the progress bar when read."""
    def load() -> np.ndarray:
        array = np.asarray(record.data)
        tick(array.nbytes)
        return array

    return LazyTensor(record.shape, record.data.dtype, load)


class _Progress:
    """A tqdm bar over the bytes read from the source, with the tensor count beside it."""

    def __init__(self, source: Source, target: str, names, enabled: bool) -> None:
        from tqdm.auto import tqdm

        total = sum(math.prod(source.tensors[n].shape) * source.tensors[n].data.dtype.itemsize for n in names)
        self.count, self.tensors = 0, len(names)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{source.format} -> {target}", disable=not enabled)

    def __enter__(self) -> Callable[[int], None]:
        return self.tick

    def tick(self, nbytes: int) -> None:
        self.count += 1
        self.bar.set_postfix_str(f"{self.count}/{self.tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- checks --------------------------------------------------------------------------


def compare_logits(src, dst, config: PanguConfig, length: int = 8, seed: int = 0) -> float:
    """Max abs difference of the logits of `src` and `dst` on one random sequence.

    Each model runs in its own stored dtype, so an uncast conversion must
    agree exactly, and host memory holds one model at its stored size: the
    two are loaded one after the other, never both at once.
    """
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, min(length, config.max_positions))))

    def logits(path) -> np.ndarray:
        loaded, params = load_checkpoint(path, config)  # dtype None: as stored
        return np.asarray(forward(loaded, params, tokens)[0])

    return float(np.max(np.abs(logits(src) - logits(dst))))


def verify_md5(path: str | os.PathLike, *, allow_unknown: bool = False) -> str:
    """Check a released MindSpore file against PANGU.md's MD5 table; raise on a mismatch.

    The file is matched to a released one by name, ignoring case (the
    release spells 13B's `PanguAlpha_13b_fp16.ckpt`). A name the table does
    not know raises `CheckpointFormatError`, unless `allow_unknown`. Returns
    what was found.
    """
    path = Path(path)
    release = {name.lower(): name for name in RELEASE_MD5}.get(path.name.lower())
    if release is None:
        message = (f"{path.name}: no released file of that name, so no MD5 to check against "
                   f"(known: {', '.join(RELEASE_MD5)})")
        if allow_unknown:
            return f"{message}; not verified"
        raise CheckpointFormatError(f"{message}; rename it as released or pass --allow-unknown to convert unverified")
    expected = RELEASE_MD5[release]
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CheckpointFormatError(f"{path}: MD5 {digest.hexdigest()}, expected {expected} for the released {release}")
    return f"{path.name}: MD5 {expected} matches the released {release}"
