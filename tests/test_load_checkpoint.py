"""load_checkpoint on MindSpore files: presets, dtypes and every mismatch error."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import PanguConfig, forward, load_checkpoint
from pangu_jax.assets import EMBEDDED_CHECKPOINT
from pangu_jax.checkpoints import CheckpointFormatError, CheckpointMismatchError
from pangu_jax.checkpoints.mindspore_format import read_mindspore_index, write_mindspore
from tests.conftest import FIXTURES, load_script

FP32 = FIXTURES / "tiny_fp32.ckpt"


def _rewrite(tmp_path, edit):
    """A copy of the fp32 fixture with `edit(list of (name, array))` applied."""
    tensors = [(r.name, np.array(r.data)) for r in read_mindspore_index(FP32).values()]
    path = tmp_path / "edited.ckpt"
    write_mindspore(path, edit(tensors))
    return path


def test_preset_is_inferred_from_the_shapes():
    config, params = load_checkpoint(FP32)
    assert config == PanguConfig.preset("tiny")
    assert params["blocks"]["attention"]["query_kernel"].shape == (2, 4, 16, 64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_any_file_loads_to_any_dtype_with_layernorm_in_float32(dtype):
    for name in ("tiny_fp32", "tiny_fp16", "tiny_fp16_mixed"):
        config, params = load_checkpoint(FIXTURES / f"{name}.ckpt", dtype=dtype)
        assert config.param_dtype == config.dtype == dtype
        assert params["word_embedding"].dtype == jnp.dtype(dtype)
        assert params["blocks"]["mlp"]["up_kernel"].dtype == jnp.dtype(dtype)
        assert params["final_ln"]["scale"].dtype == jnp.float32
        assert params["top_query_layer"]["ln2"]["bias"].dtype == jnp.float32


def test_default_dtype_is_the_files_own():
    assert load_checkpoint(FIXTURES / "tiny_fp16_mixed.ckpt")[0].dtype == "float16"
    assert load_checkpoint(FP32)[0].dtype == "float32"


def test_embedded_demo_model_loads_and_runs():
    config, params = load_checkpoint(EMBEDDED_CHECKPOINT)
    assert config == PanguConfig.preset("tiny-40k", param_dtype="float16", dtype="float16")
    logits, _ = forward(config, params, jnp.asarray([[3826, 11, 21652, 16, 28]]))
    assert logits.shape == (1, 5, 40000) and bool(jnp.isfinite(logits).all())


def test_embedded_demo_model_is_what_build_tiny_writes_in_mindspores_order(tmp_path):
    from pangu_jax.checkpoints.layout import mindspore_slots

    build_tiny = load_script("checkpoints/build_tiny.py")
    build_tiny.main(["--out", str(tmp_path / "tiny.ckpt")])
    assert (tmp_path / "tiny.ckpt").read_bytes() == EMBEDDED_CHECKPOINT.read_bytes()
    assert list(read_mindspore_index(EMBEDDED_CHECKPOINT)) == list(mindspore_slots(PanguConfig.preset("tiny-40k")))


def test_build_tiny_rewrites_the_embedded_model_only_when_asked(capsys):
    before = EMBEDDED_CHECKPOINT.stat().st_mtime_ns
    with pytest.raises(SystemExit) as info:
        load_script("checkpoints/build_tiny.py").main([])
    assert info.value.code == 2 and "one of the arguments --out --overwrite is required" in capsys.readouterr().err
    assert EMBEDDED_CHECKPOINT.stat().st_mtime_ns == before


def test_training_state_beside_the_weights_is_ignored(tmp_path):
    extra = [("global_step", np.array([7], np.int32)), ("adam_m.backbone.layernorm.gamma", np.zeros(64, np.float32))]
    path = _rewrite(tmp_path, lambda t: t + extra)
    np.testing.assert_array_equal(load_checkpoint(path)[1]["final_ln"]["scale"],
                                  load_checkpoint(FP32)[1]["final_ln"]["scale"])


def test_missing_tensor_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda t: [x for x in t if x[0] != "backbone.blocks.1.attention.dense2.bias"])
    with pytest.raises(CheckpointMismatchError, match=r"edited\.ckpt: missing tensor\(s\) backbone\.blocks\.1\.attention\.dense2\.bias"):
        load_checkpoint(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda t: t + [("backbone.mystery.weight", np.zeros(3, np.float32))])
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensor\(s\) backbone\.mystery\.weight"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    def shrink(tensors):
        return [(n, a[:, :32] if n.endswith("top_query_layer.output.mapping.weight") else a) for n, a in tensors]

    with pytest.raises(CheckpointMismatchError,
                       match=r"tensor backbone\.top_query_layer\.output\.mapping\.weight has shape \(64, 32\), expected \(64, 256\)"):
        load_checkpoint(_rewrite(tmp_path, shrink))


def test_a_config_that_contradicts_the_file_is_refused():
    with pytest.raises(CheckpointMismatchError, match=r"word_embedding.embedding_table has shape \(1000, 64\), expected \(40000, 2560\)"):
        load_checkpoint(FP32, "2.6B")
    with pytest.raises(CheckpointMismatchError, match=r"missing tensor\(s\) backbone\.blocks\.2\."):
        load_checkpoint(FP32, PanguConfig.preset("tiny", num_layers=4))


@pytest.mark.parametrize("name, shape", [
    ("backbone.word_embedding.embedding_table", (10, 100, 64)),
    ("backbone.position_embedding.embedding_table", (128 * 64,)),
])
def test_a_tensor_the_config_is_read_from_must_be_a_matrix(tmp_path, name, shape):
    path = _rewrite(tmp_path, lambda t: [(n, a.reshape(shape) if n == name else a) for n, a in t])
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: tensor {name} has shape {shape}; expected 2 dims"


def test_unknown_sizes_ask_for_a_config(tmp_path):
    def drop_last_block(tensors):
        return [(n, a) for n, a in tensors if not n.startswith("backbone.blocks.1.")]

    with pytest.raises(CheckpointMismatchError, match="hidden size 64 with 2 layers matches no preset"):
        load_checkpoint(_rewrite(tmp_path, drop_last_block))
    config = PanguConfig.preset("tiny", num_layers=2)
    assert load_checkpoint(_rewrite(tmp_path, drop_last_block), config)[0].num_layers == 2


def test_integer_weights_are_refused(tmp_path):
    path = _rewrite(tmp_path, lambda t: [(n, a.astype(np.int32) if n == "backbone.layernorm.beta" else a) for n, a in t])
    with pytest.raises(CheckpointMismatchError, match="backbone.layernorm.beta has dtype int32; expected a float tensor"):
        load_checkpoint(path)


def test_missing_path_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    data = FP32.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"truncated\.ckpt.*tensor"):
        load_checkpoint(truncated)
    flipped = tmp_path / "flipped.ckpt"
    corrupt = bytearray(data)
    corrupt[2] ^= 0xFF  # inside the first entry's length prefix
    flipped.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointFormatError, match="flipped.ckpt"):
        load_checkpoint(flipped)


def test_a_huge_dim_beside_a_zero_is_a_corrupt_header_not_a_size(tmp_path):
    name = "backbone.position_embedding.embedding_table"
    path = _rewrite(tmp_path, lambda t: [(n, np.zeros((10**12, 0), np.float32) if n == name else a) for n, a in t])
    with pytest.raises(CheckpointFormatError, match=rf"edited\.ckpt: tensor '{name}', byte offset \d+: "
                                                    r"dims \[1000000000000, 0\] cannot be real.*corrupt tensor header"):
        load_checkpoint(path)


def test_unknown_dtype_string_is_named(tmp_path):
    data = FP32.read_bytes().replace(b"Float32", b"Float17", 1)
    path = tmp_path / "odd.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointFormatError, match=r"odd\.ckpt.*backbone\.word_embedding\.embedding_table.*Float17"):
        load_checkpoint(path)


def test_slot_order_is_mindspores_and_the_synthetic_recipe_is_the_fixtures():
    from pangu_jax.checkpoints.layout import mindspore_slots
    from pangu_jax.checkpoints.synthetic import random_mindspore_tensors

    stored = read_mindspore_index(FP32)
    assert list(mindspore_slots(PanguConfig.preset("tiny"))) == list(stored)
    drawn = random_mindspore_tensors(PanguConfig.preset("tiny"), seed=20210426, dtype="float32")
    for name, value in drawn:
        np.testing.assert_array_equal(value, stored[name].data, err_msg=name)


@pytest.mark.parametrize("shape", [(300, 700), (256, 512), (1, 3)])
def test_ffn_matrices_turn_output_first_in_tiles_and_back(shape):
    from pangu_jax.checkpoints.layout import mindspore_slots

    slot = mindspore_slots(PanguConfig.preset("tiny"))["backbone.blocks.0.output.mapping.weight"]
    stored = np.arange(np.prod(shape), dtype=np.float32).reshape(shape).astype(jnp.bfloat16)
    ours = slot.to_ours(stored, None)
    assert ours.flags.c_contiguous and ours.dtype == stored.dtype
    np.testing.assert_array_equal(ours, stored.T)
    np.testing.assert_array_equal(slot.from_ours(ours, None), stored)
