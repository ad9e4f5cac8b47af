"""The key/value cache: an explicit pytree passed into the model and returned, never hidden state.

    blocks     the ordinary blocks' {"key", "value"}, laid out like the
               parameters' blocks: stacked [layers, B, S, N, H] for stacked
               parameters, a tuple of per-layer [B, S, N, H] for per-layer ones
    top        the top query layer's {"key", "value"} [B, S, N, H]
    positions  [B, S] the position each slot holds (-1: empty or padding)
    index      the slot the next tokens are written at

A key is visible to a query when its position is valid and not after the
query's (`layers.visible`), which gives the causal mask, left padding and
decoding one rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .config import PanguConfig
from .layouts import is_per_layer

Cache = dict[str, Any]


def init_cache(config: PanguConfig, batch_size: int, length: int | None = None, dtype=None, *,
               params: dict | None = None) -> Cache:
    """An empty cache of `length` slots (default: every position) per row, laid out like `params`' blocks.

    Without `params` the blocks' keys and values are stacked, as the
    stacked parameters (training, checkpoints) want; pass per-layer
    parameters (`layouts.per_layer`) to get one entry per block.
    """
    length = config.max_positions if length is None else length
    if batch_size <= 0 or length <= 0:
        raise ValueError(f"init_cache needs a positive batch_size and length, got {batch_size} and {length}")
    dtype = config.jnp_dtype if dtype is None else dtype
    kv_shape = (batch_size, length, config.num_heads, config.head_dim)
    if params is not None and is_per_layer(params):
        blocks = tuple({n: jnp.zeros(kv_shape, dtype) for n in ("key", "value")} for _ in range(config.num_blocks))
    else:
        blocks = {n: jnp.zeros((config.num_blocks, *kv_shape), dtype) for n in ("key", "value")}
    return {
        "blocks": blocks,
        "top": {n: jnp.zeros(kv_shape, dtype) for n in ("key", "value")},
        "positions": jnp.full((batch_size, length), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def next_positions(cache: Cache, length: int) -> jax.Array:
    """Positions that continue each cached row: one past its last real token ([B, length])."""
    start = cache["positions"].max(axis=1) + 1
    return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def written_positions(cache: Cache, positions: jax.Array) -> jax.Array:
    """The cache's slot positions once `positions` [B, T] are written at its index."""
    return lax.dynamic_update_slice_in_dim(cache["positions"], positions, cache["index"], 1)


def check_layout(cache: Cache, params: dict) -> None:
    """Refuse a cache laid out unlike the parameters, saying how to make the right one."""
    if isinstance(cache["blocks"], tuple) != is_per_layer(params):
        layout = "per layer" if is_per_layer(params) else "stacked"
        raise ValueError(f"the parameters' blocks are {layout} but the cache's are not; "
                         "make the cache with init_cache(config, batch, params=params)")
