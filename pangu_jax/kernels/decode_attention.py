"""One decode step's attention, with its cache write, as one Pallas (Triton) kernel.

For each row the step brings one new token: its query, key and value
projections (biases not yet added). One program per (row, head) adds the
biases, writes the new key and value into the cache slot `index` (the cache
buffers are aliased to the outputs, so nothing else is copied), and walks the
cache in blocks of `BLOCK_SLOTS` slots with an online softmax, only up to
that slot: a cache is allocated for the whole generation, so most of it is
still empty early on, and neither XLA's einsums nor cuDNN's kernel (for
PanGu's head_dim 80) stop there. Doing the bias adds and the write here
saves three small XLA kernels a layer. Triton wants power-of-two tiles, so
a head's `head_dim` values are read as the first of
`next_power_of_2(head_dim)` lanes, the rest masked off.

A long cache read by few programs (batch 1: one per head, far fewer than a
GPU has multiprocessors) walks its blocks one after another, so from
`SPLIT_FROM_SLOTS` slots on each (row, head)'s slots are split over several
programs that write partial softmax sums, joined after the kernel
(flash-decoding). benchmarks/README.md has the measurements.

The mask is the model's (`layers.visible`): a slot counts when its position
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
# From this many cache slots on, a (row, head)'s slots are split over up to
# one program a block, until rows x heads x splits reaches TARGET_PROGRAMS.
SPLIT_FROM_SLOTS = 256
TARGET_PROGRAMS = 1024


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def splits_per_head(batch: int, slots: int, heads: int) -> int:
    """Programs per (row, head): 1, or for a long cache and few rows x heads, up to one per block."""
    if slots < SPLIT_FROM_SLOTS:
        return 1
    return min(-(-TARGET_PROGRAMS // (batch * heads)), -(-slots // BLOCK_SLOTS))  # both ceilings are >= 1


def _kernel(q_ref, key_ref, value_ref, q_bias_ref, key_bias_ref, value_bias_ref, keys_ref, values_ref,
            key_pos_ref, query_pos_ref, index_ref, *out_refs, head_dim: int, slots: int, scale: float,
            split_blocks: int | None):
    """With `split_blocks`, this program covers only its split's blocks and writes its partial softmax."""
    if split_blocks is None:
        out_ref, keys_out_ref, values_out_ref = out_refs
    else:
        out_ref, best_ref, total_ref, keys_out_ref, values_out_ref = out_refs
    lanes = jnp.arange(q_ref.shape[0]) < head_dim

    def biased(ref, bias_ref):
        """ref + bias, rounded to ref's dtype (the compute dtype) as the model's add is."""
        total = plgpu.load(ref, mask=lanes, other=0).astype(jnp.float32) + plgpu.load(
            bias_ref, mask=lanes, other=0).astype(jnp.float32)
        return total.astype(ref.dtype)

    q = biased(q_ref, q_bias_ref).astype(jnp.float32) * scale
    new_key = biased(key_ref, key_bias_ref).astype(keys_ref.dtype)  # as the cache stores it
    new_value = biased(value_ref, value_bias_ref).astype(values_ref.dtype)
    # As lax.dynamic_update_slice does, an index past the end writes the last slot.
    slot = jnp.minimum(index_ref[()], slots - 1)
    blocks = (slot + BLOCK_SLOTS) // BLOCK_SLOTS  # through the new slot
    first = 0
    mine = lanes[None, :]
    if split_blocks is not None:
        first = pl.program_id(2) * split_blocks
        blocks = jnp.minimum(blocks, first + split_blocks)
        mine &= slot // BLOCK_SLOTS // split_blocks == pl.program_id(2)  # the split holding the new slot writes it
    plgpu.store(keys_out_ref.at[pl.ds(slot, 1), :], new_key[None, :], mask=mine)
    plgpu.store(values_out_ref.at[pl.ds(slot, 1), :], new_value[None, :], mask=mine)
    query_pos = query_pos_ref[()]

    def block(i, carry):
        best, total, acc = carry
        rows = i * BLOCK_SLOTS + jnp.arange(BLOCK_SLOTS)
        written = rows <= slot  # also keeps the unwritten rest of the last block unread
        span = pl.ds(i * BLOCK_SLOTS, BLOCK_SLOTS)
        key_pos = plgpu.load(key_pos_ref.at[span], mask=written, other=-1)
        seen = (key_pos >= 0) & (key_pos <= query_pos)
        tile_mask = written[:, None] & lanes[None, :]
        # The new slot comes from registers: this program's store above need
        # not be visible to its other threads yet.
        new_row = (rows == slot)[:, None]
        k = jnp.where(new_row, new_key[None, :], plgpu.load(keys_ref.at[span, :], mask=tile_mask, other=0))
        scores = jnp.where(seen, jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1), -jnp.inf)
        new_best = jnp.maximum(best, jnp.max(scores))
        probs = jnp.where(seen, jnp.exp(scores - new_best), 0.0)
        fade = jnp.exp(best - new_best)
        v = jnp.where(new_row, new_value[None, :], plgpu.load(values_ref.at[span, :], mask=tile_mask, other=0))
        return new_best, total * fade + jnp.sum(probs), acc * fade + jnp.sum(probs[:, None] * v.astype(jnp.float32),
                                                                             axis=0)

    start = (jnp.float32(-1e30), jnp.float32(0), jnp.zeros(q.shape, jnp.float32))
    best, total, acc = jax.lax.fori_loop(first, blocks, block, start)
    if split_blocks is None:
        out = acc / jnp.where(total > 0, total, 1.0)
        plgpu.store(out_ref, out.astype(out_ref.dtype), mask=lanes)
    else:
        plgpu.store(out_ref, acc, mask=lanes)
        best_ref[...] = best
        total_ref[...] = total


