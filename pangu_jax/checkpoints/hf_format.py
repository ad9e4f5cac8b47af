"""HuggingFace GPTPangu directories (the PyTorch port ``imoneoi/transformers-pangu``).

A directory holds ``config.json`` and the weights as ``model.safetensors``,
sharded safetensors named by ``model.safetensors.index.json``, or
``pytorch_model*.bin`` pickles. Names map to MindSpore's by `HF_GLOBALS` and
`HF_BLOCK`; torch ``Linear`` stores [out, in], so the query/key/value
weights match MindSpore's layout and ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj`` are transposed. The last layer ``h.{L-1}`` is the top query
layer. ``lm_head.weight`` is tied to ``wte`` (absent, or equal to it). The
buffers ``attn.bias`` (causal mask) and ``attn.masked_bias`` carry no
weights: the reader skips them, the writer stores them as the port does.

Vocabulary padding: a 13B variant stores ``wte`` with 40064 rows, its
``vocab_size`` 40000 or 40064. The rows are kept, so the model runs and the
config's ``vocab_size`` is the row count; the logits of ids 40000 and up
belong to no token, so whoever samples must never pick them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..config import PanguConfig
from ..atomic import atomic_directory
from .errors import CheckpointFormatError
from .layout import mindspore_slots
from .storage import JSON_TYPES, LazyTensor, implausible_dims, read_json_object
from .torch_pickle import check_dims, import_torch, load_torch, torch_dtype, torch_to_numpy

__all__ = ["HF_BLOCK", "HF_GLOBALS", "hf_config", "hf_config_dict", "hf_names", "is_hf_dir", "read_hf", "write_hf"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

HF_GLOBALS = {
    "backbone.word_embedding.embedding_table": "transformer.wte.weight",
    "backbone.position_embedding.embedding_table": "transformer.wpe.weight",
    "backbone.top_query_embedding.embedding_table": "transformer.wqe.weight",
    "backbone.layernorm.gamma": "transformer.ln_f.weight",
    "backbone.layernorm.beta": "transformer.ln_f.bias",
}
# MindSpore name within a block -> (HF name within transformer.h.{i}, stored transposed).
HF_BLOCK = {
    "layernorm1.gamma": ("ln_1.weight", False),
    "layernorm1.beta": ("ln_1.bias", False),
    "layernorm2.gamma": ("ln_2.weight", False),
    "layernorm2.beta": ("ln_2.bias", False),
    "attention.dense1.weight": ("attn.q_proj.weight", False),
    "attention.dense1.bias": ("attn.q_proj.bias", False),
    "attention.dense2.weight": ("attn.k_proj.weight", False),
    "attention.dense2.bias": ("attn.k_proj.bias", False),
    "attention.dense3.weight": ("attn.v_proj.weight", False),
    "attention.dense3.bias": ("attn.v_proj.bias", False),
    "attention.projection.weight": ("attn.c_proj.weight", True),
    "attention.projection.bias": ("attn.c_proj.bias", False),
    "output.mapping.weight": ("mlp.c_fc.weight", True),
    "output.mapping.bias": ("mlp.c_fc.bias", False),
    "output.projection.weight": ("mlp.c_proj.weight", True),
    "output.projection.bias": ("mlp.c_proj.bias", False),
}
_BUFFERS = ("attn.bias", "attn.masked_bias")
_LM_HEAD = "lm_head.weight"
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_MS_BLOCK = re.compile(r"^backbone\.(?:blocks\.\d+|top_query_layer)\.(.+)$")
_MASKED_BIAS = -1e4

# HF activation_function -> ours. The port's own default is "gelu" (exact erf).
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}
_DEFAULT_ACTIVATION = "gelu"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The config.json fields read here: field -> (whether a value has the right type, that type, required).
_FIELD_TYPES = {
    "hidden_size": (_is_int, "an integer", True),
    "vocab_size": (_is_int, "an integer", True),
    "max_position_embeddings": (_is_int, "an integer", True),
    "intermediate_size": (lambda v: v is None or _is_int(v), "an integer or null", False),
    "num_layers": (_is_int, "an integer", True),
    "num_heads": (_is_int, "an integer", True),
    "layer_norm_epsilon": (lambda v: _is_int(v) or isinstance(v, float), "a number", False),
    "activation_function": (lambda v: isinstance(v, str), "a string", False),
}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def hf_names(config: PanguConfig) -> dict[str, tuple[str, bool]]:
    """MindSpore name -> (HF name, transposed), in MindSpore file order."""
    names = {}
    for ms_name, slot in mindspore_slots(config).items():
        if ms_name in HF_GLOBALS:
            names[ms_name] = (HF_GLOBALS[ms_name], False)
            continue
        index = config.num_layers - 1 if slot.layer is None else slot.layer
        hf_suffix, transposed = HF_BLOCK[_MS_BLOCK.match(ms_name).group(1)]
        names[ms_name] = (f"transformer.h.{index}.{hf_suffix}", transposed)
    return names


def is_hf_dir(path: Path) -> bool:
    """config.json beside safetensors, a safetensors or pickle index, or pickles."""
    weights = any((path / f).is_file() for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_INDEX))
    return (path / CONFIG_FILE).is_file() and (weights or any(path.glob("pytorch_model*.bin")))


# --- reading -------------------------------------------------------------------------


def read_hf(path: str | os.PathLike) -> tuple[PanguConfig, dict[str, LazyTensor]]:
    """The config (from config.json, checked against the tensors) and the tensors by MindSpore name.

    Tensors are read one at a time, only when converted (`LazyTensor`).
    """
    path = Path(path)
    fields = read_json_object(path / CONFIG_FILE, "a HuggingFace directory needs it")
    stored, where = _open_weights(path)
    config = _config_from_fields(path / CONFIG_FILE, fields, stored, where)
    names = hf_names(config)
    _check_names(path, config, stored, {hf for hf, _ in names.values()})
    _check_lm_head(path, stored)
    tensors = {ms: _as_mindspore(stored[hf], transposed) for ms, (hf, transposed) in names.items()}
    for ms, slot in mindspore_slots(config).items():
        if tensors[ms].shape != slot.stored_shape:
            hf, transposed = names[ms]
            expected = list(slot.stored_shape[::-1] if transposed else slot.stored_shape)
            raise CheckpointFormatError(
                f"{path / CONFIG_FILE}: tensor {hf} has shape {list(stored[hf].shape)}; hidden_size="
                f"{config.hidden_size}, intermediate_size {config.ffn_size} and num_heads {config.num_heads} need {expected}"
            )
    return config, tensors


def _as_mindspore(record: LazyTensor, transposed: bool) -> LazyTensor:
    if not transposed:
        return record
    return LazyTensor(record.shape[::-1], record.dtype, lambda: np.asarray(record).T)


def _open_weights(path: Path) -> tuple[dict[str, LazyTensor], dict[str, Path]]:
    """Every stored tensor by HF name and the file holding each, preferring safetensors as transformers does."""
    if (path / SAFETENSORS_FILE).is_file():
        return _merge([(path / SAFETENSORS_FILE, _open_safetensors(path / SAFETENSORS_FILE))])
    if (path / SAFETENSORS_INDEX).is_file():
        return _open_shards(path / SAFETENSORS_INDEX, _open_safetensors)
    if (path / PICKLE_INDEX).is_file():
        return _open_shards(path / PICKLE_INDEX, _open_pickle)
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointFormatError(
            f"{path}: no weights; looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {PICKLE_INDEX}, pytorch_model*.bin"
        )
    return _merge([(f, _open_pickle(f)) for f in files])


def _open_shards(index: Path, open_file) -> tuple[dict[str, LazyTensor], dict[str, Path]]:
    weight_map = read_json_object(index, "the index names it").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{index}: no weight_map; expected {{tensor name: shard file}}")
    for tensor, name in weight_map.items():
        if not (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name):
            raise CheckpointFormatError(
                f"{index}: weight_map puts tensor {tensor} in {name!r}; expected the name of a file in {index.parent}"
            )
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointFormatError(f"{index} names shard {name}, which is missing from {index.parent}")
        shards.append((shard, open_file(shard)))
    return _merge(shards)


def _merge(files: list[tuple[Path, dict[str, LazyTensor]]]) -> tuple[dict[str, LazyTensor], dict[str, Path]]:
    merged: dict[str, LazyTensor] = {}
    where: dict[str, Path] = {}
    for file, tensors in files:
        for name, record in tensors.items():
            if name in merged:
                raise CheckpointFormatError(f"{file}: tensor {name} is also stored in {where[name]}")
            merged[name], where[name] = record, file
    return merged, where


def _open_safetensors(file: Path) -> dict[str, LazyTensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointFormatError(f"{file}: not a readable safetensors file ({e})") from None
    records, size = {}, file.stat().st_size
    for name in handle.keys():
        part = handle.get_slice(name)
        dtype_name = _SAFETENSORS_DTYPES.get(part.get_dtype())
        if dtype_name is None:
            raise CheckpointFormatError(f"{file}: tensor {name} has unsupported dtype {part.get_dtype()}")
        shape, dtype = tuple(part.get_shape()), _numpy_dtype(dtype_name)
        why = implausible_dims(shape, dtype.itemsize, size)
        if why:
            raise CheckpointFormatError(f"{file}: tensor {name}: {why}")
        records[name] = LazyTensor(shape, dtype, lambda name=name: handle.get_tensor(name))
    return records


def _open_pickle(file: Path) -> dict[str, LazyTensor]:
    import_torch(file, "PyTorch pickles", "better, convert the directory to safetensors (model.safetensors), "
                 "which needs no torch and cannot run code when loaded")
    try:
        state = load_torch(file)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointFormatError(f"{file}: not a loadable PyTorch state dict ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{file}: holds a {type(state).__name__}, expected a state dict")
    check_dims(file, state)
    return {name: LazyTensor(tuple(t.shape), torch_dtype(t), lambda t=t: torch_to_numpy(t)) for name, t in state.items()}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _config_from_fields(file: Path, fields: dict, stored: Mapping[str, LazyTensor],
                        where: Mapping[str, Path]) -> PanguConfig:
    """PanguConfig from config.json, every field's type checked, then every size against the tensors."""
    _check_types(file, fields)
    for tensor in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"):
        if tensor not in stored:
            raise CheckpointFormatError(f"{file.parent}: no tensor {tensor}; is this a GPTPangu checkpoint?")
        if len(stored[tensor].shape) != 2:
            raise CheckpointFormatError(
                f"{where[tensor]}: tensor {tensor} has shape {list(stored[tensor].shape)}; expected 2 dims"
            )
    rows, hidden = stored["transformer.wte.weight"].shape
    positions = stored["transformer.wpe.weight"].shape[0]
    ffn = stored["transformer.h.0.mlp.c_fc.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for n in stored if (m := _LAYER.match(n)))

    def require(key: str, ok, tensor: str, found) -> None:
        if not ok(fields.get(key)):
            raise CheckpointFormatError(
                f"{file}: field {key}={fields.get(key)!r} contradicts tensor {tensor}, which gives {found}"
            )

    require("hidden_size", lambda v: v == hidden, "transformer.wte.weight", f"hidden size {hidden}")
    require("vocab_size", lambda v: _vocab_fits(v, rows), "transformer.wte.weight", f"{rows} rows")
    require("max_position_embeddings", lambda v: v == positions, "transformer.wpe.weight", f"{positions} positions")
    require("intermediate_size", lambda v: (v or 4 * hidden) == ffn, "transformer.h.0.mlp.c_fc.weight", f"FFN size {ffn}")
    require("num_layers", lambda v: v == layers, f"transformer.h.{layers - 1}.*", f"{layers} layers")
    return _config(file, fields, vocab_size=rows, hidden_size=hidden, num_layers=layers, ffn_size=ffn,
                   max_positions=positions)


def hf_config(file: Path, fields: dict) -> PanguConfig:
    """The PanguConfig a GPTPangu config.json's fields describe, on their own (their types checked)."""
    _check_types(file, fields)
    hidden = fields["hidden_size"]
    return _config(file, fields, vocab_size=fields["vocab_size"], hidden_size=hidden, num_layers=fields["num_layers"],
                   ffn_size=fields.get("intermediate_size") or 4 * hidden,
                   max_positions=fields["max_position_embeddings"])


def _config(file: Path, fields: dict, **sizes) -> PanguConfig:
    """`sizes` with the heads, epsilon and activation of `fields`; what does not make a model is named."""
    activation = fields.get("activation_function", _DEFAULT_ACTIVATION)
    if activation not in _ACTIVATIONS:
        raise CheckpointFormatError(
            f"{file}: field activation_function={activation!r} is not supported; expected one of {', '.join(_ACTIVATIONS)}"
        )
    try:
        return PanguConfig(num_heads=fields["num_heads"], layer_norm_epsilon=float(fields.get("layer_norm_epsilon", 1e-5)),
                           activation=_ACTIVATIONS[activation], **sizes)
    except ValueError as e:  # e.g. num_heads does not divide hidden_size
        raise CheckpointFormatError(f"{file}: {e}") from None


def _check_types(file: Path, fields: dict) -> None:
    for key, (fits, expected, required) in _FIELD_TYPES.items():
        if key not in fields:
            if required:
                raise CheckpointFormatError(f"{file}: field {key} is missing")
        elif not fits(fields[key]):
            raise CheckpointFormatError(
                f"{file}: field {key}={fields[key]!r} is {JSON_TYPES[type(fields[key])]}; expected {expected}"
            )


def _vocab_fits(vocab: int, rows: int) -> bool:
    """Rows equal vocab_size, or pad it to the next multiple of 64 or 128 (module docstring)."""
    return rows == vocab or (rows > vocab and rows % 64 == 0 and rows - vocab < 128)


def _check_names(path: Path, config: PanguConfig, stored: Mapping[str, LazyTensor], expected: set[str]) -> None:
    missing = sorted(expected - set(stored))
    if missing:
        raise CheckpointFormatError(
            f"{path}: missing tensor(s) {', '.join(missing[:6])} for {config.num_layers} layers (config.json num_layers)"
        )
    unexpected = sorted(n for n in stored if n not in expected and n != _LM_HEAD and not _is_buffer(n))
    if unexpected:
        raise CheckpointFormatError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:6])}; not a GPTPangu weight")


