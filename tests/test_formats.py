"""Every checkpoint format in and out: npy directories, HuggingFace GPTPangu, orbax stores."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from pangu_jax import load_checkpoint
from pangu_jax.checkpoints import CheckpointFormatError, CheckpointMismatchError, detect_format
from pangu_jax.checkpoints.convert import convert
from pangu_jax.checkpoints.hf_format import read_hf
from pangu_jax.checkpoints.mindspore_format import read_mindspore_index
from pangu_jax.checkpoints.orbax_store import load_orbax, save_orbax
from tests.conftest import FIXTURES, max_logit_error
from tests.fuzzing import mutate, mutation

FP32 = FIXTURES / "tiny_fp32.ckpt"
HF = FIXTURES / "hf"
WTE = "transformer.wte.weight"


def _hf_copy(tmp_path, edit_config=None, edit_tensors=None) -> Path:
    """The fixture HF directory (safetensors only), optionally edited."""
    out = tmp_path / "hf"
    out.mkdir()
    fields = json.loads((HF / "config.json").read_text())
    tensors = load_file(HF / "model.safetensors")
    if edit_config:
        edit_config(fields)
    if edit_tensors:
        edit_tensors(tensors)
    (out / "config.json").write_text(json.dumps(fields))
    save_file(tensors, out / "model.safetensors")
    return out


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- reading -------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["hf", "npy"])
def test_fixture_directories_give_the_reference_logits(source, sequences):
    assert detect_format(FIXTURES / source) == source
    assert max_logit_error(FIXTURES / source, sequences) < 1e-4


def test_hf_pickle_gives_the_reference_logits(tmp_path, sequences):
    pytest.importorskip("torch", reason="torch is not installed: the pytorch_model.bin reader needs it")
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(HF / name, tmp_path / name)
    assert detect_format(tmp_path) == "hf"
    assert max_logit_error(tmp_path, sequences) < 1e-4


def test_hf_legacy_pickle_gives_the_reference_logits(tmp_path, sequences):
    """torch.save's format before torch 1.6 (not a zip archive), which cannot be memory-mapped."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the pytorch_model.bin reader needs it")
    shutil.copy(HF / "config.json", tmp_path)
    state = torch.load(HF / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert max_logit_error(tmp_path, sequences) < 1e-4


def test_hf_pickle_without_torch_says_what_to_do(tmp_path, monkeypatch):
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(HF / name, tmp_path / name)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model\.bin: .*needs torch.*safetensors"):
        load_checkpoint(tmp_path)


def test_hf_config_is_read_from_config_json():
    config, tensors = read_hf(HF)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads) == (1000, 64, 3, 4)
    assert (config.ffn_size, config.max_positions, config.activation) == (256, 128, "gelu_tanh")
    assert len(tensors) == 53 and "backbone.top_query_layer.output.projection.weight" in tensors


def test_hf_exact_gelu_is_honoured(tmp_path, sequences):
    path = _hf_copy(tmp_path, edit_config=lambda c: c.update(activation_function="gelu"))
    assert max_logit_error(path, sequences, "expected_logits_gelu_erf") < 1e-4


def test_hf_sharded_safetensors_load(tmp_path, sequences):
    tensors = load_file(HF / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {n: shard for shard, members in shards.items() for n in members}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(HF / "config.json", tmp_path)
    assert max_logit_error(tmp_path, sequences) < 1e-4
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFormatError,
                       match=r"model\.safetensors\.index\.json names shard model-00002-of-00002\.safetensors, which is missing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("named", ["../outside.safetensors", "{absolute}", "sub/../../outside.safetensors", "..", 7])
def test_hf_shard_index_may_name_only_files_in_its_directory(tmp_path, named):
    tensors = load_file(HF / "model.safetensors")
    names = sorted(tensors)
    path = tmp_path / "hf"
    path.mkdir()
    shutil.copy(HF / "config.json", path)
    save_file({n: tensors[n] for n in names[::2]}, path / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, tmp_path / "outside.safetensors")
    named = str(tmp_path / "outside.safetensors") if named == "{absolute}" else named
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in names[::2]}, **{n: named for n in names[1::2]}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointFormatError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"{path / 'model.safetensors.index.json'}: weight_map puts tensor {names[1]} in "
                               f"{named!r}; expected the name of a file in {path}")


