"""Placing the model on a device mesh: one table maps logical axes to mesh axes.

Every parameter carries logical axis names (`model.param_logical_axes`); the
cache and the token batch use "batch", "length", "heads" and "kv". `RULES`
says which mesh axis splits each: the batch over `data`, and tensor
parallelism in the Megatron manner over `tensor` (query/key/value and FFN up
split by output columns, the attention output and FFN down by input rows),
the embedding and tied head replicated: split over the vocabulary, their
gather and logits cost extra collectives every token, which decoding feels
(benchmarks/README.md). `RULES_SPLIT_VOCAB`
splits them (a quarter of their memory per device at tensor=4, and the head's
matmul shared: the choice for long prefills and training). Anything unnamed
is replicated. XLA's sharding propagation derives the activations' layout and
inserts the all-reduces, so the same model code runs on one CPU, one GPU and
a mesh of many.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .cache import Cache
from .config import PanguConfig
from .layouts import Params, is_per_layer
from .model import param_logical_axes

Rules = Sequence[tuple[str, str | None]]

MESH_AXES = ("data", "fsdp", "tensor")

RULES: Rules = (
    ("batch", "data"),
    ("vocab", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("kv", None),
    ("layers", None),
    ("length", None),
)

# The embedding and head split over the vocabulary instead of replicated.
RULES_SPLIT_VOCAB: Rules = tuple((a, "tensor") if a == "vocab" else (a, m) for a, m in RULES)

# Training (fully sharded data parallel on `fsdp`, as MaxText does): the batch
# over `data` and `fsdp`, every parameter's embedding dimension over `fsdp`
# (each layer's weights gathered when it runs), heads, the FFN and the
# vocabulary over `tensor`; the optimizer state follows the parameters.
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("lora", None),
    ("act_embed", None),
)


def parse_mesh_shape(text: str) -> dict[str, int]:
    """"data=2,tensor=4" -> {"data": 2, "tensor": 4}."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\w+)=(\d+)", part)
        if not match:
            raise ValueError(f"mesh {text!r}: expected axis=size pairs like 'data=2,tensor=4', got {part!r}")
        axis, size = match.group(1), int(match.group(2))
        if axis not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {axis!r}; the axes are {', '.join(MESH_AXES)}")
        if axis in shape or size < 1:
            raise ValueError(f"mesh {text!r}: axis {axis!r} given twice or with size < 1")
        shape[axis] = size
    return shape


def make_mesh(shape: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; axes left out have size 1.

    `shape` is "data=2,tensor=4", a dict, or None for tensor parallel over
    every device (decoding's choice; training's is fsdp). The mesh takes the
    first data x fsdp x tensor devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = {"tensor": len(devices)}
    elif isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; the axes are {', '.join(MESH_AXES)}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    needed = math.prod(sizes)
    if needed > len(devices):
        hint = (f" (to try a mesh on a CPU, start Python with XLA_FLAGS=--xla_force_host_platform_device_count={needed})"
                if devices[0].platform == "cpu" else "")
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {needed} devices, but only {len(devices)} are visible{hint}"
        )
    return Mesh(np.array(devices[:needed]).reshape(sizes), MESH_AXES)


def _mesh_axis(rules: Rules, logical: str) -> str | None:
    return dict(rules).get(logical)


def check_mesh(config: PanguConfig, mesh: Mesh, rules: Rules = RULES) -> None:
    """Raise a clear error when a split dimension does not divide by its mesh axis, or the axes are not Auto.

    Arrays are placed by the rules table and XLA propagates the rest, which
    needs Auto axes (`jax.make_mesh` makes Explicit ones by default).
    """
    typed = [f"{name} ({kind.name})" for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
             if kind != AxisType.Auto]
    if typed:
        raise ValueError(
            f"mesh axes {', '.join(typed)} are not Auto; pangu_jax places arrays by its rules table on Auto axes: "
            "build the mesh with pangu_jax.sharding.make_mesh, or pass "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names)"
        )
    named = {axis for _, m in rules for axis in ((m,) if isinstance(m, str) else m or ())}
    unknown = sorted(named - set(mesh.axis_names))
    if unknown:
        raise ValueError(f"rules name mesh axes {unknown}, but the mesh has {list(mesh.axis_names)}; pass rules for it")
    sizes = {"heads": config.num_heads, "mlp": config.ffn_size, "vocab": config.vocab_size,
             "embed": config.hidden_size}
    for logical, size in sizes.items():
        axis = _mesh_axis(rules, logical)
        if axis is not None and size % mesh.shape[axis]:
            raise ValueError(
                f"cannot split {logical} ({size}) over mesh axis {axis!r} of size {mesh.shape[axis]}: "
                f"{size} is not a multiple of {mesh.shape[axis]}"
                + (" (replicate the vocabulary: the default RULES)" if logical == "vocab" else "")
            )


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Rules = RULES) -> NamedSharding:
    """The NamedSharding of an array whose dimensions have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def param_shardings(config: PanguConfig, mesh: Mesh, *, rules: Rules = RULES) -> Params:
    """A NamedSharding for every (stacked) parameter."""
    check_mesh(config, mesh, rules)
    return jax.tree.map(lambda spec: logical_sharding(mesh, tuple(spec), rules), param_logical_axes(config),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_like(config: PanguConfig, mesh: Mesh, params: Params, rules: Rules = RULES) -> Params:
    """A NamedSharding for every leaf of `params` (arrays or shapes, stacked or per layer) by the rules."""
    shardings = param_shardings(config, mesh, rules=rules)
    if is_per_layer(params):  # each layer split as its stacked leaf is, less the layers axis
        layer = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:])), shardings["blocks"])
        shardings = {**shardings, "blocks": {name: layer for name in params["blocks"]}}
    return shardings


def shard_params(config: PanguConfig, params: Params, mesh: Mesh, rules: Rules = RULES) -> Params:
    """Place `params` (stacked or per layer) on `mesh` by the rules."""
    return jax.device_put(params, shardings_like(config, mesh, params, rules))


def cache_shardings(mesh: Mesh, cache: Cache, rules: Rules = RULES) -> Cache:
    """Shardings for a cache (stacked or per layer): batch over data, heads over tensor."""
    kv = ("batch", "length", "heads", "kv")

    def place(axes):
        return logical_sharding(mesh, axes, rules)

    if isinstance(cache["blocks"], tuple):
        blocks = tuple({n: place(kv) for n in layer} for layer in cache["blocks"])
    else:
        blocks = {n: place(("layers", *kv)) for n in cache["blocks"]}
    return {
        "blocks": blocks,
        "top": {n: place(kv) for n in cache["top"]},
        "positions": place(("batch", "length")),
        "index": NamedSharding(mesh, PartitionSpec()),
    }
