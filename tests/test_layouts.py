"""Per-layer parameters, the fresh-cache prefill, one-row products and int8 weights."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import PanguConfig, forward, generate, init_cache, load_checkpoint
from pangu_jax.layouts import is_per_layer, per_layer, stacked
from pangu_jax.model import abstract_params, hidden_states, init_params, prefill
from pangu_jax.products import dot
from pangu_jax.quantize import quantize_matrix, quantize_params
from pangu_jax.sharding import make_mesh, shardings_like
from tests.conftest import FIXTURES, primitive_counts


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_per_layer_and_stacked_round_trip(tiny_fp32):
    config, params = tiny_fp32
    layers = per_layer(params)
    assert is_per_layer(layers) and not is_per_layer(params)
    assert sorted(layers["blocks"]) == [str(i) for i in range(config.num_blocks)]
    assert _same(stacked(layers), params) and _same(per_layer(stacked(layers)), layers)
    assert per_layer(layers) is layers and stacked(params) is params
    on_host = jax.tree.map(np.asarray, params)
    assert _same(stacked(per_layer(on_host)), on_host)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(per_layer, abstract_params(config)))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), layers)
    specs = shardings_like(config, make_mesh("tensor=1"), layers)
    assert tuple(specs["blocks"]["0"]["attention"]["query_kernel"].spec) == ("tensor", None, None)


def test_freeing_the_stacked_arrays_while_splitting_them(tiny_fp32):
    config, params = tiny_fp32
    copy = jax.tree.map(jnp.copy, params)
    layers = per_layer(copy, free_stacked=True)
    assert copy["blocks"]["mlp"]["up_kernel"].is_deleted() and not copy["word_embedding"].is_deleted()
    assert _same(layers, per_layer(params))


def test_per_layer_parameters_compute_the_same_model(tiny_fp32, sequences):
    config, params = tiny_fp32
    layers = per_layer(params)
    tokens = jnp.asarray([sequences[0]])
    np.testing.assert_allclose(forward(config, layers, tokens)[0], forward(config, params, tokens)[0], atol=1e-6)
    want, got = hidden_states(config, params, tokens), hidden_states(config, layers, tokens)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)
    prompts = [s[:n] for s, n in zip(sequences, (3, 9))]
    assert generate(config, layers, prompts, 8, temperature=0, stop_ids=()) == generate(
        config, params, prompts, 8, temperature=0, stop_ids=())


def test_a_per_layer_cache_decodes_like_the_full_forward(tiny_fp32):
    config, params = tiny_fp32
    layers = per_layer(params)
    seq = np.random.default_rng(3).integers(0, config.vocab_size, 12)
    full = forward(config, params, jnp.asarray([seq]))[0][0]
    cache = init_cache(config, 1, 16, params=layers)
    assert isinstance(cache["blocks"], tuple) and len(cache["blocks"]) == config.num_blocks
    logits, cache = forward(config, layers, jnp.asarray([seq[:5]]), cache=cache)
    steps = [logits[0]]
    for token in seq[5:]:
        logits, cache = forward(config, layers, jnp.asarray([[token]]), cache=cache)
        steps.append(logits[0])
    np.testing.assert_allclose(jnp.concatenate(steps), full, atol=1e-5)


@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_a_cache_keeps_its_own_dtype(tiny_fp32, layout):
    config, params = tiny_fp32
    params = layout(params)
    cache = init_cache(config, 1, 8, jnp.bfloat16, params=params)
    logits, cache = forward(config, params, jnp.asarray([[5, 6, 7]]), cache=cache)
    _, cache = forward(config, params, jnp.asarray([[8]]), cache=cache)
    assert {x.dtype for x in jax.tree.leaves((cache["blocks"], cache["top"]))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(logits, forward(config, params, jnp.asarray([[5, 6, 7]]))[0], atol=0.05)


def test_a_cache_of_the_other_layout_is_refused(tiny_fp32):
    config, params = tiny_fp32
    layers = per_layer(params)
    with pytest.raises(ValueError, match=r"blocks are per layer but the cache's are not.*params=params"):
        forward(config, layers, jnp.ones((1, 2), jnp.int32), cache=init_cache(config, 1, 4))
    with pytest.raises(ValueError, match=r"blocks are stacked but the cache's are not.*params=params"):
        forward(config, params, jnp.ones((1, 2), jnp.int32), cache=init_cache(config, 1, 4, params=layers))


@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_prefill_equals_forward_into_an_empty_cache(tiny_fp32, layout):
    config, params = tiny_fp32
    params = layout(params)
    tokens = jnp.asarray([[6, 6, 31, 47, 320], [5, 9, 11, 13, 17]], jnp.int32)
    positions = jnp.asarray([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]], jnp.int32)
    want_logits, want_cache = forward(config, params, tokens, positions, init_cache(config, 2, 8, params=params))
    got_logits, got_cache = prefill(config, params, tokens, positions, 8, last_only=False)
    real = np.asarray(positions) >= 0  # padding columns are never read: their values are free
    # Float32 rounding only: the cached forward also sums the (masked) empty slots.
    np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(want_logits)[real], atol=1e-5)
    np.testing.assert_array_equal(got_cache["positions"], want_cache["positions"])
    assert int(got_cache["index"]) == int(want_cache["index"]) == 5
    kv = lambda c: [c["top"]] + (list(c["blocks"]) if is_per_layer(params) else [c["blocks"]])  # noqa: E731
    for got, want in zip(kv(got_cache), kv(want_cache)):
        for name in ("key", "value"):
            np.testing.assert_allclose(np.asarray(got[name])[..., :5, :, :][..., real, :, :],
                                       np.asarray(want[name])[..., :5, :, :][..., real, :, :], atol=1e-6)
    with pytest.raises(ValueError, match="cache_length 4 cannot hold 5 tokens"):
        prefill(config, params, tokens, positions, 4)


def test_quantize_matrix_uses_one_scale_per_output_channel():
    w = np.array([[1.0, -0.5], [-2.0, 0.25], [0.5, 0.0]], np.float32)  # [in 3, out 2]
    values, scale = quantize_matrix(w, (1,))
    np.testing.assert_allclose(scale, [2.0 / 127, 0.5 / 127])
    np.testing.assert_array_equal(values[:, 0], [64, -127, 32])
    np.testing.assert_array_equal(values[:, 1], [-127, 64, 0])
    values, scale = quantize_matrix(np.zeros((2, 3), np.float32), (1,))
    assert values.dtype == np.int8 and not values.any() and (scale == 1).all()
    device_values, device_scale = quantize_matrix(jnp.asarray(w), (1,))
    np.testing.assert_array_equal(device_values, quantize_matrix(w, (1,))[0])


# Stated tolerance for int8 weights against float32 on the fixture model
# (logits of std ~1.7, max ~7): each weight moves by at most half a step,
# max|W[:, c]|/254 per output channel, and these errors add up over every
# matmul. Measured: max |logit error| 0.16, mean KL of the next-token
# distributions 3e-4 to 5e-4 nats. The bounds leave about 1.5x and 4x
# headroom and still catch a scale on the wrong axis (errors of order 1).
INT8_LOGIT_TOLERANCE = 0.25
INT8_MEAN_KL_TOLERANCE = 2e-3


@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_int8_logits_stay_within_the_stated_tolerance_of_float32(layout, sequences):
    config8, params8 = load_checkpoint(FIXTURES / "tiny_fp32.ckpt", int8=True)
    params8 = layout(params8)
    assert config8.weights == "int8"
    want = np.load(FIXTURES / "expected_logits_gelu_tanh.npy")  # MindSpore's float32 logits
    for row, seq in enumerate(sequences):
        got = forward(config8, params8, jnp.asarray([seq]))[0][0]
        expected = jnp.asarray(want[row, : len(seq)])
        err = float(jnp.abs(got - expected).max())
        assert 1e-4 < err < INT8_LOGIT_TOLERANCE  # int8 does change the numbers, within the bound
        p, q = jax.nn.log_softmax(expected), jax.nn.log_softmax(got)
        assert float((jnp.exp(p) * (p - q)).sum(-1).mean()) < INT8_MEAN_KL_TOLERANCE


def test_int8_on_the_device_equals_int8_on_the_host(tiny_fp32):
    config, params = tiny_fp32
    _, on_device = quantize_params(config, params)
    _, on_host = quantize_params(config, jax.tree.map(np.asarray, params))
    assert jax.tree.structure(on_device) == jax.tree.structure(on_host)
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(on_host)):
        if np.asarray(a).dtype == np.int8:
            assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 1  # ties may round apart
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with pytest.raises(ValueError, match="already int8"):
        quantize_params(config.replace(weights="int8"), on_device)


def test_int8_parameters_match_the_int8_model_shapes(tiny_fp32):
    config, params = tiny_fp32
    config8, params8 = quantize_params(config, per_layer(params))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(per_layer, abstract_params(config8)))
    assert want == jax.tree.map(lambda a: (a.shape, jnp.asarray(a).dtype), params8)
    assert params8["word_embedding"].dtype == jnp.int8 and params8["word_embedding_scale"].shape == (1000,)


def test_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match=r"weights must be one of \('float', 'int8'\), got 'int4'"):
        PanguConfig.preset("tiny", weights="int4")


REDUCED = PanguConfig.preset("tiny", dtype="float32", matvec="reduction")


@pytest.mark.parametrize("weights", ["float", pytest.param("int8", marks=pytest.mark.slow)])
@pytest.mark.parametrize("equation, x_shape, w_shape, channels, reduced", [
    ("bte,nke->btnk", (1, 1, 8), (3, 4, 8), (0, 1), True),  # query/key/value: output first
    ("bti,ei->bte", (1, 1, 6), (5, 6), (0,), True),  # attention output
    ("bti,oi->bto", (1, 1, 6), (7, 6), (0,), True),  # FFN up
    ("bti,oi->bto", (1, 1, 12), (3, 12), (0,), True),  # FFN down: rows cut in 4 parts
    ("bti,oi->bto", (1, 1, 10), (4, 10), (0,), True),  # 10 inputs per 4 outputs: rows not cut
    ("bte,ve->btv", (1, 1, 6), (9, 6), (0,), True),  # head
    ("bte,ef->btf", (1, 1, 6), (6, 7), (1,), False),  # input first: the einsum at any row count
])
def test_a_product_of_one_row_as_a_reduction_equals_the_einsum(weights, equation, x_shape, w_shape, channels,
                                                               reduced):
    config = REDUCED.replace(weights=weights)
    keys = jax.random.split(jax.random.key(0), 2)
    w = jax.random.normal(keys[1], w_shape)
    matrix = quantize_matrix(w, channels) if weights == "int8" else (w, None)
    x = jax.random.normal(keys[0], x_shape)
    one_row = dot(config, equation, x, matrix)
    assert one_row.shape[:2] == (1, 1)
    assert ("dot_general" in primitive_counts(lambda x: dot(config, equation, x, matrix), x)) != reduced
    # Two rows go through the einsum; each equals the reduction's row.
    two = jnp.concatenate([x, 2 * x])
    assert "dot_general" in primitive_counts(lambda x: dot(config, equation, x, matrix), two)
    two_rows = dot(config, equation, two, matrix)
    np.testing.assert_allclose(one_row[0], two_rows[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(2 * one_row[0], two_rows[1], rtol=1e-5, atol=1e-5)
    einsum = dot(config.replace(matvec="einsum"), equation, x, matrix)
    np.testing.assert_allclose(one_row, einsum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["float", pytest.param("int8", marks=pytest.mark.slow)])
def test_cached_generation_with_reductions_equals_teacher_forced_argmax(tiny_fp32, weights):
    config, params = quantize_params(*tiny_fp32) if weights == "int8" else tiny_fp32
    config = config.replace(matvec="reduction")
    prompt = [47, 320, 155]
    new = generate(config, params, [prompt], 15, temperature=0, stop_ids=())[0]  # decode: one row a product
    # A decode step's only einsums are its attention's (two a layer): every matrix, the head too, is reduced.
    layers = per_layer(params)
    step = primitive_counts(lambda p, c: forward(config, p, jnp.ones((1, 1), jnp.int32), cache=c), layers,
                            init_cache(config, 1, 8, params=layers))
    assert step["dot_general"] == 2 * config.num_layers
    logits, _ = forward(config, params, jnp.asarray([prompt + new]))  # 18 rows: the einsum
    assert np.argmax(np.asarray(logits[0, len(prompt) - 1 : -1]), axis=-1).tolist() == new


def test_a_product_the_reduction_cannot_take_is_refused():
    config = PanguConfig.preset("tiny", weights="int8")
    matrix = (jnp.zeros((4, 6), jnp.int8), jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"dot: 'bte,ef->bft' is not x \[rows..., in...\] times w"):
        dot(config, "bte,ef->bft", jnp.ones((1, 1, 4)), matrix)


def _block_calls(jaxpr) -> list:
    """The `_block` calls in a jaxpr, nested ones included."""
    calls = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pjit", "jit") and eqn.params["name"] == "_block":
            calls.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            calls += _block_calls(sub)
    return calls


@pytest.mark.slow
def test_every_per_layer_block_reuses_one_trace():
    config = PanguConfig.preset("tiny", num_layers=6)
    params = per_layer(init_params(config, 0))
    jaxpr = jax.make_jaxpr(lambda p, t: forward(config, p, t))(params, jnp.ones((1, 4), jnp.int32))
    calls = _block_calls(jaxpr.jaxpr)
    assert len(calls) == config.num_blocks == 5
    assert len({id(c.params["jaxpr"]) for c in calls}) == 1


@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_parameters_missing_or_of_the_wrong_shape_are_named(tiny_fp32, layout):
    import flax

    config, params = tiny_fp32
    params = layout(params)
    tokens = jnp.asarray([[5, 6, 7]])
    wrong = {**params, "final_ln": {**params["final_ln"], "scale": jnp.ones((3,))}}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r'"scale" in "/final_ln".*\(64,\).*\(3,\)'):
        forward(config, wrong, tokens)
    missing = {**params, "final_ln": {"scale": params["final_ln"]["scale"]}}
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match=r'"bias" in scope "/final_ln"'):
        forward(config, missing, tokens)
    if is_per_layer(params):
        blocks = params["blocks"]
        layer = {**blocks["1"], "mlp": {**blocks["1"]["mlp"], "up_bias": jnp.ones((2,))}}
        with pytest.raises(ValueError, match=r'block 1 \(blocks/1\): .*"up_bias" in "/mlp"'):
            forward(config, {**params, "blocks": {**blocks, "1": layer}}, tokens)
        with pytest.raises(ValueError, match=r"no parameters for block 1 \(blocks/1\); the model has 2 blocks"):
            forward(config, {**params, "blocks": {k: v for k, v in blocks.items() if k != "1"}}, tokens)