def test_hf_padded_vocabulary_keeps_its_rows(tmp_path, sequences):
    def pad(tensors):
        tensors[WTE] = np.concatenate([tensors[WTE], np.zeros((24, 64), np.float32)])

    path = _hf_copy(tmp_path, edit_tensors=pad)
    assert load_checkpoint(path)[0].vocab_size == 1024
    assert max_logit_error(path, sequences) < 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(hidden_size=128), r"field hidden_size=128 contradicts tensor transformer\.wte\.weight"),
    (lambda c: c.update(vocab_size=900), r"field vocab_size=900 contradicts tensor transformer\.wte\.weight"),
    (lambda c: c.update(num_layers=4), r"field num_layers=4 contradicts tensor transformer\.h\.2\.\*"),
    (lambda c: c.update(max_position_embeddings=1024), r"field max_position_embeddings=1024 contradicts tensor transformer\.wpe"),
    (lambda c: c.update(intermediate_size=128), r"field intermediate_size=128 contradicts tensor transformer\.h\.0\.mlp\.c_fc"),
    (lambda c: c.update(num_heads=5), r"config\.json: .*hidden_size \(64\) must be divisible by num_heads \(5\)"),
    (lambda c: c.update(activation_function="relu"), r"field activation_function='relu' is not supported"),
    (lambda c: c.pop("num_heads"), r"config\.json: field num_heads is missing"),
])
def test_hf_config_contradicting_the_tensors_is_refused(tmp_path, edit, message):
    path = _hf_copy(tmp_path, edit_config=edit)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_checkpoint(path)
    assert str(path / "config.json") in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", "4", r"field num_heads='4' is a string; expected an integer"),
    ("hidden_size", 64.0, r"field hidden_size=64\.0 is a number; expected an integer"),
    ("vocab_size", True, r"field vocab_size=True is a boolean; expected an integer"),
    ("num_layers", None, r"field num_layers=None is null; expected an integer"),
    ("max_position_embeddings", [128], r"field max_position_embeddings=\[128\] is an array; expected an integer"),
    ("intermediate_size", "256", r"field intermediate_size='256' is a string; expected an integer or null"),
    ("layer_norm_epsilon", "1e-5", r"field layer_norm_epsilon='1e-5' is a string; expected a number"),
    ("activation_function", {"name": "gelu"}, r"field activation_function=\{'name': 'gelu'\} is an object; "
                                              r"expected a string"),
])
def test_hf_config_field_of_the_wrong_type_is_named(tmp_path, field, value, message):
    path = _hf_copy(tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path / 'config.json'}: ")


def test_hf_config_that_is_not_an_object_is_named(tmp_path):
    path = _hf_copy(tmp_path)
    (path / "config.json").write_text("[64, 4]")
    with pytest.raises(CheckpointFormatError, match=r"config\.json: holds an array; expected a JSON object"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"lm_head.weight": t[WTE] + 1}), r"lm_head\.weight differs from transformer\.wte\.weight"),
    (lambda t: t.pop("transformer.h.1.attn.v_proj.bias"), r"missing tensor\(s\) transformer\.h\.1\.attn\.v_proj\.bias"),
    (lambda t: t.update({"transformer.h.0.attn.extra": t[WTE]}), r"unexpected tensor\(s\) transformer\.h\.0\.attn\.extra"),
    (lambda t: t.update({"transformer.h.1.mlp.c_proj.weight": t["transformer.h.1.mlp.c_fc.weight"]}),
     r"tensor transformer\.h\.1\.mlp\.c_proj\.weight has shape \[256, 64\]; .* need \[64, 256\]"),
])
def test_hf_tensors_that_do_not_fit_are_refused(tmp_path, edit, message):
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(_hf_copy(tmp_path, edit_tensors=edit))


def test_hf_tensor_the_config_is_read_from_must_be_a_matrix(tmp_path):
    path = _hf_copy(tmp_path, edit_tensors=lambda t: t.update({WTE: t[WTE].reshape(10, 100, 64)}))
    with pytest.raises(CheckpointFormatError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path / 'model.safetensors'}: tensor {WTE} has shape [10, 100, 64]; expected 2 dims"


def test_hf_tied_head_equal_to_the_embedding_is_accepted(tmp_path, sequences):
    path = _hf_copy(tmp_path, edit_tensors=lambda t: t.update({"lm_head.weight": t[WTE].copy()}))
    assert max_logit_error(path, sequences) < 1e-4


