"""Assemble our parameter tree from a checkpoint's tensors, one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import jax
import numpy as np

from jax.sharding import Mesh

from ..config import DTYPES, PRESETS, PanguConfig, dtype_name, numpy_dtype
from ..quantize import quantize_params
from ..sharding import RULES, Rules, param_shardings
from .errors import CheckpointMismatchError
from .layout import Slot, TreePath, count_blocks, is_layernorm, is_training_state, mindspore_slots




class StoredTensor(Protocol):
    shape: tuple[int, ...]
    data: np.ndarray


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def infer_config(source: str, tensors: Mapping[str, StoredTensor]) -> PanguConfig:
    """Read the sizes off the tensor shapes; heads come from the matching preset."""
    vocab, hidden = _matrix_shape(source, tensors, "backbone.word_embedding.embedding_table")
    positions, _ = _matrix_shape(source, tensors, "backbone.position_embedding.embedding_table")
    layers = count_blocks(tensors) + 1
    for name, sizes in PRESETS.items():
        if sizes["hidden_size"] == hidden and sizes["num_layers"] == layers:
            return PanguConfig.preset(name, vocab_size=vocab, max_positions=positions)
    raise CheckpointMismatchError(
        f"{source}: hidden size {hidden} with {layers} layers matches no preset "
        f"({', '.join(PRESETS)}); say how many heads it has: a config file (--config in the scripts) or a PanguConfig"
    )


def _matrix_shape(source: str, tensors: Mapping[str, StoredTensor], name: str) -> tuple[int, int]:
    if name not in tensors:
        raise CheckpointMismatchError(f"{source}: no tensor {name}; is this a PanGu-alpha checkpoint?")
    shape = tuple(tensors[name].shape)
    if len(shape) != 2:
        raise CheckpointMismatchError(f"{source}: tensor {name} has shape {shape}; expected 2 dims")
    return shape


def _float_dtype_name(source: str, name: str, data: np.ndarray) -> str:
    for key in DTYPES:
        if data.dtype == numpy_dtype(key):
            return key
    raise CheckpointMismatchError(f"{source}: tensor {name} has dtype {data.dtype}; expected a float tensor")


def check_tensors(source: str, tensors: Mapping[str, StoredTensor], slots: dict[str, Slot], config: PanguConfig) -> None:
    """Shapes first (they say most when the wrong preset was named), then the name sets."""
    for name, slot in slots.items():
        if name not in tensors:
            continue
        shape = tuple(tensors[name].shape)
        if shape != slot.stored_shape:
            raise CheckpointMismatchError(
                f"{source}: tensor {name} has shape {shape}, expected {slot.stored_shape} "
                f"(hidden {config.hidden_size}, heads {config.num_heads}, vocab {config.vocab_size}, "
                f"positions {config.max_positions})"
            )
        _float_dtype_name(source, name, tensors[name].data)
    missing = [n for n in slots if n not in tensors]
    if missing:
        raise CheckpointMismatchError(
            f"{source}: missing tensor(s) {_listing(missing)} for a model with {config.num_layers} layers"
        )
    unexpected = [n for n in tensors if n not in slots and not is_training_state(n)]
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: unexpected tensor(s) {_listing(unexpected)} for a model with {config.num_layers} layers"
        )


def iter_leaves(tensors: Mapping[str, StoredTensor], config: PanguConfig) -> Iterator[tuple[TreePath, np.ndarray]]:
    """Each leaf of the tree `config` describes, as (tree path, array), built from its tensors when drawn.

    Leaves come in `config.param_dtype` (LayerNorm in float32). The generator
    keeps no leaf it has yielded, so a consumer that writes and drops each
    one holds a single leaf (the largest: a stacked blocks matrix).
    """
    target = numpy_dtype(config.param_dtype)
    for path, group in _slots_by_leaf(mindspore_slots(config)).items():
        yield path, _build_leaf(group, tensors, config, np.dtype(np.float32) if is_layernorm(path) else target)


def _slots_by_leaf(slots: dict[str, Slot]) -> dict[TreePath, list[Slot]]:
    """The slots of each leaf: one, or one per block (in layer order) for a stacked leaf."""
    leaves: dict[TreePath, list[Slot]] = {}
    for slot in slots.values():
        leaves.setdefault(slot.path, []).append(slot)
    return leaves


def _build_leaf(group: list[Slot], tensors: Mapping[str, StoredTensor], config: PanguConfig,
                dtype: np.dtype) -> np.ndarray:
    first = group[0]
    if first.layer is None:
        return np.array(first.to_ours(np.asarray(tensors[first.name].data), config), dtype, order="C")
    leaf = None
    for slot in group:
        layer = slot.to_ours(np.asarray(tensors[slot.name].data), config)
        if leaf is None:
            leaf = np.empty((len(group), *layer.shape), dtype)
        leaf[slot.layer] = layer
    return leaf


def assemble_params(
    source: str,
    tensors: Mapping[str, StoredTensor],
    config: PanguConfig | str | None = None,
    dtype: str | None = None,
    *,
    mesh: Mesh | None = None,
    rules: Rules = RULES,
    int8: bool = False,
) -> tuple[PanguConfig, dict]:
    """Check names and shapes against the config, then build the parameter tree.

    Host memory holds the model once in the target dtype plus one source
    tensor; each finished leaf moves to the default device, or into its
    shards on `mesh` by `rules`, and its host copy is dropped. `int8`
    quantizes the matrices on the host (`quantize.quantize_params`).
    """
    if isinstance(config, str):
        config = PanguConfig.preset(config)
    if config is None:
        config = infer_config(source, tensors)
    if dtype is None:
        word = "backbone.word_embedding.embedding_table"
        dtype = _float_dtype_name(source, word, tensors[word].data) if word in tensors else config.param_dtype
    dtype = dtype_name(dtype)
    config = config.replace(param_dtype=dtype, dtype=dtype)
    slots = mindspore_slots(config)
    check_tensors(source, tensors, slots, config)

    tree: dict = {}
    for path, leaf in iter_leaves(tensors, config):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    if int8:
        config, tree = quantize_params(config, tree)
    shardings = None if mesh is None else param_shardings(config, mesh, rules=rules)
    return config, _to_device(tree, shardings)


def _to_device(tree: dict, shardings: dict | None) -> dict:
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        target = None if shardings is None else shardings[key]
        out[key] = _to_device(value, target) if isinstance(value, dict) else jax.device_put(value, target)
    return out
