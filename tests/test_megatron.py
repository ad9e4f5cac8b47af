"""Megatron tensor-parallel partitions of the PyTorch port (PanGu-Alpha-GPU), built from the fixture model."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: reading Megatron partitions needs it")

from pangu_jax import load_checkpoint  # noqa: E402
from pangu_jax.checkpoints import CheckpointFormatError, CheckpointMismatchError, detect_format  # noqa: E402
from pangu_jax.checkpoints.convert import convert  # noqa: E402
from pangu_jax.checkpoints.megatron_format import read_megatron  # noqa: E402
from pangu_jax.config import PanguConfig  # noqa: E402
from tests.conftest import max_logit_error  # noqa: E402

TINY = PanguConfig(vocab_size=1000, hidden_size=64, num_layers=3, num_heads=4, ffn_size=256, max_positions=128)
WORD = "backbone.word_embedding.embedding_table"
PREFIX = "language_model.transformer."
RANK1 = "iter_0001000/mp_rank_01/model_optim_rng.pt"


class DynamicLossScaler:
    """Pickled into the optimizer state as Megatron's FP16 optimizer does; loading must never run it."""

    def __init__(self) -> None:
        self.cur_scale = 2.0 ** 16

    def __setstate__(self, state) -> None:
        raise AssertionError("reading a checkpoint ran code named by its pickle")


