"""Find a checkpoint's format, open it by MindSpore names, and load it as our parameter tree."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from jax.sharding import Mesh

from ..config import ConfigError, PanguConfig, dtype_name
from ..quantize import quantize_params
from ..sharding import RULES, Rules
from .errors import CheckpointFormatError, CheckpointMismatchError
from .hf_format import hf_config, is_hf_dir, read_hf
from .loader import assemble_params
from .megatron_format import is_megatron_dir, read_megatron
from .mindspore_format import read_mindspore_index
from .npy_format import read_npy_dir
from .orbax_store import MARKER, load_orbax, mindspore_view, read_orbax_config
from .storage import read_json_object

__all__ = ["Source", "detect_format", "load_checkpoint", "open_source", "read_config"]

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions")


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened checkpoint: its tensors by MindSpore name, and its config if the format records one."""

    format: str
    path: Path
    config: PanguConfig | None
    tensors: Mapping


def detect_format(path: str | os.PathLike) -> str:
    """"mindspore", "hf", "orbax", "megatron" or "npy", from what the path holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix in (".safetensors", ".bin", ".pt", ".json", ".npy"):
            raise CheckpointFormatError(f"{path}: pass the directory that holds it, not the file")
        return "mindspore"  # its reader tells what else a file looks like
    if (path / MARKER).is_file():
        return "orbax"
    if is_hf_dir(path):
        return "hf"
    if is_megatron_dir(path):
        return "megatron"
    if any(path.glob("*.npy")):
        return "npy"
    raise CheckpointFormatError(
        f"{path}: no checkpoint format recognised; looked for {MARKER} (pangu_jax orbax store), "
        "config.json with model.safetensors, model.safetensors.index.json or pytorch_model*.bin (HuggingFace), "
        "latest_checkpointed_iteration.txt or mp_rank_XX/model_optim_rng.pt (Megatron partitions), "
        "and *.npy files (one per MindSpore tensor); a MindSpore checkpoint is a single .ckpt file"
    )


def open_source(path: str | os.PathLike, fmt: str | None = None) -> Source:
    """Open `path` (format detected unless given) without reading its tensors, except an orbax store's."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "mindspore":
        return Source(fmt, path, None, read_mindspore_index(path))
    if fmt == "npy":
        return Source(fmt, path, None, read_npy_dir(path))
    if fmt == "hf":
        config, tensors = read_hf(path)
        return Source(fmt, path, config, tensors)
    if fmt == "megatron":
        config, tensors = read_megatron(path)
        return Source(fmt, path, config, tensors)
    if fmt == "orbax":
        if read_orbax_config(path).weights == "int8":
            raise CheckpointFormatError(
                f"{path}: an int8 store cannot be converted (the formats hold float matrices, not int8 values "
                "with scales); convert the float checkpoint it was quantized from")
        config, params = load_orbax(path)
        return Source(fmt, path, config, mindspore_view(config, params))
    raise ValueError(f"unknown format {fmt!r}; expected one of mindspore, hf, megatron, npy, orbax")


def load_checkpoint(
    path: str | os.PathLike,
    config: PanguConfig | str | None = None,
    dtype: str | None = None,
    *,
    mesh: Mesh | None = None,
    rules: Rules = RULES,
    int8: bool = False,
) -> tuple[PanguConfig, dict]:
    """Load a PanGu-alpha checkpoint of any supported format: returns (config, params).

    The format is detected: a file is a MindSpore `.ckpt`; a directory with
    `pangu_jax.json` is our orbax store; one with `config.json` and
    `model.safetensors`, `model.safetensors.index.json` or
    `pytorch_model*.bin` is a HuggingFace GPTPangu export; one with
    `latest_checkpointed_iteration.txt` or `mp_rank_XX/model_optim_rng.pt`
    holds Megatron tensor-parallel partitions of the PyTorch port, merged on
    read (torch needed); one of `*.npy` files holds one MindSpore tensor per
    file.

    `config` is a PanguConfig, a preset name, or None: then HuggingFace and
    orbax directories, and Megatron ones saved with their `args`, use the
    config they record, and MindSpore, npy and argument-less Megatron files
    infer the preset from the tensor shapes (a config given for an
    orbax store may change its numerics, never its sizes). `dtype` ("float32",
    "bfloat16", "float16", or such a dtype: jnp.bfloat16, np.float16) is the storage and compute dtype of the returned
    model (LayerNorm stays float32); None keeps the file's own.

    With `mesh`, every parameter goes straight into its shards under `rules`
    (`sharding.RULES`: Megatron tensor parallel over the `tensor` axis); no
    device holds the whole model. The blocks come stacked (`layouts`);
    `generate` turns them into the per-layer layout it reads fastest.
    `int8=True` stores the matrices as weight-only int8 (`quantize`),
    quantized on the host before they reach a device (for an orbax store:
    on the device after the restore).
    """
    path = Path(path)
    fmt = detect_format(path)
    dtype = None if dtype is None else dtype_name(dtype)
    if isinstance(config, str):
        config = PanguConfig.preset(config)
    if fmt == "orbax":
        stored, params = load_orbax(path, dtype, mesh, rules)
        config = _keep_sizes(path, stored, config)
        return quantize_params(config, params) if int8 else (config, params)
    source = open_source(path, fmt)
    return assemble_params(str(path), source.tensors, config or source.config, dtype, mesh=mesh, rules=rules,
                           int8=int8)


def _keep_sizes(path: Path, stored: PanguConfig, given: PanguConfig | None) -> PanguConfig:
    """A given config may change the numerics of a store (activation, epsilon), never its sizes."""
    if given is None:
        return stored
    differ = [f"{f} {getattr(given, f)} (stored {getattr(stored, f)})"
              for f in _SIZE_FIELDS if getattr(given, f) != getattr(stored, f)]
    if differ:
        raise CheckpointMismatchError(f"{path}: the given config differs from the store's: {', '.join(differ)}")
    return given.replace(param_dtype=stored.param_dtype, dtype=stored.dtype)


def read_config(path: str | os.PathLike) -> PanguConfig:
    """The model a JSON file describes: our config.json (`PanguConfig.to_json`) or a HuggingFace GPTPangu one.

    For checkpoints that record no config and match no preset (a MindSpore
    or .npy file of another size): `load_checkpoint(path, read_config(...))`.
    """
    path = Path(path)
    fields = read_json_object(path, "it was given as the model's config")
    if "model_type" in fields or "max_position_embeddings" in fields:
        return hf_config(path, fields)
    try:
        return PanguConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