def _is_buffer(name: str) -> bool:
    m = _LAYER.match(name)
    return bool(m) and m.group(2) in _BUFFERS


def _check_lm_head(path: Path, stored: Mapping[str, LazyTensor]) -> None:
    """A stored lm_head must be the tied word embedding: this model has no separate output head."""
    if _LM_HEAD not in stored:
        return
    head, wte = stored[_LM_HEAD], stored["transformer.wte.weight"]
    if head.shape != wte.shape or not np.array_equal(np.asarray(head), np.asarray(wte)):
        raise CheckpointFormatError(
            f"{path}: {_LM_HEAD} differs from transformer.wte.weight; PanGu-alpha ties its output head "
            "to the word embedding, so an untied head cannot be loaded"
        )


# --- writing -------------------------------------------------------------------------


def hf_config_dict(config: PanguConfig, dtype: np.dtype) -> dict:
    """config.json as GPTPanguConfig.save_pretrained writes it (less transformers_version)."""
    tanh = config.activation == "gelu_tanh"
    return {
        "activation_function": "gelu_new" if tanh else "gelu",
        "architectures": ["GPTPanguForCausalLM"],
        "attn_pdrop": 0.1,
        "bos_token_id": 9,
        "dtype": np.dtype(dtype).name,
        "embd_pdrop": 0.1,
        "eos_token_id": 9,
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": None if config.ffn_size == 4 * config.hidden_size else config.ffn_size,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "max_position_embeddings": config.max_positions,
        "model_type": "gpt_pangu",
        "num_heads": config.num_heads,
        "num_layers": config.num_layers,
        "resid_pdrop": 0.1,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def write_hf(
    path: str | os.PathLike,
    config: PanguConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtypes: Mapping[str, np.dtype],
) -> None:
    """Write a GPTPangu directory (config.json + model.safetensors) atomically, tensor by tensor.

    `tensors` yields (MindSpore name, array) in any order; `dtypes` says in
    advance which dtype each will have, because the safetensors header, with
    every offset, comes first in the file. Each array must arrive with exactly
    its planned shape and dtype. No lm_head is written (tied).
    """
    path = Path(path)
    names = hf_names(config)
    slots = mindspore_slots(config)
    planned = {ms: (np.dtype(dtypes[ms]), slots[ms].stored_shape) for ms in names}
    word_dtype = planned["backbone.word_embedding.embedding_table"][0]
    buffers = _buffers(config, word_dtype)
    layout = [(hf, array.dtype, array.shape) for hf, array in buffers]
    layout += [(hf, planned[ms][0], planned[ms][1][::-1] if t else planned[ms][1]) for ms, (hf, t) in names.items()]
    header, offsets = _safetensors_header(layout)
    with atomic_directory(path) as tmp:
        with open(tmp / SAFETENSORS_FILE, "xb") as f:
            f.write(header)
            for hf, array in buffers:
                _write_at(f, len(header) + offsets[hf], array)
            for ms, array in _validated(path, tensors, planned):
                hf, transposed = names[ms]
                _write_at(f, len(header) + offsets[hf], array.T if transposed else array)
            f.flush()
            os.fsync(f.fileno())
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(config, word_dtype), indent=2, sort_keys=True) + "\n")