def test_npy_directory_missing_a_tensor_is_refused(tmp_path):
    shutil.copytree(FIXTURES / "npy", tmp_path / "npy")
    (tmp_path / "npy" / "backbone.blocks.1.output.mapping.bias.npy").unlink()
    with pytest.raises(CheckpointMismatchError, match=r"missing tensor\(s\) backbone\.blocks\.1\.output\.mapping\.bias"):
        load_checkpoint(tmp_path / "npy")


def test_npy_big_endian_arrays_are_read_in_native_order(tmp_path, sequences):
    shutil.copytree(FIXTURES / "npy", tmp_path / "npy")
    for file in (tmp_path / "npy").iterdir():
        np.save(file, np.load(file).astype(">f4"))
    assert load_checkpoint(tmp_path / "npy")[0].param_dtype == "float32"
    assert max_logit_error(tmp_path / "npy", sequences) < 1e-4


def test_npy_file_that_is_not_an_array_is_named(tmp_path):
    shutil.copytree(FIXTURES / "npy", tmp_path / "npy")
    (tmp_path / "npy" / "backbone.layernorm.beta.npy").write_bytes(b"not numpy")
    with pytest.raises(CheckpointFormatError, match=r"backbone\.layernorm\.beta\.npy: not a readable \.npy"):
        load_checkpoint(tmp_path / "npy")


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "pickle", "legacy pickle"])
def test_a_huge_dim_beside_a_zero_is_a_corrupt_header_in_every_format(tmp_path, fmt):
    empty = np.zeros((10**12, 0), np.float32)
    if fmt == "npy":
        shutil.copytree(FIXTURES / "npy", tmp_path / "npy")
        path = tmp_path / "npy"
        file = path / "backbone.position_embedding.embedding_table.npy"
        np.save(file, empty)
        who = file
    elif fmt == "safetensors":
        path = _hf_copy(tmp_path, edit_tensors=lambda t: t.update({"transformer.wpe.weight": empty}))
        who = f"{path / 'model.safetensors'}: tensor transformer.wpe.weight"
    else:
        torch = pytest.importorskip("torch", reason="torch is not installed: the pytorch_model.bin reader needs it")
        path = tmp_path / "hf"
        path.mkdir()
        shutil.copy(HF / "config.json", path)
        state = {**torch.load(HF / "pytorch_model.bin", weights_only=True), "transformer.wpe.weight": torch.zeros(10**12, 0)}
        torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "pickle")
        who = f"{path / 'pytorch_model.bin'}: tensor transformer.wpe.weight"
    with pytest.raises(CheckpointFormatError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{who}: dims [1000000000000, 0] cannot be real: with each 0 taken as 1 "
                                      "they need 4000000000000 bytes, more than the whole file (")
    assert str(info.value).endswith(" bytes); corrupt tensor header")


