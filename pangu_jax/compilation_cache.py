"""JAX's persistent compilation cache, so a second start skips compiling."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import jax

from .paths import cache_dir


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Store compiled programs under `path` (default: the pangu-jax cache's `xla/`) and reuse them.

    Programs that compile in under half a second are not worth a disk entry
    and are left out. Returns the directory; the cache only saves time, so a
    directory that cannot be made or written warns once and returns None,
    leaving the cache off.
    """
    path = Path(path) if path is not None else cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        warnings.warn(f"compilation cache {path} cannot be written ({e.strerror or e}); going on without it, "
                      "so every start compiles anew", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
