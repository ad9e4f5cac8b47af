"""Sharding: one rules table, the same results on a mesh of 8 fake CPU devices as on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from pangu_jax import PanguConfig
from pangu_jax.sharding import RULES, RULES_SPLIT_VOCAB, check_mesh, make_mesh, parse_mesh_shape

_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from pangu_jax import generate, forward, load_checkpoint
from pangu_jax.model import unstack_layers
from pangu_jax.quantize import quantize_params
from pangu_jax.sharding import make_mesh, shard_params, RULES_SPLIT_VOCAB

assert jax.device_count() == 8
config, params = load_checkpoint(sys.argv[1])
layers = unstack_layers(params)
prompts = [[31, 47, 320, 155], [5, 9], [77, 78, 79, 80, 81, 82, 83, 84, 85]]
want = generate(config, params, prompts, 8, temperature=0, stop_ids=())
sampled = dict(temperature=1.0, top_k=20, seed=[1, 2, 3], stop_ids=())
want_sampled = generate(config, params, prompts, 8, **sampled)
tokens = jnp.asarray([prompts[2]])
want_logits = forward(config, params, tokens)[0]

for shape, tree in [("tensor=4", layers), ("data=2,tensor=4", layers), ("data=2,tensor=2", params), ("data=8", params)]:
    mesh = make_mesh(shape)
    placed = shard_params(config, tree, mesh)
    got = generate(config, placed, prompts, 8, temperature=0, stop_ids=())
    assert got == want, (shape, got, want)
    np.testing.assert_allclose(forward(config, placed, tokens)[0], want_logits, atol=1e-5)
    print("greedy equal on", shape)

mesh = make_mesh("data=2,tensor=4")
_, loaded = load_checkpoint(sys.argv[1], mesh=mesh, unstacked=True)
query = loaded["blocks"]["0"]["attention"]["query_kernel"]
assert query.sharding.spec == P("tensor", None, None), query.sharding.spec
assert loaded["blocks"]["0"]["mlp"]["down_kernel"].sharding.spec == P(None, "tensor")
assert loaded["word_embedding"].sharding.is_fully_replicated
assert generate(config, loaded, prompts, 8, **sampled) == want_sampled
print("sampled equal on data=2,tensor=4")

split = shard_params(config, layers, make_mesh("tensor=4"), rules=RULES_SPLIT_VOCAB)
assert split["word_embedding"].sharding.spec == P("tensor", None)
assert generate(config, split, prompts, 8, temperature=0, stop_ids=(), rules=RULES_SPLIT_VOCAB) == want

config8, int8 = quantize_params(config, layers)
want8 = generate(config8, int8, prompts, 8, temperature=0, stop_ids=())
assert generate(config8, shard_params(config8, int8, make_mesh("data=2,tensor=4")), prompts, 8,
                temperature=0, stop_ids=()) == want8
print("int8 equal on data=2,tensor=4")

# The GPU's decode paths (the attention kernel, here interpreted, and one-row
# products as reductions) keep their split rows, heads and matrices on the
# mesh, and decode what the explicit path and the einsum do.
from pangu_jax import model
from tests.conftest import interpreted_kernels
for name, value in interpreted_kernels().items():
    setattr(model, name, value)
model._reduction_rows = lambda: model.REDUCTION_ROWS
jax.clear_caches()
placed = shard_params(config, layers, make_mesh("data=2,tensor=4"))
assert generate(config, placed, prompts, 8, temperature=0, stop_ids=()) == want
# One row: the kernel takes q, k and v as three arrays (see model.Attention),
# and every product is a reduction, FFN down's summed over the mesh.
for shape in ("tensor=4", "data=2,tensor=4"):
    assert generate(config, shard_params(config, layers, make_mesh(shape)), prompts[:1], 8, temperature=0,
                    stop_ids=()) == want[:1]
    assert generate(config8, shard_params(config8, int8, make_mesh(shape)), prompts[:1], 8, temperature=0,
                    stop_ids=()) == want8[:1]
print("decode kernel and reductions equal on data=2,tensor=4")

# A cache long enough for the kernel to split each (row, head)'s slots over
# programs (and join them), on the mesh and off it.
from jax.sharding import NamedSharding
from pangu_jax.decode_attention import decode_attention
rng = np.random.default_rng(0)
b, s, n, d = 2, 300, 4, 8
qkv = rng.normal(size=(b, 3, n, d)).astype(np.float32)
keys, values = (rng.normal(size=(b, s, n, d)).astype(np.float32) for _ in range(2))
key_positions = np.broadcast_to(np.where(np.arange(s) <= 250, np.arange(s), -1), (b, s)).astype(np.int32)
query = np.full((b,), 250, np.int32)
run = lambda *a: decode_attention(*a, 250, scale=0.5, interpret=True)
want_kernel = run(jnp.asarray(qkv), jnp.asarray(keys), jnp.asarray(values), key_positions, query)
mesh = make_mesh("data=2,tensor=4")
put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
cache = ("data", None, "tensor", None)
got_kernel = run(put(qkv, "data", None, "tensor", None), put(keys, *cache), put(values, *cache),
                 put(key_positions, "data", None), put(query, "data"))
assert got_kernel[1].sharding.spec == P(*cache), got_kernel[1].sharding
for g, w in zip(got_kernel, want_kernel):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
print("split decode kernel equal on data=2,tensor=4")
"""


