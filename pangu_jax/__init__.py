"""PanGu-alpha in JAX and Flax.

The names below are imported on first use, so that importing a submodule
that needs no JAX (`pangu_jax.config`, say, for a script's --help) stays quick.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PanguConfig": "config",
    "Sampler": "sampling",
    "Tokenizer": "tokenizer",
    "forward": "model",
    "generate": "decoding",
    "init_cache": "cache",
    "init_params": "model",
    "load_checkpoint": "checkpoints",
    "start": "decoding",
    "stream": "decoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pangu_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
