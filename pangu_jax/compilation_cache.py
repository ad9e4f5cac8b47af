"""JAX's persistent compilation cache, so a second start skips compiling."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from .vocab import cache_dir


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Store compiled programs under `path` (default: the pangu-jax cache's `xla/`) and reuse them.

    Programs that compile in under half a second are not worth a disk entry
    and are left out. Returns the directory.
    """
    path = Path(path) if path is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
