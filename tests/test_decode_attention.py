"""The Pallas decode-attention kernel, run by Pallas's interpreter: the model's attention, slot for slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import generate, load_checkpoint
from pangu_jax.kernels.decode_attention import decode_attention, splits_per_head
from pangu_jax.layouts import per_layer

from .conftest import FIXTURES


def _explicit(q, keys, values, key_positions, query_positions, scale):
    """The model's explicit path for one query per row (float32)."""
    scores = jnp.einsum("bnk,bsnk->bns", q, keys) * scale
    visible = (key_positions >= 0) & (key_positions <= query_positions[:, None])
    probs = jax.nn.softmax(jnp.where(visible[:, None, :], scores, -1e9), axis=-1)
    return jnp.einsum("bns,bsnk->bnk", probs, values)


def _step(rng, batch, slots, heads, head_dim, starts, index):
    """A new token per row (projections, biases) and a cache written up to `index`.

    Row r holds positions 0.. from slot starts[r]; the new token goes to
    slot `index` with the next position. Slots after `index` hold stale data.
    """
    new = [rng.normal(size=(batch, heads, head_dim)).astype(np.float32) for _ in range(3)]
    biases = [rng.normal(size=(heads, head_dim)).astype(np.float32) for _ in range(3)]
    keys, values = (rng.normal(size=(batch, slots, heads, head_dim)).astype(np.float32) for _ in range(2))
    positions = np.full((batch, slots), -1, np.int32)
    for row, start in enumerate(starts):
        positions[row, start:index + 1] = np.arange(index + 1 - start)
    return new, biases, keys, values, positions, positions.max(axis=1)


def _want(new, biases, keys, values, positions, query, index, scale):
    """The explicit path: biases added, the new key/value written at `index`, attention over the cache."""
    q, k, v = (jnp.asarray(x) + jnp.asarray(b) for x, b in zip(new, biases))
    keys, values = (jnp.asarray(c).at[:, index].set(n) for c, n in ((keys, k), (values, v)))
    return _explicit(q, keys, values, positions, query, scale), keys, values


@pytest.mark.parametrize("stacked", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("slots, index, head_dim", [(20, 11, 10), (144, 96, 80), *(pytest.param(*case, marks=pytest.mark.slow)
                                                   for case in [(70, 69, 16), (130, 64, 8), (300, 11, 10)]),
                                                   (300, 250, 16), (260, 259, 8)])
def test_kernel_writes_the_new_slot_and_equals_the_explicit_attention(slots, index, head_dim, stacked):
    """Head dims that are not powers of two, caches not a whole number of blocks, the new slot first in a
    block, left padding; projections stacked in one array or three. From 256 slots the (row, head)s'
    slots are split over programs (most splits empty when `index` is early)."""
    rng = np.random.default_rng(slots)
    new, biases, keys, values, positions, query = _step(rng, 3, slots, 2, head_dim, (0, 5, index), index)
    want = _want(new, biases, keys, values, positions, query, index, 0.3)
    qkv = jnp.stack(new, 1) if stacked else tuple(new)
    got = decode_attention(qkv, keys.copy(), values.copy(), positions, query, index, scale=0.3,
                           biases=tuple(biases), interpret=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    # The cache comes back with the new slot written and every other slot as it was.
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slots, index", [(20, 11), (300, 200)], ids=["one-program", "split"])
def test_kernel_masks_later_positions_and_zeroes_rows_that_see_nothing(slots, index):
    rng = np.random.default_rng(1)
    new, biases, keys, values, positions, _ = _step(rng, 2, slots, 2, 8, (0, 0), index)
    query = np.array([4, -1], np.int32)  # row 0 sees positions 0..4 only; row 1 sees nothing
    got = np.asarray(decode_attention(tuple(new), keys.copy(), values.copy(), positions, query, index, scale=1.0,
                                      biases=tuple(biases), interpret=True)[0])
    want = _want(new, biases, keys, values, positions, query, index, 1.0)[0]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert not got[1].any()


@pytest.mark.parametrize("slots", [12, 260], ids=["one-program", "split"])
def test_kernel_without_biases_and_an_index_past_the_end_writes_the_last_slot(slots):
    """As lax.dynamic_update_slice clamps its index, so does the kernel."""
    rng = np.random.default_rng(3)
    new, _, keys, values, positions, query = _step(rng, 2, slots, 2, 8, (0, 3), slots - 1)
    got = decode_attention(jnp.stack(new, 1), keys.copy(), values.copy(), positions, query, slots + 28, scale=0.5,
                           interpret=True)
    want = _want(new, [np.zeros((2, 8), np.float32)] * 3, keys, values, positions, query, slots - 1, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_long_caches_split_over_programs_only_when_rows_and_heads_are_few():
    assert splits_per_head(1, 144, 32) == 1  # short cache: one program per (row, head)
    assert splits_per_head(1, 1024, 32) == 16  # one per block of 64 slots
    assert splits_per_head(4, 1024, 32) == 8
    assert splits_per_head(32, 1024, 32) == 1  # 1024 programs already


@pytest.mark.parametrize("qkv", [np.zeros((2, 2, 2, 8)), (np.zeros((2, 2, 8)),) * 2, (np.zeros((2, 2, 4)),) * 3])
def test_projections_of_the_wrong_shape_are_named(qkv):
    keys = np.zeros((2, 12, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"qkv must be \[batch, 3, heads, head_dim\]"):
        decode_attention(qkv, keys, keys.copy(), np.zeros((2, 12), np.int32), np.zeros(2, np.int32), 0,
                         scale=1.0, interpret=True)


def test_kernel_keeps_bfloat16_and_rounds_the_new_key_to_the_cache_dtype():
    rng = np.random.default_rng(2)
    new, biases, keys, values, positions, query = _step(rng, 2, 20, 2, 10, (0, 3), 11)
    as16 = [jnp.asarray(x, jnp.bfloat16) for x in new]
    bias16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in biases)
    got = decode_attention(jnp.stack(as16, 1), jnp.asarray(keys, jnp.float16), jnp.asarray(values, jnp.float16),
                           positions, query, 11, scale=0.3, biases=bias16, interpret=True)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float16
    # The model's rounding: q + bias in bfloat16, the new key then stored as the cache's float16.
    summed = [(a + b).astype(jnp.float16) for a, b in zip(as16, bias16)]
    np.testing.assert_array_equal(np.asarray(got[1][:, 11]), np.asarray(summed[1]))
    np.testing.assert_array_equal(np.asarray(got[2][:, 11]), np.asarray(summed[2]))
    q = (as16[0] + bias16[0]).astype(jnp.float32)
    cache = [np.asarray(c, np.float32) for c in got[1:]]
    want = _explicit(q, *cache, positions, query, 0.3)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), want, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [[[31, 47, 320, 155], [5, 9], [77, 78, 79, 80, 81, 82, 83, 84, 85]],
                                     [[77, 78, 79, 80, 81, 82, 83, 84, 85]]], ids=["batch-3-stacked", "batch-1-three"])
def test_greedy_decoding_through_the_kernel_equals_the_explicit_path(prompts):
    """The model's decode steps through the kernel (prefill explicit, as on CPU): same tokens."""
    config, params = load_checkpoint(FIXTURES / "tiny_fp32.ckpt")
    params = per_layer(params)
    want = generate(config, params, prompts, 8, temperature=0, stop_ids=())
    assert generate(config.replace(decode_attention="pallas_interpret"), params, prompts, 8, temperature=0,
                    stop_ids=()) == want
