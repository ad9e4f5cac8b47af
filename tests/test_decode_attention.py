"""The Pallas decode-attention kernel, run by Pallas's interpreter: the model's attention, slot for slot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import PanguConfig, generate, load_checkpoint, model
from pangu_jax.decode_attention import decode_attention

from .conftest import FIXTURES


def _explicit(q, keys, values, key_positions, query_positions, scale):
    """The model's explicit path for one query per row (float32)."""
    scores = jnp.einsum("bnk,bsnk->bns", q, keys) * scale
    visible = (key_positions >= 0) & (key_positions <= query_positions[:, None])
    probs = jax.nn.softmax(jnp.where(visible[:, None, :], scores, -1e9), axis=-1)
    return jnp.einsum("bns,bsnk->bnk", probs, values)


def _cache(rng, batch, slots, heads, head_dim, starts, filled):
    """Random q/keys/values; row r holds positions 0.. from slot starts[r] up to `filled`."""
    q, keys, values = (rng.normal(size=shape).astype(np.float32)
                       for shape in ((batch, heads, head_dim), *[(batch, slots, heads, head_dim)] * 2))
    positions = np.full((batch, slots), -1, np.int32)
    for row, start in enumerate(starts):
        positions[row, start:filled] = np.arange(filled - start)
    return q, keys, values, positions, positions.max(axis=1)


@pytest.mark.parametrize("slots, filled, head_dim", [(20, 12, 10), (144, 97, 80), (70, 70, 16)])
def test_kernel_equals_the_explicit_attention(slots, filled, head_dim):
    """Head dims that are not powers of two, caches not a whole number of blocks, left padding."""
    rng = np.random.default_rng(slots)
    q, keys, values, positions, query = _cache(rng, 3, slots, 2, head_dim, (0, 5, filled - 1), filled)
    # Slots past `filled` hold stale data the kernel must not read.
    got = decode_attention(q, keys, values, positions, query, filled, scale=0.3, interpret=True)
    want = _explicit(q, keys, values, positions, query, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_masks_later_positions_and_zeroes_rows_that_see_nothing():
    rng = np.random.default_rng(1)
    q, keys, values, positions, _ = _cache(rng, 2, 20, 2, 8, (0, 0), 12)
    query = np.array([4, -1], np.int32)  # row 0 sees positions 0..4 only; row 1 sees nothing
    got = np.asarray(decode_attention(q, keys, values, positions, query, 12, scale=1.0, interpret=True))
    np.testing.assert_allclose(got[0], _explicit(q, keys, values, positions, query, 1.0)[0], rtol=1e-5, atol=1e-5)
    assert not got[1].any()


def test_kernel_keeps_bfloat16():
    rng = np.random.default_rng(2)
    q, keys, values, positions, query = _cache(rng, 2, 20, 2, 10, (0, 3), 12)
    as16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, keys, values)]
    got = decode_attention(*as16, positions, query, 12, scale=0.3, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = _explicit(*[x.astype(jnp.float32) for x in as16], positions, query, 0.3)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_greedy_decoding_through_the_kernel_equals_the_explicit_path(monkeypatch):
    """The model's decode steps through the kernel (prefill explicit, as on CPU): same tokens."""
    config, params = load_checkpoint(FIXTURES / "tiny_fp32.ckpt")
    params = model.unstack_layers(params)
    prompts = [[31, 47, 320, 155], [5, 9], [77, 78, 79, 80, 81, 82, 83, 84, 85]]
    want = generate(config, params, prompts, 8, temperature=0, stop_ids=())
    monkeypatch.setattr(model, "_decode_kernel", lambda c: True)
    monkeypatch.setattr(model, "decode_attention", functools.partial(decode_attention, interpret=True))
    jax.clear_caches()
    try:
        got = generate(config.replace(attention="auto"), params, prompts, 8, temperature=0, stop_ids=())
    finally:
        jax.clear_caches()
    assert got == want