def test_sharded_generation_equals_unsharded_on_8_fake_devices():
    """XLA_FLAGS must be set before jax starts, hence the subprocess."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    fixture = Path(__file__).parent / "fixtures" / "tiny_fp32.ckpt"
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(fixture)], env=env,
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for shape in ("tensor=4", "data=2,tensor=4", "data=2,tensor=2", "data=8"):
        assert f"greedy equal on {shape}" in result.stdout
    assert "int8 equal on data=2,tensor=4" in result.stdout
    assert "decode kernel and reductions equal on data=2,tensor=4" in result.stdout
    assert "split decode kernel equal on data=2,tensor=4" in result.stdout


def test_mesh_shapes_parse_and_bad_ones_are_named():
    assert parse_mesh_shape("data=2,tensor=4") == {"data": 2, "tensor": 4}
    assert parse_mesh_shape(" tensor=1 ") == {"tensor": 1}
    with pytest.raises(ValueError, match=r"expected axis=size pairs like 'data=2,tensor=4', got 'tensor4'"):
        parse_mesh_shape("tensor4")
    with pytest.raises(ValueError, match=r"unknown axis 'model'; the axes are data, tensor"):
        parse_mesh_shape("model=2")
    with pytest.raises(ValueError, match=r"axis 'tensor' given twice or with size < 1"):
        parse_mesh_shape("tensor=2,tensor=2")
    with pytest.raises(ValueError, match=r"needs 64 devices, but only \d+ are visible"):
        make_mesh("data=8,tensor=8")
    mesh = make_mesh("tensor=1")
    assert dict(mesh.shape) == {"data": 1, "tensor": 1}


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


def test_one_device_mesh_runs_the_model_unchanged(tiny_fp32):
    from pangu_jax import generate
    from pangu_jax.sharding import shard_params

    config, params = tiny_fp32
    placed = shard_params(config, params, make_mesh("tensor=1", jax.devices()[:1]))
    prompts = [[31, 47, 320]]
    assert generate(config, placed, prompts, 5, temperature=0, stop_ids=()) == generate(
        config, params, prompts, 5, temperature=0, stop_ids=())


def test_meshes_with_explicit_axes_are_refused_with_the_way_out():
    import numpy as np
    from jax.sharding import AxisType, Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"),
                axis_types=(AxisType.Explicit, AxisType.Explicit))
    with pytest.raises(ValueError, match=r"mesh axes data \(Explicit\), tensor \(Explicit\) are not Auto.*make_mesh"):
        check_mesh(PanguConfig.preset("tiny"), mesh)
    check_mesh(PanguConfig.preset("tiny"), make_mesh("tensor=1"))
