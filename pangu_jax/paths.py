"""Where pangu-jax keeps what it downloads and derives: the vocabulary, corpora, token ids, compiled programs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "PANGU_JAX_CACHE"


def cache_dir() -> Path:
    """Directory of pangu-jax's downloaded and derived files (``$PANGU_JAX_CACHE`` overrides)."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("pangu-jax"))
