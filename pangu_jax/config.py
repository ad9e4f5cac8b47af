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
DECODE_ATTENTION_KERNELS = ("auto", "pallas", "pallas_interpret", "cudnn", "explicit")
MATVEC_FORMS = ("auto", "reduction", "einsum")
LORA_TARGETS = ("query", "key", "value", "output", "up", "down")
# Storage and compute dtypes (checkpoints, scripts); a model may also compute
# in float64 (numerical checks; needs jax_enable_x64).
DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = (*DTYPES, "float64")


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


def dtype_name(dtype: Any, what: str = "dtype", allowed: tuple[str, ...] = DTYPES) -> str:
    """The name in `allowed` of `dtype`, given as a name ("bfloat16"), a type (jnp.bfloat16, np.float16) or a dtype.

    `what` names the argument in the error.
    """
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)} (a name or a dtype), got {dtype!r}")
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

    Which kernel computes what is chosen here too, each "auto" by default,
    which `resolved()` turns into the choice for the backend (once, at
    trace time; a script prints it):
    `attention`, the attention of several tokens at once (a prompt, a
    training row): "cudnn", cuDNN's fused kernel (auto on a GPU in 16 bits
    for a head_dim that is a multiple of 8 up to 128), or "explicit",
    einsums and a softmax (auto elsewhere; the path to study or compare
    against). `decode_attention`, one new token against the cache:
    "pallas", our kernel (`kernels.decode_attention`: it also writes the
    new key and value into the cache and reads only the written slots;
    auto on a GPU in 16 bits), "pallas_interpret", the same kernel through
    Pallas's interpreter (any backend, slowly: for tests), "cudnn" or
    "explicit" (auto elsewhere). `matvec`, the products of a single row
    (`products`): "reduction", summed along the matrix's rows (auto on a
    GPU), or "einsum" (auto elsewhere).

    `lora_rank` > 0 adds low-rank adapters to the `lora_targets` matrices of
    every block (each W becomes W + (lora_alpha / lora_rank) B A, with A
    [rank, in] and B [out, rank], B starting at zero), as parameters
    `<matrix>_lora_a` and `_lora_b` beside the matrix (`train.lora`).
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
    decode_attention: str = "auto"
    matvec: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")

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
        for name, allowed in (("attention", ATTENTION_KERNELS), ("decode_attention", DECODE_ATTENTION_KERNELS),
                              ("matvec", MATVEC_FORMS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"PanguConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ConfigError(f"PanguConfig.lora_rank must be an integer >= 0 (0: no adapters), got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"PanguConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        if not targets or any(t not in LORA_TARGETS for t in targets):
            raise ConfigError(f"PanguConfig.lora_targets must be some of {LORA_TARGETS}, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", targets)  # a JSON list becomes a tuple again
        for name in ("param_dtype", "dtype"):  # stored by name, whatever form was given
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"PanguConfig.{name}", MODEL_DTYPES))

    def resolved(self, backend: str | None = None) -> PanguConfig:
        """This config with each "auto" kernel replaced by the one that runs on `backend` (default: JAX's).

        Also checks that a float64 model has float64 to run in.
        """
        import jax

        backend = jax.default_backend() if backend is None else backend
        if "float64" in (self.dtype, self.param_dtype) and not jax.config.jax_enable_x64:
            raise ConfigError("a float64 PanguConfig needs 64-bit JAX: jax.config.update('jax_enable_x64', True) "
                              "before making any array")
        gpu16 = backend == "gpu" and self.dtype in ("bfloat16", "float16")
        choices = {
            "attention": "cudnn" if gpu16 and self.head_dim % 8 == 0 and self.head_dim <= 128 else "explicit",
            "decode_attention": "pallas" if gpu16 else "explicit",
            "matvec": "reduction" if backend == "gpu" else "einsum",
        }
        return self.replace(**{name: choice for name, choice in choices.items() if getattr(self, name) == "auto"})

    def kernels(self) -> str:
        """The kernel choices in words, e.g. for a script's first line: "attention cudnn, decode pallas, ..."."""
        return f"attention {self.attention}, decode attention {self.decode_attention}, products {self.matvec}"

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

    @property
    def accum_dtype(self):
        """What LayerNorm, softmax and the residual stream compute in: float32, or float64 for a float64 model."""
        return np.dtype(np.float64 if self.dtype == "float64" else np.float32)

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