def _validated(path: Path, tensors: Iterable[tuple[str, np.ndarray]], planned: dict) -> Iterable[tuple[str, np.ndarray]]:
    """Pass each planned tensor through once, as planned; fail on anything else or on a gap."""
    pending = dict(planned)
    for name, array in tensors:
        array = np.asarray(array)
        if name not in pending:
            why = "arrived twice" if name in planned else "is not a weight of this model"
            raise ValueError(f"{path}: tensor {name} {why}")
        dtype, shape = pending.pop(name)
        if array.dtype != dtype or array.shape != shape:
            raise ValueError(
                f"{path}: tensor {name} arrived as {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}"
            )
        yield name, array
    if pending:
        raise ValueError(f"{path}: tensor(s) {', '.join(list(pending)[:6])} never arrived")


def _buffers(config: PanguConfig, dtype: np.dtype) -> list[tuple[str, np.ndarray]]:
    """The causal-mask buffers GPTPangu keeps in every layer (the fixture files hold them)."""
    p = config.max_positions
    mask = np.tril(np.ones((p, p), np.uint8)).reshape(1, 1, p, p)
    scalar = np.asarray(_MASKED_BIAS, dtype)
    out = []
    for i in range(config.num_layers):
        out += [(f"transformer.h.{i}.attn.bias", mask), (f"transformer.h.{i}.attn.masked_bias", scalar)]
    return out


def _safetensors_header(layout: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """Length prefix plus JSON header (padded to 8 bytes), and each tensor's offset after it."""
    to_code = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offsets, position = {}, 0
    for name, dtype, shape in layout:
        end = position + math.prod(shape) * dtype.itemsize
        offsets[name] = position
        entries[name] = {"dtype": to_code[dtype.name], "shape": list(shape), "data_offsets": [position, end]}
        position = end
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def _write_at(f, offset: int, array: np.ndarray) -> None:
    f.seek(offset)
    f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
