"""The Flax model against the fixtures, an independent NumPy pass, and itself with a cache."""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_jax import PanguConfig, forward, init_cache, load_checkpoint
from pangu_jax.checkpoints.loader import assemble_params
from pangu_jax.checkpoints.synthetic import random_mindspore_tensors
from pangu_jax.model import hidden_states
from tests.conftest import FIXTURES
from tests.reference import reference_forward

CASES = {  # checkpoint -> (expected logits, activation)
    "tiny_fp32": [("expected_logits_gelu_tanh", "gelu_tanh"), ("expected_logits_gelu_erf", "gelu_erf")],
    "tiny_fp16": [("expected_logits_fp16_gelu_tanh", "gelu_tanh")],
    "tiny_fp16_mixed": [("expected_logits_fp16_mixed_gelu_tanh", "gelu_tanh")],
}
# Half-precision compute against the float64 reference (logit absmax 6.9, std 1.7).
# Measured max abs error: bfloat16 0.063, float16 0.0078. bfloat16 keeps 8
# significant bits (unit roundoff 2^-9 = 2e-3) and float16 11 (2^-12 = 2.4e-4);
# the tolerances leave 2.5x headroom over what was measured, still far below
# what any mapping mistake costs (>= 0.17, fixtures/README.md) except the GELU
# flavour, which float32 tells apart.
HALF_TOLERANCE = {"bfloat16": 0.15, "float16": 0.02}


def _logits(config, params, seq):
    logits, _ = forward(config, params, jnp.asarray([seq]))
    return np.asarray(logits[0])


@pytest.mark.parametrize("ckpt, expected, activation",
                         [(c, e, a) for c, cases in CASES.items() for e, a in cases])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow),
                                   pytest.param("float16", marks=pytest.mark.slow)])
def test_logits_match_the_reference(ckpt, expected, activation, dtype, sequences):
    config, params = load_checkpoint(FIXTURES / f"{ckpt}.ckpt")
    config = config.replace(activation=activation, dtype=dtype)
    want = np.load(FIXTURES / f"{expected}.npy")
    tolerance = 1e-4 if dtype == "float32" else HALF_TOLERANCE[dtype]
    for row, seq in enumerate(sequences):
        got = _logits(config, params, seq)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[row, : len(seq)], rtol=0, atol=tolerance)


def test_float32_tells_the_gelu_flavours_apart(tiny_fp32, sequences):
    config, params = tiny_fp32
    erf = np.load(FIXTURES / "expected_logits_gelu_erf.npy")[1, : len(sequences[1])]
    assert np.abs(_logits(config, params, sequences[1]) - erf).max() > 1e-4


def test_hidden_states_match_the_reference(tiny_fp32, sequences):
    config, params = tiny_fp32
    want = np.load(FIXTURES / "expected_hidden_states_gelu_tanh.npy")
    for row, seq in enumerate(sequences):
        got = hidden_states(config, params, jnp.asarray([seq]))
        n = len(seq)
        np.testing.assert_allclose(got["embeddings"][0], want[0, row, :n], atol=1e-5)
        np.testing.assert_allclose(got["blocks"][0, 0], want[1, row, :n], atol=1e-5)
        np.testing.assert_allclose(got["top_input"][0], want[2, row, :n], atol=1e-5)
        np.testing.assert_allclose(got["output"][0], want[3, row, :n], atol=1e-5)


def test_numpy_reference_reproduces_the_fixture(fixture_weights, sequences):
    """Guards the guard: the independent NumPy pass itself matches the fixture."""
    want = np.load(FIXTURES / "expected_logits_gelu_tanh.npy")
    for row, seq in enumerate(sequences):
        got = reference_forward(fixture_weights, seq, heads=4, num_blocks=2)
        np.testing.assert_allclose(got, want[row, : len(seq)], atol=1e-5)


def _as_stored(tensors):
    return {n: SimpleNamespace(shape=a.shape, data=a) for n, a in tensors}


@settings(max_examples=12, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8]),
    layers=st.integers(2, 4),
    length=st.integers(1, 12),
    activation=st.sampled_from(["gelu_tanh", "gelu_erf"]),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow
def test_model_agrees_with_an_independent_numpy_pass(heads, head_dim, layers, length, activation, seed):
    config = PanguConfig(vocab_size=97, hidden_size=heads * head_dim, num_layers=layers, num_heads=heads,
                         ffn_size=4 * heads * head_dim, max_positions=16, activation=activation)
    weights = dict(random_mindspore_tensors(config, seed=seed, dtype="float32"))
    _, params = assemble_params("random", _as_stored(weights.items()), config)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, length)
    want = reference_forward(weights, tokens, heads=heads, num_blocks=layers - 1, activation=activation)
    np.testing.assert_allclose(_logits(config, params, tokens), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prefill", [1, 5, 16])
def test_decoding_with_the_cache_equals_the_full_forward(tiny_fp32, prefill):
    config, params = tiny_fp32
    seq = np.random.default_rng(prefill).integers(0, config.vocab_size, 20)
    full = _logits(config, params, seq)
    cache = init_cache(config, 1, 24)
    logits, cache = forward(config, params, jnp.asarray([seq[:prefill]]), cache=cache)
    steps = [np.asarray(logits[0])]
    for token in seq[prefill:]:
        logits, cache = forward(config, params, jnp.asarray([[token]]), cache=cache)
        steps.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-5)
    assert int(cache["index"]) == len(seq)


def test_left_padded_rows_compute_what_they_compute_alone(tiny_fp32, sequences):
    config, params = tiny_fp32
    width = max(map(len, sequences))
    tokens = np.full((2, width), 6, np.int32)
    positions = np.full((2, width), -1, np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, width - len(seq):] = seq
        positions[row, width - len(seq):] = np.arange(len(seq))
    logits, _ = forward(config, params, tokens, positions)
    for row, seq in enumerate(sequences):
        np.testing.assert_allclose(np.asarray(logits[row, width - len(seq):]), _logits(config, params, seq),
                                   rtol=0, atol=1e-5)


def test_forward_rejects_bad_token_shapes(tiny_fp32):
    config, params = tiny_fp32
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        forward(config, params, jnp.asarray([1, 2, 3]))
    with pytest.raises(ValueError, match="length 0"):
        forward(config, params, jnp.zeros((1, 0), jnp.int32))
    with pytest.raises(ValueError, match="positions shape"):
        forward(config, params, jnp.ones((1, 3), jnp.int32), jnp.arange(2)[None])