def _combine(acc: jax.Array, best: jax.Array, total: jax.Array) -> jax.Array:
    """The splits' partial softmaxes joined: `acc` [batch, heads, splits, head_dim] (the unnormalised
    outputs), `best` and `total` [batch, heads, splits] (their largest score and sum of exponentials)
    -> the attention output [batch, heads, head_dim] in float32."""
    weight = jnp.exp(best - best.max(-1, keepdims=True))
    den = (total * weight).sum(-1)
    return (acc * weight[..., None]).sum(2) / jnp.where(den > 0, den, 1.0)[..., None]


def _call(q, key, value, q_bias, key_bias, value_bias, keys, values, key_positions, query_positions, index,
          scale: float, interpret: bool):
    """q, key, value: three [batch, heads, head_dim] arrays, or one [batch, 3, heads, head_dim] array thrice."""
    batch, slots, heads, head_dim = keys.shape
    lanes = _next_power_of_2(head_dim)
    span = max(_next_power_of_2(slots), BLOCK_SLOTS)
    splits = splits_per_head(batch, slots, heads)
    token = pl.BlockSpec((None, None, lanes), lambda b, h, s: (b, h, 0))
    if q.ndim == 4:  # stacked: one block spec per third
        projections = [pl.BlockSpec((None, None, None, lanes), lambda b, h, s, i=i: (b, i, h, 0)) for i in range(3)]
    else:
        projections = [token] * 3
    bias = pl.BlockSpec((None, lanes), lambda b, h, s: (h, 0))
    cache = pl.BlockSpec((None, span, None, lanes), lambda b, h, s: (b, 0, h, 0))
    row = pl.BlockSpec((None,), lambda b, h, s: (b,))
    cache_shapes = [jax.ShapeDtypeStruct(keys.shape, keys.dtype), jax.ShapeDtypeStruct(values.shape, values.dtype)]
    if splits == 1:
        outs, out_shapes = [token], [jax.ShapeDtypeStruct((batch, heads, head_dim), q.dtype)]
    else:
        per_split = pl.BlockSpec((None, None, None), lambda b, h, s: (b, h, s))
        outs = [pl.BlockSpec((None, None, None, lanes), lambda b, h, s: (b, h, s, 0)), per_split, per_split]
        out_shapes = [jax.ShapeDtypeStruct((batch, heads, splits, head_dim), jnp.float32),
                      *[jax.ShapeDtypeStruct((batch, heads, splits), jnp.float32)] * 2]
    blocks = -(-slots // BLOCK_SLOTS)
    kernel = functools.partial(_kernel, head_dim=head_dim, slots=slots, scale=scale,
                               split_blocks=None if splits == 1 else -(-blocks // splits))
    *out, keys, values = pl.pallas_call(
        kernel,
        grid=(batch, heads, splits),
        in_specs=[*projections, bias, bias, bias, cache, cache,
                  pl.BlockSpec((None, span), lambda b, h, s: (b, 0)), row, row],
        out_specs=[*outs, cache, cache],
        out_shape=[*out_shapes, *cache_shapes],
        input_output_aliases={6: len(outs), 7: len(outs) + 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="pangu_decode_attention",
    )(q, key, value, q_bias, key_bias, value_bias, keys, values, key_positions, query_positions, index)
    return (out[0] if splits == 1 else _combine(*out).astype(q.dtype)), keys, values


def _shardings(mesh, arg_shapes):
    stacked = len(arg_shapes[0].shape) == 4
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 4
    rows, heads = spec[0], spec[2 if stacked else 1]
    token = NamedSharding(mesh, P(rows, heads, None))
    projection = NamedSharding(mesh, P(rows, None, heads, None)) if stacked else token
    bias = NamedSharding(mesh, P(heads, None))
    cache = NamedSharding(mesh, P(rows, None, heads, None))
    row = NamedSharding(mesh, P(rows))
    return ((token, cache, cache),
            (projection,) * 3 + (bias, bias, bias, cache, cache, NamedSharding(mesh, P(rows, None)), row, row))


def _partition(scale, interpret, mesh, arg_shapes, result_shape):
    out, args = _shardings(mesh, arg_shapes)

    def lower(*operands):
        return _call(*operands, scale, interpret)

    return mesh, lower, out, args


# On a mesh, every (row, head) is independent: XLA may split rows and heads
# however the inputs are split, but each device needs all of a head's slots
# and lanes. Without this rule it would gather the whole cache onto every device.
def _partitioned_call(projection: str):
    """`_call` under `custom_partitioning`, for projections laid out as `projection` ("b n d" or "b c n d")."""
    partitioned = custom_partitioning(_call, static_argnums=(11, 12))
    partitioned.def_partition(
        partition=_partition,
        infer_sharding_from_operands=lambda scale, interpret, mesh, arg_shapes, result_shape: _shardings(
            mesh, arg_shapes)[0],
        sharding_rule=f"{projection}, {projection}, {projection}, n d, n d, n d, b s n d, b s n d, b s, b, b"
                      " -> b n d, b s n d, b s n d",
        need_replication_factors=("c", "d", "s") if "c" in projection else ("d", "s"),  # in order of appearance
    )
    return partitioned


_SEPARATE, _STACKED = _partitioned_call("b n d"), _partitioned_call("b c n d")


@functools.partial(jax.jit, static_argnames=("scale", "interpret"), donate_argnames=("keys", "values"))
def decode_attention(qkv: jax.Array | tuple[jax.Array, jax.Array, jax.Array], keys: jax.Array, values: jax.Array,
                     key_positions: jax.Array, query_positions: jax.Array, index: jax.Array, *, scale: float,
                     biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write one new key/value per row at cache slot `index`, then attend to the cache.

    `qkv`: the new token's query, key and value projections, stacked
    [batch, 3, heads, head_dim] or three [batch, heads, head_dim] (which
    suits XLA better depends on the batch: see `layers.Attention`), to which
    `biases` (query, key, value biases, each [heads, head_dim]; default
    none) are added here, rounded to q's dtype (and the key and value then
    to the cache's). `keys`, `values` [batch, slots, heads, head_dim]: the
    cache, updated in place (donated). `key_positions` [batch, slots]: every
    slot's position with the new token's already written (-1: empty or
    padding); `query_positions` [batch]. Slots after `index` are never
    read. Returns the attention output softmax(scale * q.k) . v over the
    visible slots, [batch, heads, head_dim] in q's dtype (zeros for a row
    that sees no slot), and the updated keys and values.
    `interpret=True` runs the kernel in Pallas's interpreter (CPU). Inputs
    split over a mesh by rows and/or heads stay split.
    """
    batch, _, heads, head_dim = keys.shape
    stacked = not isinstance(qkv, (tuple, list))
    shapes = [getattr(x, "shape", None) for x in ((qkv,) if stacked else qkv)]
    if shapes != ([(batch, 3, heads, head_dim)] if stacked else [(batch, heads, head_dim)] * 3):
        raise ValueError(f"decode_attention: qkv must be [batch, 3, heads, head_dim] = {(batch, 3, heads, head_dim)}"
                         f" or three [batch, heads, head_dim] = {(batch, heads, head_dim)} (from the cache's shape "
                         f"{keys.shape}), got {shapes[0] if stacked else shapes}")
    q, key, value = (qkv,) * 3 if stacked else qkv
    if biases is None:
        biases = (jnp.zeros((heads, head_dim), q.dtype),) * 3
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (batch,))
    return tuple((_STACKED if stacked else _SEPARATE)(
        q, key, value, *biases, keys, values, key_positions.astype(jnp.int32), query_positions.astype(jnp.int32),
        index, scale, interpret))
