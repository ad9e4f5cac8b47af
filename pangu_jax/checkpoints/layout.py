"""Where each released tensor goes in our parameter tree, and how it turns.

The MindSpore names (PANGU.md, "The network") are the lingua franca: other
formats map their names to these. Each entry knows the transform from the
stored layout to ours and back, so readers and writers share one table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from ..config import PanguConfig

Transform = Callable[[np.ndarray, PanguConfig], np.ndarray]
TreePath = tuple[str, ...]  # keys from the root of the parameter tree to a leaf


@dataclasses.dataclass(frozen=True)
class Slot:
    """One stored tensor: its path in our tree and the layer it belongs to.

    `layer` is the index on the stacked `blocks` axis, or None for tensors
    outside the stack (embeddings, final LayerNorm, top query layer).
    """

    name: str
    path: tuple[str, ...]
    layer: int | None
    stored_shape: tuple[int, ...]
    to_ours: Transform
    from_ours: Transform


def _same(x, c):
    return x


def _heads(x, c):  # [H] -> [N, D]
    return x.reshape(c.num_heads, c.head_dim)


def _merge_heads(x, c):
    return x.reshape(c.hidden_size)


def _qkv_in(x, c):  # stored [out, in] with out = N*D -> [N, D, in]
    return x.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _qkv_out(x, c):
    return x.reshape(c.hidden_size, c.hidden_size)


def _proj_in(x, c):  # stored [in, out] with in = N*D -> [out, N, D]
    return x.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _proj_out(x, c):
    return x.reshape(c.hidden_size, c.hidden_size).T


# numpy copies a transposed 16-bit matrix element by element; square tiles
# that stay in cache copy it about twice as fast (benchmarks/README.md).
_TILE = 256


def _transpose(x, c):  # the FFN's: stored [in, out] -> ours [out, in], and back
    out = np.empty(x.shape[::-1], x.dtype)
    for i in range(0, x.shape[0], _TILE):
        for j in range(0, x.shape[1], _TILE):
            out[j:j + _TILE, i:i + _TILE] = x[i:i + _TILE, j:j + _TILE].T
    return out


def _block_entries(c: PanguConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], Transform, Transform]]:
    h, f = c.hidden_size, c.ffn_size
    entries = []
    for ln in ("layernorm1", "layernorm2"):
        ours = "ln1" if ln == "layernorm1" else "ln2"
        entries += [(f"{ln}.gamma", (ours, "scale"), (h,), _same, _same),
                    (f"{ln}.beta", (ours, "bias"), (h,), _same, _same)]
    entries += [
        ("attention.projection.weight", ("attention", "output_kernel"), (h, h), _proj_in, _proj_out),
        ("attention.projection.bias", ("attention", "output_bias"), (h,), _same, _same),
    ]
    for dense, role in (("dense1", "query"), ("dense2", "key"), ("dense3", "value")):
        entries += [(f"attention.{dense}.weight", ("attention", f"{role}_kernel"), (h, h), _qkv_in, _qkv_out),
                    (f"attention.{dense}.bias", ("attention", f"{role}_bias"), (h,), _heads, _merge_heads)]
    entries += [
        ("output.mapping.weight", ("mlp", "up_kernel"), (h, f), _transpose, _transpose),
        ("output.mapping.bias", ("mlp", "up_bias"), (f,), _same, _same),
        ("output.projection.weight", ("mlp", "down_kernel"), (f, h), _transpose, _transpose),
        ("output.projection.bias", ("mlp", "down_bias"), (h,), _same, _same),
    ]
    return entries


def mindspore_slots(config: PanguConfig) -> dict[str, Slot]:
    """Every tensor a MindSpore PanGu-alpha checkpoint of `config` holds, in the order MindSpore writes them."""
    c = config
    h = c.hidden_size
    slots = [
        Slot("backbone.word_embedding.embedding_table", ("word_embedding",), None, (c.vocab_size, h), _same, _same),
        Slot("backbone.position_embedding.embedding_table", ("position_embedding",), None, (c.max_positions, h), _same, _same),
    ]
    for i in range(c.num_blocks):
        slots += [Slot(f"backbone.blocks.{i}.{n}", ("blocks", *p), i, s, a, b) for n, p, s, a, b in _block_entries(c)]
    slots += [
        Slot("backbone.layernorm.gamma", ("final_ln", "scale"), None, (h,), _same, _same),
        Slot("backbone.layernorm.beta", ("final_ln", "bias"), None, (h,), _same, _same),
        Slot("backbone.top_query_embedding.embedding_table", ("top_query_embedding",), None, (c.max_positions, h), _same, _same),
    ]
    slots += [Slot(f"backbone.top_query_layer.{n}", ("top_query_layer", *p), None, s, a, b) for n, p, s, a, b in _block_entries(c)]
    return {s.name: s for s in slots}


def is_layernorm(path: tuple[str, ...]) -> bool:
    """LayerNorm parameters stay float32 in every dtype (as in the original fp16 net)."""
    return len(path) >= 2 and path[-2] in ("ln1", "ln2", "final_ln")


# Training checkpoints carry optimiser and loop state beside the weights.
_TRAINING_STATE = re.compile(
    r"^(adam_[mv]\.|moments\.|moment[12]\.|accu_grads\.|global_step$|learning_rate$|scale_sense$|"
    r"current_iterator_step$|last_overflow_iterator_step$|epoch_num$|step_num$|loss_scale$)"
)


def is_training_state(name: str) -> bool:
    return bool(_TRAINING_STATE.match(name))


_BLOCK_NAME = re.compile(r"^backbone\.blocks\.(\d+)\.")


def count_blocks(names) -> int:
    """Ordinary blocks named in a checkpoint: one more than the highest index."""
    indices = [int(m.group(1)) for n in names if (m := _BLOCK_NAME.match(n))]
    return max(indices) + 1 if indices else 0
