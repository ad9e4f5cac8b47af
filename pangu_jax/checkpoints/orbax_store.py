"""Our native checkpoint: the parameter tree saved by orbax, beside its config.

A store is a directory::

    params/         the parameter tree (orbax StandardCheckpointer)
    config.json     PanguConfig.to_json()
    pangu_jax.json  format version and the tokenizer it was trained with

It is restored from abstract shapes, so each array can go straight into its
shards on a device mesh without ever being whole on one device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from ..config import DTYPES, PanguConfig
from ..model import abstract_params
from ..sharding import RULES, Rules, param_shardings
from ..vocab import VOCAB_SHA256
from .layout import mindspore_slots
from .mindspore_format import CheckpointFormatError
from .storage import LazyTensor, atomic_directory

__all__ = ["FORMAT_VERSION", "MARKER", "load_orbax", "mindspore_view", "read_orbax_config", "save_orbax"]

FORMAT_VERSION = 1
MARKER = "pangu_jax.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER = {"vocab_sha256": VOCAB_SHA256, "eod_id": 8, "eot_id": 9, "pad_id": 6}

def save_orbax(path: str | os.PathLike, config: PanguConfig, params: Mapping) -> None:
    """Save `params` (the tree `config` describes) as a store at `path`, atomically."""
    path = Path(path).absolute()
    with atomic_directory(path) as tmp:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
        marker = {"format": "pangu_jax", "format_version": FORMAT_VERSION, "tokenizer": TOKENIZER}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def read_orbax_config(path: str | os.PathLike) -> PanguConfig:
    """The stored config, after checking the format version."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        config = PanguConfig.from_json(path / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable pangu_jax store ({e})") from None
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path / MARKER}: format_version {marker.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return config


def load_orbax(
    path: str | os.PathLike,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: Rules = RULES,
) -> tuple[PanguConfig, dict]:
    """Restore (config, params); `dtype` casts as `load_checkpoint` does (LayerNorm stays float32).

    Without `mesh` every array lands on the default device. With `mesh`, each
    parameter is restored directly into the `NamedSharding` its logical axes
    get under `rules` (`sharding.RULES` by default).
    """
    path = Path(path).absolute()
    config = read_orbax_config(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        config = config.replace(param_dtype=dtype, dtype=dtype)
    shardings = _shardings(config, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(config), shardings
    )
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        try:
            params = checkpointer.restore(path / PARAMS_DIR, target)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointFormatError(f"{path / PARAMS_DIR}: cannot restore the tree of {CONFIG_FILE} ({e})") from None
    return config, params


def _shardings(config: PanguConfig, mesh: Mesh | None, rules: Rules):
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_params(config))
    return param_shardings(config, mesh, rules=rules)


def mindspore_view(config: PanguConfig, params: Mapping) -> dict[str, LazyTensor]:
    """The tree's tensors under their MindSpore names and layout, each read from the device when converted."""
    views = {}
    for name, slot in mindspore_slots(config).items():
        leaf = params
        for key in slot.path:
            leaf = leaf[key]
        views[name] = LazyTensor(slot.stored_shape, np.dtype(leaf.dtype), _reader(leaf, slot, config))
    return views


def _reader(leaf, slot, config):
    def read() -> np.ndarray:
        value = leaf if slot.layer is None else leaf[slot.layer]
        return slot.from_ours(np.asarray(value), config)

    return read