def test_unrecognised_paths_say_what_was_looked_for(tmp_path):
    (tmp_path / "README").write_text("hello")
    with pytest.raises(CheckpointFormatError, match=r"looked for pangu_jax\.json .*model\.safetensors.*\*\.npy"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointFormatError, match="pass the directory that holds it"):
        load_checkpoint(HF / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")


# --- writing -------------------------------------------------------------------------


def test_hf_export_equals_the_fixture(tmp_path):
    convert(FP32, tmp_path / "out", to="hf", progress=False)
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(HF / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    fields = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = json.loads((HF / "config.json").read_text())
    expected.pop("transformers_version")
    assert fields == expected


@pytest.mark.parametrize("name", ["tiny_fp32", "tiny_fp16", "tiny_fp16_mixed"])
def test_mindspore_through_npy_and_back_is_byte_identical(tmp_path, name):
    convert(FIXTURES / f"{name}.ckpt", tmp_path / "npy", to="npy", progress=False)
    convert(tmp_path / "npy", tmp_path / "back.ckpt", to="mindspore", progress=False)
    assert (tmp_path / "back.ckpt").read_bytes() == (FIXTURES / f"{name}.ckpt").read_bytes()


def test_round_trip_through_every_format_is_bit_identical(tmp_path):
    steps = [("a.orbax", "orbax"), ("b.hf", "hf"), ("c.ckpt", "mindspore"), ("d.npy", "npy"), ("e.orbax", "orbax")]
    source = FP32
    for name, fmt in steps:
        convert(source, tmp_path / name, to=fmt, progress=False)
        assert detect_format(tmp_path / name) == fmt
        source = tmp_path / name
    assert (tmp_path / "c.ckpt").read_bytes() == FP32.read_bytes()
    config, first = load_orbax(tmp_path / "a.orbax")
    config_last, last = load_orbax(tmp_path / "e.orbax")
    assert config == config_last
    _, direct = load_checkpoint(FP32)
    for a, b, c in zip(_leaves(first), _leaves(last), _leaves(direct)):
        assert a.dtype == b.dtype == c.dtype
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert _leftovers(tmp_path) == []


def test_cast_keeps_layernorm_in_float32(tmp_path):
    convert(FP32, tmp_path / "hf", to="hf", dtype="float16", progress=False)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors[WTE].dtype == np.float16 and tensors["transformer.h.2.mlp.c_fc.weight"].dtype == np.float16
    assert tensors["transformer.ln_f.weight"].dtype == np.float32
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    convert(tmp_path / "hf", tmp_path / "mixed.ckpt", to="mindspore", progress=False)
    mixed = read_mindspore_index(FIXTURES / "tiny_fp16_mixed.ckpt")
    got = read_mindspore_index(tmp_path / "mixed.ckpt")
    assert {n: r.dtype for n, r in got.items()} == {n: r.dtype for n, r in mixed.items()}


def test_bfloat16_survives_hf_and_orbax(tmp_path):
    convert(FP32, tmp_path / "hf", to="hf", dtype="bfloat16", progress=False)
    convert(tmp_path / "hf", tmp_path / "store", progress=False)
    config, params = load_checkpoint(tmp_path / "store")
    assert config.param_dtype == "bfloat16" and params["word_embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["word_embedding"]),
                                  load_file(tmp_path / "hf" / "model.safetensors")[WTE])


def test_npy_refuses_bfloat16_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"\.npy files cannot hold bfloat16"):
        convert(FP32, tmp_path / "npy", to="npy", dtype="bfloat16", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- orbax ---------------------------------------------------------------------------


def test_orbax_store_records_config_and_tokenizer(tmp_path, sequences):
    convert(FP32, tmp_path / "store", progress=False)
    marker = json.loads((tmp_path / "store" / "pangu_jax.json").read_text())
    assert marker["format_version"] == 4
    assert marker["tokenizer"] == {"vocab_sha256": "18857e86783e50cfcaa0bc3c043fb4e9b5f240b885d2870ea593ee69b44f7a3a",
                                   "eod_id": 8, "eot_id": 9, "pad_id": 6}
    assert max_logit_error(tmp_path / "store", sequences) < 1e-4
    config, params = load_checkpoint(tmp_path / "store", dtype="float16")
    assert config.dtype == "float16" and params["blocks"]["mlp"]["up_kernel"].dtype == jnp.float16
    assert params["final_ln"]["scale"].dtype == jnp.float32
    with pytest.raises(CheckpointMismatchError, match=r"hidden_size 2560 \(stored 64\)"):
        load_checkpoint(tmp_path / "store", "2.6B")
    assert load_checkpoint(tmp_path / "store", load_checkpoint(FP32)[0].replace(activation="gelu_erf"))[0].activation == "gelu_erf"


def test_orbax_store_refuses_other_versions_and_unknown_mesh_axes(tmp_path):
    convert(FP32, tmp_path / "store", progress=False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match=r"rules name mesh axes \['tensor'\], but the mesh has \['data'\]"):
        load_orbax(tmp_path / "store", mesh=mesh)
    (tmp_path / "store" / "pangu_jax.json").write_text(json.dumps({"format_version": 5}))
    with pytest.raises(CheckpointFormatError, match=r"format_version 5; this version reads 4$"):
        load_checkpoint(tmp_path / "store")
    (tmp_path / "store" / "pangu_jax.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(CheckpointFormatError, match="format_version 2; this version reads 4 .*convert the original"):
        load_checkpoint(tmp_path / "store")


def _names(params) -> list[str]:
    return [".".join(k.key for k in keys) for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_orbax_store_holds_one_piece_per_leaf_and_save_orbax_writes_the_same(tmp_path):
    convert(FP32, tmp_path / "store", progress=False)
    config, params = load_orbax(tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store" / "params").iterdir()) == sorted(_names(params))
    save_orbax(tmp_path / "again", config, params)
    assert sorted(p.name for p in (tmp_path / "again" / "params").iterdir()) == sorted(_names(params))
    again_config, again = load_orbax(tmp_path / "again")
    assert again_config == config
    for a, b in zip(_leaves(params), _leaves(again)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_orbax_without_the_no_copy_switch_still_writes_the_store(tmp_path, monkeypatch):
    """Older orbax (0.12.4 on the GPU machine) has no `deepcopy_host_arrays`."""
    import orbax.checkpoint as ocp

    class OldNumpyHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self, metadata_key=None):
            super().__init__(metadata_key=metadata_key)

    monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", OldNumpyHandler)
    convert(FP32, tmp_path / "store", progress=False)
    _, params = load_orbax(tmp_path / "store")
    _, source = load_checkpoint(FP32)
    for a, b in zip(_leaves(params), _leaves(source)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_save_orbax_refuses_a_tree_the_config_does_not_describe(tmp_path):
    convert(FP32, tmp_path / "store", progress=False)
    config, params = load_orbax(tmp_path / "store")
    wrong = {**params, "word_embedding": params["word_embedding"][:-1]}
    with pytest.raises(ValueError, match=r"word_embedding: float32\[999, 64\] given, the config describes "
                                         r"float32\[1000, 64\]"):
        save_orbax(tmp_path / "wrong", config, wrong)
    partial = {**params, "final_ln": {"scale": params["final_ln"]["scale"]}}
    with pytest.raises(ValueError, match=r"no array given for final_ln\.bias of the tree the config describes"):
        save_orbax(tmp_path / "partial", config, partial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_orbax_store_names_a_missing_or_corrupt_piece(tmp_path):
    convert(FP32, tmp_path / "store", progress=False)
    params = tmp_path / "store" / "params"
    for data in (params / "word_embedding" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match=r"params/word_embedding: cannot restore tensor word_embedding "
                                                    r"as float32\[1000, 64\]"):
        load_checkpoint(tmp_path / "store")
    shutil.rmtree(params / "blocks.mlp.up_kernel")
    with pytest.raises(CheckpointFormatError, match=r"params/blocks\.mlp\.up_kernel: cannot restore tensor "
                                                    r"blocks\.mlp\.up_kernel as float16\[2, 256, 64\] \(.*not found"):
        load_orbax(tmp_path / "store", dtype="float16")


def test_orbax_int8_stores_are_read_as_they_are_and_never_converted(tmp_path):
    config8, params8 = load_checkpoint(FP32, int8=True)
    save_orbax(tmp_path / "int8", config8, params8)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(load_orbax(tmp_path / "int8")[1])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointFormatError, match=r"int8: an int8 store cannot be converted"):
        convert(tmp_path / "int8", tmp_path / "out", to="mindspore", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_orbax_restores_straight_into_a_mesh_and_saves_from_it(tmp_path):
    convert(FP32, tmp_path / "store", progress=False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    config, sharded = load_orbax(tmp_path / "store", mesh=mesh)
    _, plain = load_orbax(tmp_path / "store")
    query = sharded["blocks"]["attention"]["query_kernel"]
    assert {s.data.shape for s in query.addressable_shards} == {(2, 1, 16, 64)}
    assert {s.data.shape for s in sharded["top_query_layer"]["mlp"]["up_kernel"].addressable_shards} == {(64, 64)}
    assert sharded["word_embedding"].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    save_orbax(tmp_path / "again", config, sharded)
    for a, b in zip(jax.tree.leaves(load_orbax(tmp_path / "again")[1]), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- fuzzing the safetensors reader ------------------------------------------------------

_SAFETENSORS = (HF / "model.safetensors").read_bytes()
_HEADER_END = 8 + int.from_bytes(_SAFETENSORS[:8], "little")
_st_mutation = mutation(st.one_of(st.integers(0, _HEADER_END + 64), st.integers(0, len(_SAFETENSORS) - 1)))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-fuzz")
    shutil.copy(HF / "config.json", path / "config.json")
    return path


@settings(max_examples=200, deadline=None)
@given(mutations=st.lists(_st_mutation, min_size=1, max_size=3))
def test_fuzz_safetensors_reader_reads_tensors_or_names_the_file(fuzz_dir: Path, mutations: list) -> None:
    target = fuzz_dir / "model.safetensors"
    target.write_bytes(mutate(_SAFETENSORS, mutations))
    try:
        _, tensors = read_hf(fuzz_dir)
        for name, record in tensors.items():
            data = np.asarray(record.data)
            assert data.shape == record.shape, name
    except (CheckpointFormatError, CheckpointMismatchError) as error:
        assert str(fuzz_dir) in str(error)
