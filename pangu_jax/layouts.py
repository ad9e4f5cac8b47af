"""The two layouts of the ordinary blocks' parameters, and the adapter between them.

Stacked (`blocks/<leaf>` [layers, ...]): the blocks run under `nn.scan`, so
compile time does not grow with depth. Training and every checkpoint store
use it. Per layer (`blocks/{"0": ..., "1": ...}`): one array per block,
run by an unrolled loop. Decoding reads it fastest: XLA on a GPU copies a
layer's slice out of a stacked weight before each small product, while
separate arrays are read in place (benchmarks/README.md). `generate` and
`stream` take either and convert stacked parameters once
(`decoding.for_decoding`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

Params = dict[str, Any]


def is_per_layer(params: Params) -> bool:
    """Whether the blocks are per-layer dicts ("0", "1", ...) rather than stacked arrays."""
    return "0" in params["blocks"]


def per_layer(params: Params, *, free_stacked: bool = False) -> Params:
    """The same parameters with one array per block, the layout decoding reads fastest.

    Each layer is sliced out as its own array (on a device, a copy that keeps
    the stacked array's sharding). `free_stacked=True` frees each stacked
    device array as soon as it is split, so the peak is the model plus one
    stacked leaf rather than twice the model; the given tree is unusable
    afterwards. Per-layer parameters come back unchanged.
    """
    if is_per_layer(params):
        return params
    blocks = params["blocks"]
    count = jax.tree_util.tree_leaves(blocks)[0].shape[0]

    def split(a):
        parts = [a[i] for i in range(count)]
        if free_stacked and isinstance(a, jax.Array):
            a.delete()
        return parts

    pieces = jax.tree_util.tree_map(split, blocks)
    layers = {str(i): jax.tree_util.tree_map(lambda p, i=i: p[i], pieces, is_leaf=lambda x: isinstance(x, list))
              for i in range(count)}
    return {**params, "blocks": layers}


def stacked(params: Params) -> Params:
    """Undo `per_layer`: the blocks stacked on a leading layers axis (stacked parameters come back unchanged)."""
    if not is_per_layer(params):
        return params
    layers = params["blocks"]
    stack = jax.numpy.stack if any(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(layers)) else np.stack
    blocks = jax.tree_util.tree_map(lambda *a: stack(a), *(layers[str(i)] for i in range(len(layers))))
    return {**params, "blocks": blocks}
