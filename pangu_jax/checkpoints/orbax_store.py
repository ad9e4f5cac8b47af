"""Our native checkpoint: the parameter tree saved by orbax a leaf at a time, beside its config.

A store (format version 4) is a directory::

    params/         one orbax checkpoint per leaf of the tree, named by its path
                    ("word_embedding", "blocks.mlp.up_kernel", ...; the blocks'
                    leaves are stacked [layers, ...])
    config.json     PanguConfig.to_json()
    pangu_jax.json  format version and the tokenizer it was trained with

Orbax saves what it is handed as one unit and keeps host copies of all of
it until the end; writing a leaf at a time lets a conversion build, write and
drop each leaf in turn, so the host never holds the whole model, only its
largest leaf (a stacked blocks matrix). Versions before 4 were written only
by development versions of this package and are refused.

A store is restored from abstract shapes, so each array can go straight into
its shards on a device mesh without ever being whole on one device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from ..config import PanguConfig, dtype_name
from ..model import abstract_params
from ..sharding import RULES, Rules, param_shardings
from ..special_tokens import EOD_ID, EOT_ID, PAD_ID
from ..vocab import VOCAB_SHA256
from ..atomic import atomic_directory
from .errors import CheckpointFormatError
from .layout import TreePath, mindspore_slots
from .storage import LazyTensor

__all__ = ["FORMAT_VERSION", "MARKER", "load_orbax", "mindspore_view", "read_orbax_config", "save_orbax",
           "save_orbax_stream"]

FORMAT_VERSION = 4
MARKER = "pangu_jax.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
WRITE_CHUNK_BYTES = 64 << 20  # the unit tensorstore encodes and writes a leaf in
TOKENIZER = {"vocab_sha256": VOCAB_SHA256, "eod_id": EOD_ID, "eot_id": EOT_ID, "pad_id": PAD_ID}


def save_orbax(path: str | os.PathLike, config: PanguConfig, params: Mapping) -> None:
    """Save `params` (the tree `config` describes) as a store at `path`, atomically."""
    save_orbax_stream(path, config, _flatten(params).items())


def save_orbax_stream(path: str | os.PathLike, config: PanguConfig,
                      leaves: Iterable[tuple[TreePath, jax.Array | np.ndarray]], *, alone: bool = False) -> None:
    """Save the tree `config` describes from (tree path, array) pairs, each written before the next is drawn.

    Every leaf must come exactly once, in any order. A numpy leaf is written
    as it is, without a copy, so the host holds one leaf (plus a few write
    chunks) as long as the iterator keeps no reference to what it yielded; a
    device array is copied to the host first, as orbax does. On any failure
    nothing is left at `path` (an existing store stays as it was).
    `alone`: this process writes host arrays by itself while the run's
    other processes do not take part (orbax waits for none of them).
    """
    expected = _flatten(abstract_params(config))
    path = Path(path).absolute()
    with atomic_directory(path) as tmp, _piece_writer(alone) as checkpointer:
        (tmp / PARAMS_DIR).mkdir()
        for key, value in leaves:
            _check_leaf(key, value, expected)
            _save_piece(checkpointer, tmp / PARAMS_DIR, key, value)
            del expected[key]
            del value  # before the iterator builds the next leaf
        if expected:
            raise ValueError(f"no array given for {_listing(list(expected))} of the tree the config describes")
        _write_metadata(tmp, config)


def _flatten(tree: Mapping) -> dict[TreePath, object]:
    """{tree path: leaf}, in the tree's order."""
    return {tuple(k.key for k in keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_leaf(key: TreePath, value, expected: dict) -> None:
    name = _piece_name(key)
    if key not in expected:
        raise ValueError(f"{name}: not a leaf of the tree the config describes, or given twice")
    want = expected[key]
    if tuple(value.shape) != tuple(want.shape) or np.dtype(value.dtype) != np.dtype(want.dtype):
        raise ValueError(f"{name}: {value.dtype}{list(value.shape)} given, the config describes "
                         f"{want.dtype}{list(want.shape)}")


def _piece_writer(alone: bool = False):
    """A synchronous orbax checkpointer that writes numpy arrays without copying them first (`alone`: see
    `save_orbax_stream`).

    Orbax copies a numpy array before an asynchronous save, in case the caller
    changes it meanwhile; this save returns only once the piece is written.
    Older orbax releases (0.12.4, say) have no such switch, and copy.
    """
    import inspect

    import orbax.checkpoint as ocp

    handler = ocp.type_handlers.NumpyHandler
    no_copy = ({"deepcopy_host_arrays": False}
               if "deepcopy_host_arrays" in inspect.signature(handler.__init__).parameters else {})
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler(**no_copy)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    processes = {}
    if alone:
        me = jax.process_index()
        processes = {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me,
                                                                                   active_processes={me})}
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, **processes), **processes)


def _save_piece(checkpointer, params_dir: Path, key: TreePath, value) -> None:
    """One leaf as its own orbax checkpoint, streamed to disk in chunks.

    By default a leaf is a single chunk in a single OCDBT data file, encoded
    whole in memory before any of it is written; with chunks and data files
    of WRITE_CHUNK_BYTES tensorstore writes and frees it a chunk at a time.
    """
    import orbax.checkpoint as ocp

    name = _piece_name(key)
    chunked = {name: ocp.SaveArgs(chunk_byte_size=WRITE_CHUNK_BYTES)}
    checkpointer.save(params_dir / name, args=ocp.args.PyTreeSave(
        {name: value}, save_args=chunked, ocdbt_target_data_file_size=WRITE_CHUNK_BYTES))


def _piece_name(key: TreePath) -> str:
    return ".".join(key)


def _listing(keys: list[TreePath], limit: int = 6) -> str:
    shown = ", ".join(_piece_name(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _write_metadata(directory: Path, config: PanguConfig) -> None:
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
    marker = {"format": "pangu_jax", "format_version": FORMAT_VERSION, "tokenizer": TOKENIZER}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def read_orbax_config(path: str | os.PathLike) -> PanguConfig:
    """The stored config, after checking the format version."""
    return _read_store(Path(path))


def _read_store(path: Path) -> PanguConfig:
    """The config of a store of the version this code reads."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        config = PanguConfig.from_json(path / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable pangu_jax store ({e})") from None
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path / MARKER}: format_version {version!r}; this version reads {FORMAT_VERSION}"
            + (" (earlier versions came from development builds: convert the original checkpoint again)"
               if isinstance(version, int) and version < FORMAT_VERSION else ""))
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
    config = _read_store(path)
    if dtype is not None:
        dtype = dtype_name(dtype)
        config = config.replace(param_dtype=dtype, dtype=dtype)
    shardings = _shardings(config, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(config), shardings
    )
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        leaves = [_restore_piece(checkpointer, path / PARAMS_DIR, key, spec) for key, spec in _flatten(target).items()]
    return config, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def _restore_piece(checkpointer, params_dir: Path, key: TreePath, spec: jax.ShapeDtypeStruct) -> jax.Array:
    """One leaf, restored from its own orbax checkpoint straight into its sharding."""
    name = _piece_name(key)
    try:
        return checkpointer.restore(params_dir / name, {name: spec})[name]
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointFormatError(
            f"{params_dir / name}: cannot restore tensor {name} as {spec.dtype}{list(spec.shape)} ({e})"
        ) from None


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
