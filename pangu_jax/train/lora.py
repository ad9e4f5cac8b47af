"""Low-rank adapters: which parameters train, and merging them into the base for export.

With `PanguConfig.lora_rank` > 0 each targeted matrix W gains `<W>_lora_a`
A [rank, in...] and `<W>_lora_b` B [out..., rank] beside it, and the model
computes x W + (alpha / rank) x A^T B^T (`layers.lora_delta`). Training
splits the tree into the adapters, which the optimizer updates, and the
frozen base, whose weight gradients are never computed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ..config import PanguConfig

__all__ = ["init_adapters", "is_adapter", "join", "merge_adapters", "split_trainable"]

Params = dict[str, Any]
_MATRICES = {"query": "query_kernel", "key": "key_kernel", "value": "value_kernel", "output": "output_kernel",
             "up": "up_kernel", "down": "down_kernel"}


def is_adapter(name: str) -> bool:
    return name.endswith(("_lora_a", "_lora_b"))


def split_trainable(config: PanguConfig, params: Params) -> tuple[Params, Params]:
    """(what trains, what stays frozen): with adapters, (the adapters, the base); else (everything, {})."""
    if config.lora_rank == 0:
        return params, {}

    def part(tree: Params, adapters: bool) -> Params:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                sub = part(value, adapters)
                if sub:
                    out[key] = sub
            elif is_adapter(key) == adapters:
                out[key] = value
        return out

    return part(params, True), part(params, False)


def join(trainable: Params, frozen: Params) -> Params:
    """The whole tree again from `split_trainable`'s two parts."""
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = join(value, frozen.get(key, {})) if isinstance(value, dict) else value
    return out


def init_adapters(config: PanguConfig, rng: jax.Array, shardings: Params | None = None) -> Params:
    """Fresh adapters for `config`'s targets, made straight into `shardings` (a tree like the parameters').

    A is drawn as the model's initialiser draws it, B is zero: a fresh
    adapter changes nothing. Only the adapters are made, not the base.
    """
    from ..model import abstract_params

    adapters, _ = split_trainable(config, abstract_params(config))
    if shardings is not None:
        shardings, _ = split_trainable(config, shardings)

    def make(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
        keys = jax.random.split(key, len(leaves))
        made = []
        for (path, shape), k in zip(leaves, keys):
            if str(path[-1].key).endswith("_lora_b"):
                made.append(jnp.zeros(shape.shape, shape.dtype))
            else:  # [rank, in...]: the model's normal(1 / sqrt(inputs))
                inputs = math.prod(shape.shape[_rank_axis(path) + 1:])
                made.append((jax.random.normal(k, shape.shape, jnp.float32) / math.sqrt(inputs)).astype(shape.dtype))
        return jax.tree_util.tree_unflatten(treedef, made)

    return jax.jit(make, out_shardings=shardings)(rng)


def _rank_axis(path) -> int:
    """The rank's axis of an A matrix: 1 in a stacked blocks leaf, else 0."""
    return 1 if str(path[0].key) == "blocks" else 0


def merge_adapters(config: PanguConfig, params: Params) -> tuple[PanguConfig, Params]:
    """The plain model (no adapters) computing what `params` with adapters computes: W + (alpha/rank) B A.

    Stacked blocks are merged layer by layer alike; the merged matrix keeps
    the base's dtype.
    """
    if config.lora_rank == 0:
        return config, params
    scale = config.lora_alpha / config.lora_rank

    def merge(tree: Params) -> Params:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = merge(value)
            elif not is_adapter(key):
                out[key] = value
        for target, kernel in _MATRICES.items():
            if f"{target}_lora_a" in tree:
                out[kernel] = _merged(tree[kernel], tree[f"{target}_lora_a"], tree[f"{target}_lora_b"], scale)
        return out

    return config.replace(lora_rank=0), merge(params)


@jax.jit
def _merged_matrix(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return (w.astype(jnp.float32) + scale * jnp.einsum("...or,...ri->...oi", b.astype(jnp.float32),
                                                       a.astype(jnp.float32))).astype(w.dtype)


def _merged(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale B A for W [layers?, out..., in...], A [layers?, rank, in...], B [layers?, out..., rank]."""
    lead = a.ndim + b.ndim - 2 - w.ndim  # 1 for a stacked leaf, else 0
    out_shape, in_shape = b.shape[lead:-1], a.shape[lead + 1:]
    flat_w = w.reshape(*w.shape[:lead], math.prod(out_shape), math.prod(in_shape))
    flat_a = a.reshape(*a.shape[:lead + 1], math.prod(in_shape))
    flat_b = b.reshape(*b.shape[:lead], math.prod(out_shape), b.shape[-1])
    return _merged_matrix(flat_w, flat_a, flat_b, scale).reshape(w.shape)
