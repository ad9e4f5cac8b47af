"""The fine-tuning configuration: one typed, frozen object read from YAML, checked before anything compiles.

    model:      what is trained (a checkpoint of any format, or random weights of a preset) and how
    data:       `DataConfig` (files, packing, batch size, sequence length, evaluation split)
    optimizer:  AdamW and its schedule
    lora:       low-rank adapters (rank 0: off, every weight trained)
    run:        steps, micro-batches, mesh, logging, evaluation, checkpoints

A file names what it changes from the defaults; `key.path=value` overrides
on the command line are parsed as YAML values. Every error names the field
(`optimizer.learning_rate`) and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import DTYPES, PRESETS
from .data import DataConfig

__all__ = ["LoraConfig", "ModelConfig", "OptimizerConfig", "RunConfig", "TrainConfig", "TrainConfigError",
           "load_train_config"]

# "none" and the keys of `model.REMAT_POLICIES`, named here so that checking a config imports no JAX.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "dots_with_no_batch_dims_and_attention")
LORA_TARGETS = ("query", "key", "value", "output", "up", "down")


class TrainConfigError(ValueError):
    """A fine-tuning configuration that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What is trained, and in which numerics.

    `checkpoint`: any checkpoint `load_checkpoint` reads. `preset`: the model
    a config is written for ("2.6B", "13B", ...): a checkpoint must have its
    sizes, and without one the config is refused unless `random_init`
    asks for random weights of the preset (benchmarks). Neither checkpoint
    nor preset: the embedded tiny model (the demo). `dtype`: the compute
    dtype; `param_dtype`: the master weights (float32 by default, as mixed
    precision wants).
    `dropout`: after the embeddings and on each residual branch (the
    original trained with 0.1), and on the attention probabilities where
    attention is explicit (the CPU's; cuDNN's fused kernel, a GPU's default,
    takes no dropout: `model.attention=explicit` for it, at the cost of
    the [B, heads, T, T] scores in memory). `remat`: what each
    scanned block keeps for the backward pass: "none" (everything), "full"
    (nothing: recompute the block), "dots" (the matrix products' outputs),
    "dots_with_no_batch_dims" (those of the weight matrices),
    "dots_with_no_batch_dims_and_attention" (and cuDNN attention's output).
    """

    checkpoint: str | None = None
    preset: str | None = None
    random_init: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    dropout: float = 0.0
    remat: str = "full"
    attention: str = "auto"

    def check(self, where: str) -> None:
        _choice(f"{where}.preset", self.preset, (None, *PRESETS))
        if self.random_init and self.preset is None:
            raise TrainConfigError(f"{where}.random_init: needs {where}.preset, the model whose shapes to draw")
        if self.random_init and self.checkpoint is not None:
            raise TrainConfigError(f"{where}: give checkpoint or random_init, not both")
        if self.preset is not None and self.checkpoint is None and not self.random_init:
            raise TrainConfigError(f"{where}.checkpoint: this config trains PanGu-alpha {self.preset}: give its "
                                   f"checkpoint ({where}.checkpoint=PATH, any released format), or "
                                   f"{where}.random_init=true for random weights")
        _choice(f"{where}.dtype", self.dtype, DTYPES)
        _choice(f"{where}.param_dtype", self.param_dtype, DTYPES)
        _number(f"{where}.dropout", self.dropout, 0, 1, high_open=True)
        _choice(f"{where}.remat", self.remat, REMAT_POLICIES)
        _choice(f"{where}.attention", self.attention, ("auto", "cudnn", "explicit"))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine decay to `end_learning_rate`, and global-norm clipping.

    Weight decay applies to every matrix and embedding, not to biases or
    LayerNorm parameters (as Megatron, which PanGu's GPU port is built on,
    does). `moments_dtype` "bfloat16" halves the optimizer state (13B).
    """

    learning_rate: float = 1e-4
    end_learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    moments_dtype: str = "float32"

    def check(self, where: str) -> None:
        _number(f"{where}.learning_rate", self.learning_rate, 0, None, low_open=True)
        _number(f"{where}.end_learning_rate", self.end_learning_rate, 0, None)
        _integer(f"{where}.warmup_steps", self.warmup_steps, 0)
        _number(f"{where}.weight_decay", self.weight_decay, 0, None)
        for name in ("b1", "b2"):
            _number(f"{where}.{name}", getattr(self, name), 0, 1, high_open=True)
        _number(f"{where}.eps", self.eps, 0, None, low_open=True)
        _number(f"{where}.clip_norm", self.clip_norm, 0, None, low_open=True)
        _choice(f"{where}.moments_dtype", self.moments_dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the `targets` matrices of every block: W + (alpha / rank) B A, the base frozen."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")

    def check(self, where: str) -> None:
        _integer(f"{where}.rank", self.rank, 0)
        _number(f"{where}.alpha", self.alpha, 0, None, low_open=True)
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets):
            raise TrainConfigError(f"{where}.targets: expected some of {', '.join(LORA_TARGETS)}, "
                                   f"got {list(self.targets)!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop: how long, in what pieces, on which devices, and what it records.

    `micro_batch`: rows per forward and backward pass; the data's batch is
    split into `batch_size / micro_batch` of them, their gradients summed
    before one optimizer step. `mesh`: e.g. "fsdp=4" or "data=2,fsdp=2,tensor=2"
    (default: every device on `fsdp`). Checkpoints every `checkpoint_every`
    steps and every `checkpoint_minutes`, the last `keep` kept; evaluation
    every `eval_every` steps (0: only at the end) over at most `eval_batches`
    batches. `max_bad_steps`: steps in a row whose loss or gradient is not
    finite (each skipped) before the run stops.
    """

    output_dir: str = "runs/demo"
    steps: int = 100
    micro_batch: int | None = None
    mesh: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint_every: int = 0
    checkpoint_minutes: float = 30.0
    keep: int = 2
    max_bad_steps: int = 5
    tensorboard: bool = False
    save: bool = True

    def check(self, where: str) -> None:
        _integer(f"{where}.steps", self.steps, 1)
        if self.micro_batch is not None:
            _integer(f"{where}.micro_batch", self.micro_batch, 1)
        _integer(f"{where}.seed", self.seed, 0)
        for name in ("log_every", "eval_every", "checkpoint_every", "max_bad_steps"):
            _integer(f"{where}.{name}", getattr(self, name), 0)
        _integer(f"{where}.keep", self.keep, 1)
        if self.eval_batches is not None:
            _integer(f"{where}.eval_batches", self.eval_batches, 1)
        _number(f"{where}.checkpoint_minutes", self.checkpoint_minutes, 0, None, low_open=True)
        if self.mesh is not None:
            from ..sharding import parse_mesh_shape

            try:
                parse_mesh_shape(self.mesh)
            except ValueError as e:
                raise TrainConfigError(f"{where}.mesh: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        for section in ("model", "optimizer", "lora", "run"):
            getattr(self, section).check(section)
        micro = self.micro_batch
        if self.data.batch_size % micro:
            raise TrainConfigError(f"run.micro_batch: {micro} does not divide data.batch_size {self.data.batch_size}")

    @property
    def micro_batch(self) -> int:
        return self.run.micro_batch or self.data.batch_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.data.batch_size // self.micro_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                      defaults: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config in the YAML file at `path` (over `defaults`), with `key.path=value` overrides applied."""
    import yaml

    tree: dict = {}
    for source in (defaults, None if path is None else _read_yaml(Path(path))):
        _merge(tree, source or {})
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {override!r}: expected key.path=value, e.g. run.steps=200")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TrainConfigError(f"override {override!r}: the value is not YAML ({e})") from None
        node = tree
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {override!r}: {part} is not a section")
        node[last] = value
    return build(TrainConfig, tree, "")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise TrainConfigError(f"{path}: expected sections (model, data, optimizer, lora, run), got {type(tree).__name__}")
    return tree


def _merge(into: dict, tree: Mapping) -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def build(cls, tree: Any, where: str):
    """An instance of the dataclass `cls` from a parsed tree, each field checked against its annotation."""
    if not isinstance(tree, Mapping):
        raise TrainConfigError(f"{where or 'the config'}: expected a section of fields, got {tree!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(known))
    if unknown:
        raise TrainConfigError(f"{_join(where, unknown[0])}: unknown field; {where or 'the config'} has "
                               f"{', '.join(known)}")
    values = {}
    for name, value in tree.items():
        path = _join(where, name)
        values[name] = _convert(hints[name], value, path)
    missing = [name for name, f in known.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TrainConfigError(f"{_join(where, missing[0])}: required")
    try:
        return cls(**values)
    except TrainConfigError:
        raise
    except ValueError as e:  # a section's own check (DataConfig)
        raise TrainConfigError(f"{where or 'config'}: {e}") from None


def _convert(hint, value, path: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        return _convert(hint, value, path)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            value = [value]
        return tuple(_convert(typing.get_args(hint)[0], item, path) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TrainConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _choice(name: str, value, options) -> None:
    if value not in options:
        shown = ", ".join("null" if o is None else str(o) for o in options)
        raise TrainConfigError(f"{name}: expected one of {shown}, got {value!r}")


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainConfigError(f"{name}: expected an integer >= {low}, got {value!r}")


def _number(name: str, value, low, high, *, low_open: bool = False, high_open: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
        bad = value < low or (low_open and value == low)
        if high is not None:
            bad = bad or value > high or (high_open and value == high)
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise TrainConfigError(f"{name}: expected a number in {interval}, got {value!r}")