def _padded_rows(ranks: int) -> int:
    """Megatron pads the vocabulary to a multiple of 128 times the rank count."""
    multiple = 128 * ranks
    return -(-TINY.vocab_size // multiple) * multiple


def _port_tensors(w: dict[str, np.ndarray], rows: int) -> dict[str, tuple[np.ndarray, int | None]]:
    """The whole model under the port's names, torch layout, with the dim its ranks split (None: replicated)."""
    pad = np.random.default_rng(0).normal(size=(rows - TINY.vocab_size, TINY.hidden_size)).astype(np.float32)
    out = {
        "language_model.embedding.word_embeddings.weight": (np.concatenate([w[WORD], pad]), 0),
        "language_model.embedding.position_embeddings.weight": (w["backbone.position_embedding.embedding_table"], None),
        "language_model.topQueryEmbedding.top_query_embeddings.weight":
            (w["backbone.top_query_embedding.embedding_table"], None),
        PREFIX + "final_layernorm.weight": (w["backbone.layernorm.gamma"], None),
        PREFIX + "final_layernorm.bias": (w["backbone.layernorm.beta"], None),
    }
    layers = {f"layers.{i}.": f"backbone.blocks.{i}." for i in range(TINY.num_blocks)}
    for layer, ms in {**layers, "topQueryLayer.": "backbone.top_query_layer."}.items():
        for name, (array, split) in {
            "input_layernorm.weight": (w[ms + "layernorm1.gamma"], None),
            "input_layernorm.bias": (w[ms + "layernorm1.beta"], None),
            "attention.query.weight": (w[ms + "attention.dense1.weight"], 0),  # MindSpore keeps q/k/v [out, in]
            "attention.query.bias": (w[ms + "attention.dense1.bias"], 0),
            "attention.key.weight": (w[ms + "attention.dense2.weight"], 0),
            "attention.key.bias": (w[ms + "attention.dense2.bias"], 0),
            "attention.value.weight": (w[ms + "attention.dense3.weight"], 0),
            "attention.value.bias": (w[ms + "attention.dense3.bias"], 0),
            "attention.dense.weight": (w[ms + "attention.projection.weight"].T, 1),
            "attention.dense.bias": (w[ms + "attention.projection.bias"], None),
            "post_attention_layernorm.weight": (w[ms + "layernorm2.gamma"], None),
            "post_attention_layernorm.bias": (w[ms + "layernorm2.beta"], None),
            "mlp.dense_h_to_4h.weight": (w[ms + "output.mapping.weight"].T, 0),
            "mlp.dense_h_to_4h.bias": (w[ms + "output.mapping.bias"], 0),
            "mlp.dense_4h_to_h.weight": (w[ms + "output.projection.weight"].T, 1),
            "mlp.dense_4h_to_h.bias": (w[ms + "output.projection.bias"], None),
        }.items():
            out[PREFIX + layer + name] = (array, split)
    return out


def _nest(flat: dict) -> dict:
    """``model`` as the port saves it: nested embeddings, the transformer's names flat."""
    model: dict = {}
    for name, tensor in flat.items():
        keys = ["language_model", "transformer", name[len(PREFIX):]] if name.startswith(PREFIX) else name.split(".")
        node = model
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = tensor
    return model


def _training_state(ranks: int, rows: int, **arg_fields) -> dict:
    """Everything Megatron's save_checkpoint writes beside the model."""
    fields = dict(hidden_size=64, num_layers=2, num_attention_heads=4, max_position_embeddings=128,
                  padded_vocab_size=rows, model_parallel_size=ranks, layernorm_epsilon=1e-5,
                  bias_gelu_fusion=True, openai_gelu=False, params_dtype=torch.float32)
    return {
        "args": argparse.Namespace(**{**fields, **arg_fields}),
        "iteration": 1000,
        "optimizer": {"loss_scaler": DynamicLossScaler(), "dynamic_loss_scale": True,
                      "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
                                               "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
                      "fp32_from_fp16": [[torch.ones(4)]]},
        "lr_scheduler": {"num_iters": 1000, "max_lr": 1.5e-4},
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }


def _write(root: Path, weights, ranks: int, *, args: bool = True, edit=None, legacy: bool = False,
           flat: bool = False, **arg_fields) -> Path:
    """A Megatron checkpoint directory: tracker file, iter_0001000/mp_rank_XX/model_optim_rng.pt."""
    rows = _padded_rows(ranks)
    whole = _port_tensors(weights, rows)
    for rank in range(ranks):
        tensors = {name: torch.from_numpy(np.ascontiguousarray(array if split is None else
                                                               np.split(array, ranks, axis=split)[rank]))
                   for name, (array, split) in whole.items()}
        if edit:
            edit(rank, tensors)
        state = _training_state(ranks, rows, **arg_fields) if args else {"iteration": 1000}
        state["model"] = tensors if flat else _nest(tensors)
        file = root / "iter_0001000" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        file.parent.mkdir(parents=True)
        torch.save(state, file, _use_new_zipfile_serialization=not legacy)
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    return root


# --- reading -------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_partitions_give_the_reference_logits(tmp_path, fixture_weights, sequences, ranks):
    path = _write(tmp_path / "mgt", fixture_weights, ranks)
    assert detect_format(path) == "megatron"
    config, _ = load_checkpoint(path)
    assert (config.vocab_size, config.num_layers, config.num_heads, config.ffn_size) == (1024, 3, 4, 256)
    assert config.activation == "gelu_tanh"
    assert max_logit_error(path, sequences) < 1e-4


@pytest.mark.parametrize("ranks, flat, legacy", [(1, False, False), (2, True, False), (4, False, True)])
def test_merged_tensors_equal_the_originals_bit_for_bit(tmp_path, fixture_weights, ranks, flat, legacy):
    path = _write(tmp_path / "mgt", fixture_weights, ranks, flat=flat, legacy=legacy)
    config, tensors = read_megatron(path)
    assert config.num_layers == 3 and sorted(tensors) == sorted(fixture_weights)  # optimizer and RNG dropped
    for name, want in fixture_weights.items():
        got = np.asarray(tensors[name].data)
        assert got.dtype == want.dtype and tensors[name].shape == got.shape, name
        np.testing.assert_array_equal(got[: len(want)] if name == WORD else got, want, err_msg=name)
    assert tensors[WORD].shape == (_padded_rows(ranks), 64)


def test_files_without_args_infer_nothing_and_load_with_a_config(tmp_path, fixture_weights, sequences):
    """The port's released *_mgt files hold only model and iteration, under release/."""
    path = _write(tmp_path / "mgt", fixture_weights, 2, args=False)
    (path / "iter_0001000").rename(path / "release")
    (path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert read_megatron(path)[0] is None
    assert max_logit_error(path, sequences, config=TINY.replace(vocab_size=1024)) < 1e-4
    assert max_logit_error(path / "release", sequences, config=TINY.replace(vocab_size=1024)) < 1e-4


def test_unfused_erf_gelu_is_honoured(tmp_path, fixture_weights, sequences):
    path = _write(tmp_path / "mgt", fixture_weights, 2, bias_gelu_fusion=False)
    assert max_logit_error(path, sequences, "expected_logits_gelu_erf") < 1e-4


def test_partitions_convert_to_npy(tmp_path, fixture_weights):
    convert(_write(tmp_path / "mgt", fixture_weights, 2), tmp_path / "npy", to="npy", progress=False)
    for name, want in fixture_weights.items():
        got = np.load(tmp_path / "npy" / f"{name}.npy")
        np.testing.assert_array_equal(got[: len(want)] if name == WORD else got, want, err_msg=name)


# --- hostile directories ---------------------------------------------------------------


def _set(name: str, shape: tuple[int, ...], on_rank: int = 1):
    def edit(rank, tensors):
        if rank == on_rank:
            tensors[name] = torch.zeros(shape)
    return edit


def _drop(name: str):
    def edit(rank, tensors):
        if rank == 1:
            del tensors[name]
    return edit


@pytest.mark.parametrize("args", [True, False])
def test_ranks_disagreeing_on_a_replicated_tensor_are_named(tmp_path, fixture_weights, args):
    edit = _set("language_model.embedding.position_embeddings.weight", (127, 64))
    path = _write(tmp_path / "mgt", fixture_weights, 2, args=args, edit=edit)
    with pytest.raises(CheckpointFormatError) as info:
        read_megatron(path)
    assert str(path / RANK1) in str(info.value)
    assert ("tensor language_model.embedding.position_embeddings.weight has shape [127, 64]; "
            "expected [128, 64] (replicated on every rank)") in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (_set(PREFIX + "layers.1.mlp.dense_h_to_4h.weight", (64, 64)),
     r"tensor language_model\.transformer\.layers\.1\.mlp\.dense_h_to_4h\.weight has shape \[64, 64\]; "
     r"expected \[128, 64\] \(1/2 of the tensor along dim 0\)"),
    (_set(PREFIX + "topQueryLayer.attention.dense.weight", (32, 32)),
     r"tensor language_model\.transformer\.topQueryLayer\.attention\.dense\.weight has shape \[32, 32\]; "
     r"expected \[64, 32\] \(1/2 of the tensor along dim 1\)"),
    (_drop(PREFIX + "layers.1.attention.value.bias"),
     r"missing tensor\(s\) language_model\.transformer\.layers\.1\.attention\.value\.bias for 3 layers"),
    (_set("language_model.pooler.dense.weight", (64, 64)),
     r"unexpected tensor\(s\) language_model\.pooler\.dense\.weight"),
])
def test_slices_that_do_not_fit_are_named_with_their_file(tmp_path, fixture_weights, edit, message):
    path = _write(tmp_path / "mgt", fixture_weights, 2, edit=edit)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_checkpoint(path)
    assert str(path / RANK1) in str(info.value)


