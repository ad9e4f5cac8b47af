"""Sharding: one rules table, the same results on a mesh of 8 CPU devices (tests/conftest.py) as on one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pangu_jax import PanguConfig, forward, generate, load_checkpoint
from pangu_jax.kernels.decode_attention import decode_attention
from pangu_jax.layouts import per_layer, stacked
from pangu_jax.quantize import quantize_params
from pangu_jax.sharding import RULES, RULES_SPLIT_VOCAB, check_mesh, make_mesh, parse_mesh_shape, shard_params
from tests.conftest import FIXTURES

PROMPTS = [[31, 47, 320, 155], [5, 9], [77, 78, 79, 80, 81, 82, 83, 84, 85]]
GREEDY = dict(temperature=0, stop_ids=())
SAMPLED = dict(temperature=1.0, top_k=20, seed=[1, 2, 3], stop_ids=())


@pytest.fixture(scope="module")
def unsharded(tiny_fp32):
    """What one device generates: greedy, sampled, int8 greedy, and the logits of one prompt."""
    config, params = tiny_fp32
    config8, int8 = quantize_params(config, params)
    return {"greedy": generate(config, params, PROMPTS, 8, **GREEDY),
            "sampled": generate(config, params, PROMPTS, 8, **SAMPLED),
            "int8": generate(config8, int8, PROMPTS, 8, **GREEDY),
            "logits": forward(config, params, jnp.asarray([PROMPTS[2]]))[0]}


@pytest.mark.parametrize("shape", [*(pytest.param(s, marks=pytest.mark.slow) for s in ("tensor=4", "data=2,tensor=2", "data=8")),
                                   "data=2,tensor=4"])
@pytest.mark.parametrize("layout", [pytest.param(stacked, marks=pytest.mark.slow), per_layer])
def test_sharded_generation_equals_unsharded(tiny_fp32, unsharded, shape, layout):
    config, params = tiny_fp32
    placed = shard_params(config, layout(params), make_mesh(shape))
    assert generate(config, placed, PROMPTS, 8, **GREEDY) == unsharded["greedy"]
    np.testing.assert_allclose(forward(config, placed, jnp.asarray([PROMPTS[2]]))[0], unsharded["logits"], atol=1e-5)


def _split(array) -> tuple:
    """Which mesh axis splits each of the array's dims (None: none)."""
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def test_loading_onto_a_mesh_places_each_parameter_by_the_rules(unsharded):
    config, loaded = load_checkpoint(FIXTURES / "tiny_fp32.ckpt", mesh=make_mesh("data=2,tensor=4"))
    assert _split(loaded["blocks"]["attention"]["query_kernel"]) == (None, "tensor", None, None)
    assert _split(loaded["blocks"]["mlp"]["down_kernel"]) == (None, None, "tensor")
    assert loaded["word_embedding"].sharding.is_fully_replicated
    layers = per_layer(loaded)
    assert _split(layers["blocks"]["0"]["attention"]["query_kernel"]) == ("tensor", None, None)
    assert generate(config, layers, PROMPTS, 8, **SAMPLED) == unsharded["sampled"]


@pytest.mark.slow
def test_the_vocabulary_split_over_tensor_generates_the_same(tiny_fp32, unsharded):
    config, params = tiny_fp32
    split = shard_params(config, per_layer(params), make_mesh("tensor=4"), rules=RULES_SPLIT_VOCAB)
    assert _split(split["word_embedding"]) == ("tensor", None)
    assert generate(config, split, PROMPTS, 8, **GREEDY, rules=RULES_SPLIT_VOCAB) == unsharded["greedy"]


