"""Megatron model-parallel partitions of the PyTorch port (PanGu-Alpha-GPU, ``panguAlpha_pytorch``).

The port is Megatron-LM 1.1 with a top query layer added. A checkpoint
directory holds ``latest_checkpointed_iteration.txt`` (an iteration number
or ``release``) beside ``iter_0001000/`` (or ``release/``), which holds one
``mp_rank_XX/model_optim_rng.pt`` per tensor-parallel rank; a directory
holding the ``mp_rank_XX/`` folders themselves is read too. Each file is a
pickled dict: ``model`` (the weights), and from training ``args`` (an
``argparse.Namespace``), ``iteration``, ``optimizer``, ``lr_scheduler`` and
the RNG states. Only ``model`` and ``args`` are kept.

``model`` nests ``language_model`` -> ``embedding`` (``word_embeddings``,
``position_embeddings``), ``topQueryEmbedding`` (``top_query_embeddings``)
and ``transformer`` (flat names ``layers.{i}.*``, ``topQueryLayer.*``,
``final_layernorm.*``), each embedding a ``{"weight": tensor}`` dict; joined
with dots these are the names in `MEGATRON_GLOBALS` and `MEGATRON_BLOCK`. A
flat ``model`` dict with those dotted names reads the same.

How ranks split a tensor (Megatron's ``mpu`` layers, all with stride 1):
the vocab-parallel word embedding and the column-parallel query, key, value
and ``mlp.dense_h_to_4h`` (torch ``Linear``, [out, in]) split dim 0, biases
included; the row-parallel ``attention.dense`` and ``mlp.dense_4h_to_h``
split their weight along dim 1 (in) and replicate the bias; embeddings of
positions and LayerNorms are replicated. Replicated tensors are taken from
rank 0; the other ranks' copies are checked for shape and dtype only, since
comparing values would read every copy. Orientation is HuggingFace's (both
are torch ``Linear``), so the transposition flags come from `HF_BLOCK`.

``args.num_layers`` counts the ordinary blocks only: the port's 2.6B model
has ``--num-layers 31`` and our ``num_layers`` 32. Megatron pads the
vocabulary to a multiple of 128 times the rank count (40000 -> 40064 for one
rank, 40448 for four) and records that as ``args.padded_vocab_size``. As in
`hf_format`, the rows are kept and ``vocab_size`` is the row count; logits
of ids 40000 and up belong to no token. The activation follows what the
port runs: its fused bias-GeLU (on by default) and ``--openai-gelu`` are the
tanh form, otherwise ``F.gelu`` (erf). A file without ``args`` (the released
``*_mgt`` files carry only ``model`` and ``iteration``) gives no config.

Memory: every rank file is opened once. Files in torch's zip format
(torch >= 1.6) are memory-mapped, so a tensor is read only when converted,
its slices concatenated then: the host holds one merged tensor at a time
beside whatever the caller keeps, about one model in its stored dtype while
`load_checkpoint` assembles it. Legacy files (torch < 1.6, e.g. the port's
recommended docker image) cannot be mapped: each is read whole and all but
its weights dropped at once, so the host holds the model's slices (one model
in its stored dtype) plus, while a file is being read, its optimizer state.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..config import ConfigError, PanguConfig
from .errors import CheckpointFormatError, CheckpointMismatchError
from .hf_format import HF_BLOCK
from .layout import mindspore_slots
from .storage import LazyTensor
from .torch_pickle import check_dims, import_torch, load_torch, pickled_globals, torch_dtype, torch_to_numpy

__all__ = ["MEGATRON_BLOCK", "MEGATRON_GLOBALS", "is_megatron_dir", "megatron_names", "read_megatron"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)$")
_CHECKPOINT_DIR = re.compile(r"^(iter_\d+|release)$")
_LAYER = re.compile(r"^language_model\.transformer\.layers\.(\d+)\.")

# Torch dim along which the ranks split a tensor; None: every rank holds all of it.
_OUT, _IN, _REPLICATED = 0, 1, None

MEGATRON_GLOBALS = {
    "backbone.word_embedding.embedding_table": ("language_model.embedding.word_embeddings.weight", _OUT),
    "backbone.position_embedding.embedding_table": ("language_model.embedding.position_embeddings.weight", _REPLICATED),
    "backbone.top_query_embedding.embedding_table":
        ("language_model.topQueryEmbedding.top_query_embeddings.weight", _REPLICATED),
    "backbone.layernorm.gamma": ("language_model.transformer.final_layernorm.weight", _REPLICATED),
    "backbone.layernorm.beta": ("language_model.transformer.final_layernorm.bias", _REPLICATED),
}
# MindSpore name within a block -> (Megatron name within the layer, split dim).
MEGATRON_BLOCK = {
    "layernorm1.gamma": ("input_layernorm.weight", _REPLICATED),
    "layernorm1.beta": ("input_layernorm.bias", _REPLICATED),
    "layernorm2.gamma": ("post_attention_layernorm.weight", _REPLICATED),
    "layernorm2.beta": ("post_attention_layernorm.bias", _REPLICATED),
    "attention.dense1.weight": ("attention.query.weight", _OUT),
    "attention.dense1.bias": ("attention.query.bias", _OUT),
    "attention.dense2.weight": ("attention.key.weight", _OUT),
    "attention.dense2.bias": ("attention.key.bias", _OUT),
    "attention.dense3.weight": ("attention.value.weight", _OUT),
    "attention.dense3.bias": ("attention.value.bias", _OUT),
    "attention.projection.weight": ("attention.dense.weight", _IN),
    "attention.projection.bias": ("attention.dense.bias", _REPLICATED),
    "output.mapping.weight": ("mlp.dense_h_to_4h.weight", _OUT),
    "output.mapping.bias": ("mlp.dense_h_to_4h.bias", _OUT),
    "output.projection.weight": ("mlp.dense_4h_to_h.weight", _IN),
    "output.projection.bias": ("mlp.dense_4h_to_h.bias", _REPLICATED),
}
_MS_BLOCK = re.compile(r"^backbone\.(?:blocks\.(\d+)|top_query_layer)\.(.+)$")
_WORD = MEGATRON_GLOBALS["backbone.word_embedding.embedding_table"][0]
_POSITION = MEGATRON_GLOBALS["backbone.position_embedding.embedding_table"][0]
_FFN_UP = "language_model.transformer.layers.0.mlp.dense_h_to_4h.weight"
_ARG_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings", "padded_vocab_size")


def megatron_names(config: PanguConfig) -> dict[str, tuple[str, int | None, bool]]:
    """MindSpore name -> (Megatron name, split dim, stored transposed), in MindSpore file order."""
    names = {}
    for ms_name in mindspore_slots(config):
        if ms_name in MEGATRON_GLOBALS:
            names[ms_name] = (*MEGATRON_GLOBALS[ms_name], False)
            continue
        block, suffix = _MS_BLOCK.match(ms_name).groups()
        layer = "topQueryLayer" if block is None else f"layers.{block}"
        megatron, split = MEGATRON_BLOCK[suffix]
        names[ms_name] = (f"language_model.transformer.{layer}.{megatron}", split, HF_BLOCK[suffix][1])
    return names


def is_megatron_dir(path: Path) -> bool:
    """A tracker file, or rank folders here or in an ``iter_*``/``release`` folder."""
    return (path / TRACKER_FILE).is_file() or any(
        any(path.glob(f"{parent}mp_rank_*/{RANK_FILE}")) for parent in ("", "iter_*/", "release/")
    )


def read_megatron(
    path: str | os.PathLike, config: PanguConfig | None = None
) -> tuple[PanguConfig | None, dict[str, LazyTensor]]:
    """The config (from ``args``, else None) and the merged tensors by MindSpore name.

    A given `config` is what the caller expects: the slices are checked
    against it, it is returned as is, and a slice that does not fit raises
    CheckpointMismatchError. Without one, the slices are checked against
    ``args`` or, lacking those, against each other.
    """
    files = _rank_files(_checkpoint_dir(Path(path)))
    ranks = [_load_rank(file) for file in files]
    args = ranks[0][1]
    found = config or _config_from_args(files[0], args, len(files))
    shapes = found or _shape_config(files[0], ranks[0][0], len(files))  # the sizes every slice is checked against
    names = megatron_names(shapes)
    expected = {megatron for megatron, _, _ in names.values()}
    for file, (tensors, _) in zip(files, ranks):
        _check_names(file, tensors, expected, shapes)
    error = CheckpointMismatchError if config else CheckpointFormatError
    slots = mindspore_slots(shapes)
    merged = {}
    for ms_name, (megatron, split, transposed) in names.items():
        full = slots[ms_name].stored_shape[::-1] if transposed else slots[ms_name].stored_shape
        part = _slice_shape(files, megatron, full, split, error)
        slices = [tensors[megatron] for tensors, _ in ranks]
        _check_slices(files, megatron, slices, part, split, error)
        merged[ms_name] = LazyTensor(
            slots[ms_name].stored_shape, torch_dtype(slices[0]),
            _merge(slices if split is not None else slices[:1], split, transposed),
        )
    return found, merged


# --- finding the rank files ------------------------------------------------------------


def _checkpoint_dir(path: Path) -> Path:
    """The folder holding ``mp_rank_XX/``: `path` itself, the one the tracker names, or the only one."""
    if any(_RANK_DIR.match(p.name) for p in path.iterdir()):
        return path
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()
        if text != "release" and not text.isdigit():
            raise CheckpointFormatError(f"{tracker} holds {text[:40]!r}; expected an iteration number or 'release'")
        chosen = path / (text if text == "release" else f"iter_{int(text):07d}")
        if not chosen.is_dir():
            raise CheckpointFormatError(f"{tracker} names {chosen.name}, which is missing from {path}")
        return chosen
    found = sorted(p for p in path.iterdir() if p.is_dir() and _CHECKPOINT_DIR.match(p.name))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise CheckpointFormatError(
            f"{path}: no {TRACKER_FILE} to say which checkpoint to read, and {len(found)} iter_*/release folders "
            f"({listed}); expected exactly one, or pass the folder that holds mp_rank_XX/ itself"
        )
    return found[0]


def _rank_files(directory: Path) -> list[Path]:
    """``mp_rank_00/model_optim_rng.pt`` onwards, refusing any gap in the rank numbers."""
    ranks = {int(m.group(1)): p / RANK_FILE for p in directory.iterdir() if (m := _RANK_DIR.match(p.name))}
    if not ranks:
        raise CheckpointFormatError(f"{directory}: no mp_rank_XX/{RANK_FILE} (Megatron tensor-parallel ranks)")
    for rank in range(max(ranks) + 1):
        file = ranks.get(rank, directory / f"mp_rank_{rank:02d}" / RANK_FILE)
        if not file.is_file():
            raise CheckpointFormatError(
                f"{file} is missing: found rank(s) {', '.join(map(str, sorted(ranks)))} in {directory}, "
                f"and a model split over {max(ranks) + 1} ranks needs every one"
            )
    return [ranks[rank] for rank in range(len(ranks))]


# --- reading one rank ----------------------------------------------------------------


class _Dropped:
    """Stands in for every class and function the pickle names outside torch's allowlist.

    Those belong to the optimizer (Megatron's loss scaler), the RNG states
    (numpy arrays) and the like, all dropped: unpickling builds this instead
    of running their code, so a file can hold nothing that executes.
    """

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _load_rank(file: Path) -> tuple[dict, object]:
    """One rank's weights by dotted Megatron name (torch tensors) and its ``args`` (or None)."""
    import_torch(file, "Megatron partitions", "convert the checkpoint once where torch is installed "
                 "(checkpoints/convert.py) and load the result")
    try:
        # torch's own allowlist (tensors, storages, OrderedDict) takes precedence over these.
        stand_ins = [(_Dropped, name) for name in pickled_globals(file) if name != "argparse.Namespace"]
        state = load_torch(file, [argparse.Namespace, *stand_ins])
    except Exception as e:  # torch and pickletools raise many types for corrupt or truncated files
        raise CheckpointFormatError(f"{file}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointFormatError(
            f"{file}: no 'model' state dict; a Megatron {RANK_FILE} holds model, and optionally args, "
            "optimizer and RNG states"
        )
    tensors = _flatten(file, state["model"], "", {})
    check_dims(file, tensors)
    return tensors, state.get("args")


def _flatten(file: Path, tree: Mapping, prefix: str, out: dict) -> dict:
    """Nested state dicts to dotted names; every leaf must be a tensor."""
    import torch

    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(file, value, f"{name}.", out)
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise CheckpointFormatError(f"{file}: model entry {name} holds a {type(value).__name__}, not a tensor")
    return out


# --- config and checks ---------------------------------------------------------------


def _config_from_args(file: Path, args, ranks: int) -> PanguConfig | None:
    """The model ``args`` describe (see the module docstring), or None without ``args``."""
    if args is None:
        return None
    fields = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(fields, Mapping):
        raise CheckpointFormatError(f"{file}: args is a {type(args).__name__}; expected an argparse.Namespace")
    missing = [f for f in _ARG_FIELDS if not isinstance(fields.get(f), int)]
    if missing:
        raise CheckpointFormatError(f"{file}: args lacks integer {', '.join(missing)}")
    parallel = fields.get("tensor_model_parallel_size", fields.get("model_parallel_size", ranks))
    if parallel != ranks:
        raise CheckpointFormatError(
            f"{file}: args record a model split over {parallel} ranks, but {ranks} mp_rank_XX folders were found"
        )
    tanh = fields.get("bias_gelu_fusion", False) or fields.get("openai_gelu", False)
    try:
        return PanguConfig(
            vocab_size=fields["padded_vocab_size"], hidden_size=fields["hidden_size"],
            num_layers=fields["num_layers"] + 1, num_heads=fields["num_attention_heads"],
            ffn_size=fields.get("ffn_hidden_size") or 4 * fields["hidden_size"],
            max_positions=fields["max_position_embeddings"],
            layer_norm_epsilon=float(fields.get("layernorm_epsilon", 1e-5)),
            activation="gelu_tanh" if tanh else "gelu_erf",
        )
    except ConfigError as e:
        raise CheckpointFormatError(f"{file}: args describe no PanGu-alpha model: {e}") from None


def _shape_config(file: Path, tensors: Mapping, ranks: int) -> PanguConfig:
    """Sizes read off rank 0's tensors, to check the slices against each other.

    Heads change no shape, so one head stands in for the unknown count.
    """
    for name in (_POSITION, _WORD, _FFN_UP):
        if name not in tensors:
            raise CheckpointFormatError(f"{file}: no tensor {name}; is this a PanGu-alpha Megatron checkpoint?")
        if tensors[name].dim() != 2:
            raise CheckpointFormatError(f"{file}: tensor {name} has shape {list(tensors[name].shape)}; expected 2 dims")
    positions, hidden = tensors[_POSITION].shape
    blocks = 1 + max(int(m.group(1)) for name in tensors if (m := _LAYER.match(name)))
    try:
        return PanguConfig(
            vocab_size=ranks * tensors[_WORD].shape[0], hidden_size=hidden, num_layers=blocks + 1, num_heads=1,
            ffn_size=ranks * tensors[_FFN_UP].shape[0], max_positions=positions,
        )
    except ConfigError as e:
        raise CheckpointFormatError(f"{file}: tensor shapes describe no PanGu-alpha model: {e}") from None


def _check_names(file: Path, tensors: Mapping, expected: set[str], config: PanguConfig) -> None:
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointFormatError(
            f"{file}: missing tensor(s) {', '.join(missing[:6])} for {config.num_layers} layers "
            f"({config.num_blocks} ordinary plus the top query layer)"
        )
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointFormatError(
            f"{file}: unexpected tensor(s) {', '.join(unexpected[:6])} for {config.num_layers} layers; "
            "not a PanGu-alpha weight"
        )


def _slice_shape(files: list[Path], megatron: str, full: tuple[int, ...], split: int | None, error: type) -> tuple:
    """Each rank's share of a tensor of shape `full` (Megatron splits evenly)."""
    if split is None:
        return full
    if full[split] % len(files):
        raise error(
            f"{files[0].parent.parent}: tensor {megatron} of {list(full)} cannot be split over "
            f"{len(files)} ranks along dim {split}"
        )
    return full[:split] + (full[split] // len(files),) + full[split + 1:]


def _check_slices(files: list[Path], megatron: str, slices: list, part: tuple, split: int | None, error: type) -> None:
    share = "replicated on every rank" if split is None else f"1/{len(files)} of the tensor along dim {split}"
    for file, tensor in zip(files, slices):
        if tuple(tensor.shape) != part:
            raise error(f"{file}: tensor {megatron} has shape {list(tensor.shape)}; expected {list(part)} ({share})")
        if tensor.dtype != slices[0].dtype:
            raise CheckpointFormatError(
                f"{file}: tensor {megatron} is {tensor.dtype}, but {files[0]} has {slices[0].dtype}"
            )


def _merge(slices: list, split: int | None, transposed: bool) -> Callable[[], np.ndarray]:
    """Read the slices and join them into the MindSpore tensor, only when called."""
    def load() -> np.ndarray:
        parts = [torch_to_numpy(t) for t in slices]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=split)
        return array.T if transposed else array

    return load