def test_without_args_the_tensors_the_sizes_are_read_from_must_be_matrices(tmp_path, fixture_weights):
    name = "language_model.embedding.position_embeddings.weight"
    path = _write(tmp_path / "mgt", fixture_weights, 2, args=False, edit=_set(name, (2, 64, 64), on_rank=0))
    with pytest.raises(CheckpointFormatError) as info:
        read_megatron(path)
    rank0 = path / "iter_0001000/mp_rank_00/model_optim_rng.pt"
    assert str(info.value) == f"{rank0}: tensor {name} has shape [2, 64, 64]; expected 2 dims"


def test_a_huge_dim_beside_a_zero_is_a_corrupt_header(tmp_path, fixture_weights):
    name = "language_model.embedding.position_embeddings.weight"
    path = _write(tmp_path / "mgt", fixture_weights, 2, edit=_set(name, (10**12, 0)))
    with pytest.raises(CheckpointFormatError) as info:
        read_megatron(path)
    assert str(info.value).startswith(f"{path / RANK1}: tensor {name}: dims [1000000000000, 0] cannot be real")
    assert str(info.value).endswith("; corrupt tensor header")


def test_a_missing_rank_directory_is_named(tmp_path, fixture_weights):
    path = _write(tmp_path / "mgt", fixture_weights, 4)
    for rank in (1, 3):  # ranks 0 and 2 of 3
        for file in (path / f"iter_0001000/mp_rank_0{rank}").iterdir():
            file.unlink()
        (path / f"iter_0001000/mp_rank_0{rank}").rmdir()
    with pytest.raises(CheckpointFormatError, match=r"found rank\(s\) 0, 2 in .*every one") as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path / RANK1} is missing")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_file_is_named(tmp_path, fixture_weights, legacy):
    path = _write(tmp_path / "mgt", fixture_weights, 2, legacy=legacy)
    data = (path / RANK1).read_bytes()
    (path / RANK1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="not a loadable PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path / RANK1}: ")


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=128), r"mp_rank_00/model_optim_rng\.pt: tensor language_model\.embedding\.word_embeddings"
                            r"\.weight has shape \[512, 64\]; expected \[512, 128\]"),
    (dict(model_parallel_size=4), r"mp_rank_00/model_optim_rng\.pt: args record a model split over 4 ranks, "
                                  r"but 2 mp_rank_XX folders were found"),
    (dict(num_attention_heads=5), r"mp_rank_00/model_optim_rng\.pt: args describe no PanGu-alpha model: "
                                  r".*divisible by num_heads \(5\)"),
    (dict(padded_vocab_size=None), r"mp_rank_00/model_optim_rng\.pt: args lacks integer padded_vocab_size"),
])
def test_args_contradicting_the_tensors_are_refused(tmp_path, fixture_weights, fields, message):
    with pytest.raises(CheckpointFormatError, match=message):
        read_megatron(_write(tmp_path / "mgt", fixture_weights, 2, **fields))


def test_a_given_config_that_does_not_fit_is_a_mismatch(tmp_path, fixture_weights):
    path = _write(tmp_path / "mgt", fixture_weights, 2)
    with pytest.raises(CheckpointMismatchError, match=r"mp_rank_00/model_optim_rng\.pt: tensor .* expected"):
        read_megatron(path, TINY.replace(hidden_size=128, vocab_size=1024))


def test_the_tracker_must_name_a_present_checkpoint(tmp_path, fixture_weights):
    path = _write(tmp_path / "mgt", fixture_weights, 1)
    (path / "latest_checkpointed_iteration.txt").write_text("2000")
    with pytest.raises(CheckpointFormatError, match=r"latest_checkpointed_iteration\.txt names iter_0002000, "
                                                    r"which is missing"):
        load_checkpoint(path)


def test_without_torch_says_what_to_do(tmp_path, fixture_weights, monkeypatch):
    path = _write(tmp_path / "mgt", fixture_weights, 1)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(CheckpointFormatError, match=r"mp_rank_00/model_optim_rng\.pt: .*needs torch"):
        load_checkpoint(path)