@pytest.mark.slow
def test_int8_weights_on_a_mesh_generate_the_same(tiny_fp32, unsharded):
    config8, int8 = quantize_params(*tiny_fp32)
    placed = shard_params(config8, per_layer(int8), make_mesh("data=2,tensor=4"))
    assert generate(config8, placed, PROMPTS, 8, **GREEDY) == unsharded["int8"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tensor=4", "data=2,tensor=4"])
def test_the_gpu_decode_paths_keep_their_splits_on_a_mesh(tiny_fp32, unsharded, shape):
    """The decode-attention kernel (interpreted) and one-row products as reductions, on the mesh: each row
    decodes what the explicit path and the einsum do (one row: q, k and v as three arrays, FFN down's
    reduction summed over the mesh)."""
    config, params = tiny_fp32
    gpu = config.replace(decode_attention="pallas_interpret", matvec="reduction")
    placed = shard_params(config, per_layer(params), make_mesh(shape))
    assert generate(gpu, placed, PROMPTS, 8, **GREEDY) == unsharded["greedy"]
    assert generate(gpu, placed, PROMPTS[:1], 8, **GREEDY) == unsharded["greedy"][:1]
    config8, int8 = quantize_params(config, params)
    placed8 = shard_params(config8, per_layer(int8), make_mesh(shape))
    assert generate(config8.replace(decode_attention="pallas_interpret", matvec="reduction"), placed8, PROMPTS[:1], 8,
                    **GREEDY) == unsharded["int8"][:1]


def test_a_long_cache_split_over_programs_stays_split_on_a_mesh():
    """Enough slots for the kernel to split each (row, head)'s slots over programs (and join them)."""
    rng = np.random.default_rng(0)
    b, s, n, d = 2, 300, 4, 8
    qkv = rng.normal(size=(b, 3, n, d)).astype(np.float32)
    keys, values = (rng.normal(size=(b, s, n, d)).astype(np.float32) for _ in range(2))
    key_positions = np.broadcast_to(np.where(np.arange(s) <= 250, np.arange(s), -1), (b, s)).astype(np.int32)
    query = np.full((b,), 250, np.int32)

    def run(*args):
        return decode_attention(*args, 250, scale=0.5, interpret=True)

    want = run(jnp.asarray(qkv), jnp.asarray(keys), jnp.asarray(values), key_positions, query)
    mesh = make_mesh("data=2,tensor=4")

    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    cache = ("data", None, "tensor", None)
    got = run(put(qkv, "data", None, "tensor", None), put(keys, *cache), put(values, *cache),
              put(key_positions, "data", None), put(query, "data"))
    assert _split(got[1]) == cache
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_mesh_shapes_parse_and_bad_ones_are_named():
    assert parse_mesh_shape("data=2,tensor=4") == {"data": 2, "tensor": 4}
    assert parse_mesh_shape(" tensor=1 ") == {"tensor": 1}
    with pytest.raises(ValueError, match=r"expected axis=size pairs like 'data=2,tensor=4', got 'tensor4'"):
        parse_mesh_shape("tensor4")
    with pytest.raises(ValueError, match=r"unknown axis 'model'; the axes are data, fsdp, tensor"):
        parse_mesh_shape("model=2")
    with pytest.raises(ValueError, match=r"axis 'tensor' given twice or with size < 1"):
        parse_mesh_shape("tensor=2,tensor=2")
    with pytest.raises(ValueError, match=r"needs 64 devices, but only \d+ are visible"):
        make_mesh("data=8,tensor=8")
    mesh = make_mesh("tensor=1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


class _FakeMesh:
    """Only what check_mesh reads: axis names and sizes (no devices needed)."""

    def __init__(self, **shape):
        self.shape = shape
        self.axis_names = tuple(shape)


@pytest.mark.parametrize("config, shape, message", [
    (PanguConfig.preset("tiny"), dict(data=1, tensor=8),
     r"cannot split heads \(4\) over mesh axis 'tensor' of size 8: 4 is not a multiple of 8"),
    (PanguConfig.preset("13B", vocab_size=40001), dict(data=1, tensor=4),
     r"cannot split vocab \(40001\) over mesh axis 'tensor' of size 4.*replicate the vocabulary"),
    (PanguConfig.preset("tiny", ffn_size=250), dict(data=1, tensor=4),
     r"cannot split mlp \(250\) over mesh axis 'tensor' of size 4"),
    (PanguConfig.preset("tiny"), dict(data=2),
     r"rules name mesh axes \['tensor'\], but the mesh has \['data'\]"),
])
def test_meshes_that_do_not_divide_the_model_are_refused(config, shape, message):
    with pytest.raises(ValueError, match=message):
        check_mesh(config, _FakeMesh(**shape), RULES_SPLIT_VOCAB)


def test_replicated_vocabulary_needs_no_divisible_vocab():
    check_mesh(PanguConfig.preset("13B", vocab_size=40001), _FakeMesh(data=1, tensor=4), RULES)


@pytest.mark.slow
def test_one_device_mesh_runs_the_model_unchanged(tiny_fp32):
    config, params = tiny_fp32
    placed = shard_params(config, params, make_mesh("tensor=1", jax.devices()[:1]))
    prompts = [[31, 47, 320]]
    assert generate(config, placed, prompts, 5, temperature=0, stop_ids=()) == generate(
        config, params, prompts, 5, temperature=0, stop_ids=())


def test_meshes_with_explicit_axes_are_refused_with_the_way_out():
    from jax.sharding import AxisType, Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"),
                axis_types=(AxisType.Explicit, AxisType.Explicit))
    with pytest.raises(ValueError, match=r"mesh axes data \(Explicit\), tensor \(Explicit\) are not Auto.*make_mesh"):
        check_mesh(PanguConfig.preset("tiny"), mesh)
    check_mesh(PanguConfig.preset("tiny"), make_mesh("tensor=1"))
