import math

import jax
import pytest

from pangu_jax import PanguConfig
from pangu_jax.config import PRESETS, ConfigError
from pangu_jax.model import abstract_params, init_params, param_logical_axes

# PANGU.md, "Sizes": parameter counts in billions, to the precision it gives.
PAPER_SIZES = {"350M": (0.35, 0.01), "2.6B": (2.63, 0.005), "13B": (12.8, 0.05), "200B": (200, 10)}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_preset_parameter_counts_match_the_paper(name):
    config = PanguConfig.preset(name)
    expected, tolerance = PAPER_SIZES[name]
    assert abs(config.num_params() / 1e9 - expected) <= tolerance
    assert config.vocab_size == 40000 and config.max_positions == 1024
    assert config.layer_norm_epsilon == 1e-5 and config.ffn_size == 4 * config.hidden_size


@pytest.mark.parametrize("name", ["2.6B", "13B", "200B"])
def test_big_presets_have_the_right_shapes_without_allocating(name):
    config = PanguConfig.preset(name)
    shapes = abstract_params(config)
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == config.num_params()
    h, n, d = config.hidden_size, config.num_heads, config.head_dim
    assert shapes["blocks"]["attention"]["query_kernel"].shape == (config.num_layers - 1, n, d, h)
    assert shapes["top_query_layer"]["mlp"]["up_kernel"].shape == (4 * h, h)
    assert shapes["word_embedding"].shape == (40000, h)


def test_parameters_do_not_depend_on_the_kernels_a_config_names():
    """cuDNN's attention takes only 16-bit inputs and runs only on a GPU: initialising a config that names it
    goes through the portable kernels and gives the same parameters."""
    tiny = PanguConfig.preset("tiny")
    named = tiny.replace(attention="cudnn", decode_attention="pallas", matvec="reduction")
    same = jax.tree.map(lambda a, b: bool((a == b).all()), init_params(named, 3), init_params(tiny, 3))
    assert all(jax.tree.leaves(same))


def test_logical_axes_name_every_parameter_dimension():
    axes = param_logical_axes(PanguConfig.preset("tiny"))
    shapes = abstract_params(PanguConfig.preset("tiny"))
    for spec, shape in zip(jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree_util.tree_leaves(shapes)):
        assert len(spec) == len(shape.shape)
    assert axes["blocks"]["attention"]["query_kernel"] == jax.sharding.PartitionSpec("layers", "heads", "kv", "embed")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name, tmp_path):
    config = PanguConfig.preset(name, activation="gelu_erf", dtype="bfloat16")
    assert PanguConfig.from_json(config.to_json()) == config
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert PanguConfig.from_json(path) == config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=100, num_heads=3), "divisible by num_heads"),
        (dict(hidden_size=-64), "hidden_size must be a positive integer"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(num_layers=1), "num_layers counts the top query layer"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(dtype="int8"), "dtype must be one of float32, bfloat16, float16, float64"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be positive"),
        (dict(attention="flash"), r"attention must be one of \('auto', 'cudnn', 'explicit'\)"),
        (dict(decode_attention="flash"), r"decode_attention must be one of \('auto', 'pallas', 'pallas_interpret'"),
        (dict(matvec="gemv"), r"matvec must be one of \('auto', 'reduction', 'einsum'\)"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        PanguConfig.preset("tiny", **changes)


def test_unknown_preset_and_unknown_json_field():
    with pytest.raises(ConfigError, match="unknown preset '7B'"):
        PanguConfig.preset("7B")
    with pytest.raises(ConfigError, match=r"unknown PanguConfig field\(s\) \['hidden'\]"):
        PanguConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_auto_kernels_resolve_for_the_backend(dtype):
    config = PanguConfig.preset("2.6B", dtype=dtype)  # head_dim 80
    sixteen = dtype != "float32"
    gpu = config.resolved("gpu")
    assert (gpu.attention, gpu.decode_attention, gpu.matvec) == (
        ("cudnn", "pallas", "reduction") if sixteen else ("explicit", "explicit", "reduction"))
    cpu = config.resolved("cpu")
    assert (cpu.attention, cpu.decode_attention, cpu.matvec) == ("explicit", "explicit", "einsum")
    assert cpu.kernels() == "attention explicit, decode attention explicit, products einsum"
    assert config.resolved("gpu").resolved("cpu") == config.resolved("gpu")  # chosen kernels stay chosen
    chosen = config.replace(attention="explicit", decode_attention="cudnn", matvec="einsum")
    assert chosen.resolved("gpu") == chosen


@pytest.mark.parametrize("hidden, heads, fused", [(84, 2, False), (544, 2, False), (160, 2, True)])
def test_cudnn_attention_is_chosen_only_for_the_head_sizes_it_takes(hidden, heads, fused):
    config = PanguConfig.preset("tiny", hidden_size=hidden, num_heads=heads, dtype="bfloat16")
    resolved = config.resolved("gpu")  # head_dim 42 and 272: not a multiple of 8, or over 128
    assert (resolved.attention == "cudnn") == fused and resolved.decode_attention == "pallas"


def test_dtypes_are_taken_as_names_or_dtypes():
    import jax.numpy as jnp
    import numpy as np

    for given in ("bfloat16", jnp.bfloat16, jnp.dtype("bfloat16")):
        assert PanguConfig.preset("tiny", dtype=given).dtype == "bfloat16"
    assert PanguConfig.preset("tiny", param_dtype=np.float16).param_dtype == "float16"
    with pytest.raises(ConfigError, match="PanguConfig.dtype must be one of"):
        PanguConfig.preset("tiny", dtype=np.int32)


def test_a_float64_model_needs_64_bit_jax():
    config = PanguConfig.preset("tiny", dtype="float64", param_dtype="float64")
    if not jax.config.jax_enable_x64:
        with pytest.raises(ConfigError, match="jax_enable_x64"):
            config.resolved()
