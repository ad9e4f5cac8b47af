"""Attention of one new token per row over the key/value cache, as one Pallas (Triton) kernel.

One program per (row, head) walks the cache in blocks of `BLOCK_SLOTS`
slots with an online softmax, and only up to the last written slot: a
cache is allocated for the whole generation, so most of it is still empty
early on, and neither XLA's einsums nor cuDNN's kernel (for PanGu's
head_dim 80) stop there. Triton wants power-of-two tiles, so a head's
`head_dim` values are read as the first of `next_power_of_2(head_dim)`
lanes, the rest masked off.

The mask is the model's (`model._visible`): a slot counts when its position
is valid (>= 0) and not after the query's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BLOCK_SLOTS = 64


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernel(q_ref, keys_ref, values_ref, key_pos_ref, query_pos_ref, filled_ref, out_ref, *,
            head_dim: int, slots: int, scale: float):
    lanes = jnp.arange(q_ref.shape[0]) < head_dim
    q = plgpu.load(q_ref, mask=lanes, other=0).astype(jnp.float32) * scale
    query_pos = query_pos_ref[()]

    def block(i, carry):
        best, total, acc = carry
        rows = i * BLOCK_SLOTS + jnp.arange(BLOCK_SLOTS)
        in_cache = rows < slots
        span = pl.ds(i * BLOCK_SLOTS, BLOCK_SLOTS)
        key_pos = plgpu.load(key_pos_ref.at[span], mask=in_cache, other=-1)
        seen = (key_pos >= 0) & (key_pos <= query_pos)
        tile_mask = in_cache[:, None] & lanes[None, :]
        k = plgpu.load(keys_ref.at[span, :], mask=tile_mask, other=0).astype(jnp.float32)
        scores = jnp.where(seen, jnp.sum(k * q[None, :], axis=1), -jnp.inf)
        new_best = jnp.maximum(best, jnp.max(scores))
        probs = jnp.where(seen, jnp.exp(scores - new_best), 0.0)
        fade = jnp.exp(best - new_best)
        v = plgpu.load(values_ref.at[span, :], mask=tile_mask, other=0).astype(jnp.float32)
        return new_best, total * fade + jnp.sum(probs), acc * fade + jnp.sum(probs[:, None] * v, axis=0)

    start = (jnp.float32(-1e30), jnp.float32(0), jnp.zeros(q.shape, jnp.float32))
    blocks = (jnp.minimum(filled_ref[()], slots) + BLOCK_SLOTS - 1) // BLOCK_SLOTS
    _, total, acc = jax.lax.fori_loop(0, blocks, block, start)
    out = acc / jnp.where(total > 0, total, 1.0)
    plgpu.store(out_ref, out.astype(out_ref.dtype), mask=lanes)


def _call(q, keys, values, key_positions, query_positions, filled, scale: float, interpret: bool) -> jax.Array:
    batch, slots, heads, head_dim = keys.shape
    lanes = _next_power_of_2(head_dim)
    span = max(_next_power_of_2(slots), BLOCK_SLOTS)
    kernel = functools.partial(_kernel, head_dim=head_dim, slots=slots, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        in_specs=[
            pl.BlockSpec((None, None, lanes), lambda b, h: (b, h, 0)),
            pl.BlockSpec((None, span, None, lanes), lambda b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, span, None, lanes), lambda b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, span), lambda b, h: (b, 0)),
            pl.BlockSpec((None,), lambda b, h: (b,)),
            pl.BlockSpec((None,), lambda b, h: (b,)),
        ],
        out_specs=pl.BlockSpec((None, None, lanes), lambda b, h: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="pangu_decode_attention",
    )(q, keys, values, key_positions, query_positions, filled)


# On a mesh, every (row, head) is independent: XLA may split rows and heads
# however the inputs are split, but each device needs all of a head's slots
# and lanes. Without this rule it would gather the whole cache onto every device.
_partitioned = custom_partitioning(_call, static_argnums=(6, 7))


def _shardings(mesh, arg_shapes):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 3
    rows, heads = spec[0], spec[1]
    q = NamedSharding(mesh, P(rows, heads, None))
    cache = NamedSharding(mesh, P(rows, None, heads, None))
    return q, (q, cache, cache, NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P(rows)),
               NamedSharding(mesh, P(rows)))


def _partition(scale, interpret, mesh, arg_shapes, result_shape):
    out, args = _shardings(mesh, arg_shapes)

    def lower(*operands):
        return _call(*operands, scale, interpret)

    return mesh, lower, out, args


_partitioned.def_partition(
    partition=_partition,
    infer_sharding_from_operands=lambda scale, interpret, mesh, arg_shapes, result_shape: _shardings(
        mesh, arg_shapes)[0],
    sharding_rule="b n d, b s n d, b s n d, b s, b, b -> b n d",
    need_replication_factors=("d", "s"),  # in the order they first appear
)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, key_positions: jax.Array,
                     query_positions: jax.Array, filled: jax.Array, *, scale: float,
                     interpret: bool = False) -> jax.Array:
    """softmax(scale * q.k) . v over the visible cache slots: [batch, heads, head_dim].

    `q` [batch, heads, head_dim]; `keys`, `values` [batch, slots, heads,
    head_dim] (the cache); `key_positions` [batch, slots] (-1: empty or
    padding); `query_positions` [batch]; `filled`: how many leading slots
    were ever written (the rest are not read). A row that sees no slot gets
    zeros. `interpret=True` runs the kernel in Pallas's interpreter (CPU).
    Inputs split over a mesh by rows and/or heads stay split.
    """
    batch = q.shape[0]
    filled = jnp.broadcast_to(jnp.asarray(filled, jnp.int32), (batch,))
    return _partitioned(q, keys, values, key_positions.astype(jnp.int32), query_positions.astype(jnp.int32),
                        filled, scale, interpret)
