"""Model configuration: a frozen dataclass, presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

ACTIVATIONS = ("gelu_tanh", "gelu_erf")
WEIGHT_FORMATS = ("float", "int8")
ATTENTION_KERNELS = ("auto", "cudnn", "explicit")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration that cannot describe a PanGu-alpha model."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a name in `DTYPES`, which every jax.numpy function takes.

    bfloat16 comes from ml_dtypes, imported only here, so that reading a
    config (a script's --help) imports neither it nor JAX.
    """
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype: Any, what: str = "dtype") -> str:
    """The name in `DTYPES` of `dtype`, given as a name ("bfloat16"), a type (jnp.bfloat16, np.float16) or a dtype.

    `what` names the argument in the error.
    """
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(DTYPES)} (a name or a dtype), got {dtype!r}")
    return name


@dataclasses.dataclass(frozen=True)
class PanguConfig:
    """Sizes and numerics of one PanGu-alpha network.

    `num_layers` counts the top query layer, as the released models do: the
    2.6B model has 31 ordinary blocks plus the top query layer.
    `param_dtype` is the storage dtype of the matrices and embeddings
    (LayerNorm parameters always stay float32, as in the original fp16
    network); `dtype` is the compute dtype of the matrix multiplications.
    `weights` is "float" (matrices stored in `param_dtype`) or "int8":
    weight-only int8 with one float32 scale per output channel for every
    block matrix and the embedding/head (see `pangu_jax.quantize`).
    `attention` picks how attention is computed on a GPU in 16 bits: "auto"
    runs a prompt's attention as cuDNN's fused kernel (head_dim a multiple
    of 8 up to 128) and a decode step's as our Pallas kernel
    (`pangu_jax.decode_attention`, which also writes the new key and value
    into the cache and reads only the written slots); "cudnn" uses cuDNN for both; "explicit" computes the scores and
    softmax with einsums, as on CPU always (the path to study or compare
    against).
    """

    vocab_size: int = 40000
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    ffn_size: int = 10240
    max_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"
    param_dtype: str = "float32"
    dtype: str = "float32"
    weights: str = "float"
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "ffn_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"PanguConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ConfigError(
                "PanguConfig.num_layers counts the top query layer and must be at least 2 "
                f"(one ordinary block plus the top query layer), got {self.num_layers!r}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"PanguConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(
                f"PanguConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"PanguConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"PanguConfig.weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"PanguConfig.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        for name in ("param_dtype", "dtype"):  # stored by name, whatever form was given
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"PanguConfig.{name}"))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_blocks(self) -> int:
        """Ordinary blocks, i.e. every layer but the top query layer."""
        return self.num_layers - 1

    @property
    def jnp_dtype(self):
        return numpy_dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return numpy_dtype(self.param_dtype)

    def replace(self, **changes: Any) -> PanguConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (tied output head counted once)."""
        h, f, p = self.hidden_size, self.ffn_size, self.max_positions
        block = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        return self.vocab_size * h + 2 * p * h + self.num_layers * block + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanguConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown PanguConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> PanguConfig:
        """Parse a JSON string, or read a JSON file when given a path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PanguConfig:
        try:
            sizes = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return cls(**{**sizes, **overrides})


def _sizes(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_size=4 * hidden, **extra)


PRESETS: dict[str, dict[str, Any]] = {
    "350M": _sizes(1024, 24, 16),
    "2.6B": _sizes(2560, 32, 32),
    "13B": _sizes(5120, 40, 40),
    "200B": _sizes(16384, 64, 128),
    # The shape of the reference fixtures (tests/fixtures/config.json).
    "tiny": _sizes(64, 3, 4, vocab_size=1000, max_positions=128),
    # The embedded demo model: the real vocabulary and context, tiny width.
    "tiny-40k": _sizes(32, 3, 4),
}
