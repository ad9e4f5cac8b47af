"""Weight-only int8: every block matrix and the embedding/head as int8 with per-output-channel scales.

Each output channel c of a matrix W gets scale[c] = max |W[..., c]| / 127 and
values round(W / scale) in [-127, 127]; the model multiplies its matmul
outputs by the scale, which is exact for a per-output-channel scale. Biases,
position embeddings and LayerNorm stay as they are. A channel of zeros gets
scale 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import PanguConfig
from .layouts import Params, is_per_layer

# Each quantized matrix -> the dims of its output channels (in the per-layer shape).
BLOCK_MATRICES: dict[tuple[str, str], tuple[int, ...]] = {
    ("attention", "query_kernel"): (0, 1),
    ("attention", "key_kernel"): (0, 1),
    ("attention", "value_kernel"): (0, 1),
    ("attention", "output_kernel"): (0,),
    ("mlp", "up_kernel"): (0,),
    ("mlp", "down_kernel"): (0,),
}


def _quantize(xp, w, channels: tuple[int, ...]):
    w32 = xp.asarray(w, xp.float32)
    reduce = tuple(d for d in range(w32.ndim) if d not in channels)
    peak = xp.max(xp.abs(w32), axis=reduce, keepdims=True)
    scale = xp.where(peak > 0, peak / 127.0, 1.0).astype(xp.float32)
    values = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
    return values, xp.squeeze(scale, axis=reduce)


_quantize_on_device = jax.jit(functools.partial(_quantize, jnp), static_argnums=1)


def quantize_matrix(w, channels: tuple[int, ...], *, stacked: bool = False):
    """(int8 values, float32 scale over the output `channels`) of one matrix.

    `stacked`: dim 0 counts layers (its channels then start at 1). A numpy
    array is quantized on the host, a stacked one a layer at a time so the
    float32 working copy stays one layer big; a device array under jit.
    """
    layer_dims = (0,) if stacked else ()
    if not isinstance(w, np.ndarray):
        return _quantize_on_device(w, layer_dims + channels)
    if not stacked:
        return _quantize(np, w, channels)
    layers = [_quantize(np, layer, tuple(d - 1 for d in channels)) for layer in w]
    return np.stack([v for v, _ in layers]), np.stack([s for _, s in layers])


def _quantize_block(block: dict, stacked: bool) -> dict:
    block = {group: dict(leaves) for group, leaves in block.items()}
    for (group, name), channels in BLOCK_MATRICES.items():
        shifted = tuple(d + stacked for d in channels)
        block[group][name], block[group][f"{name}_scale"] = quantize_matrix(
            block[group][name], shifted, stacked=stacked)
    return block


def quantize_params(config: PanguConfig, params: Params) -> tuple[PanguConfig, Params]:
    """The int8 config and parameters of a float model (stacked or per layer, numpy or device arrays).

    Device arrays are quantized leaf by leaf under jit; numpy arrays on the
    host, so a model too big for the device can be quantized before it is
    placed there.
    """
    if config.weights == "int8":
        raise ValueError("quantize_params: the model is already int8")
    out = dict(params)
    word, word_scale = quantize_matrix(params["word_embedding"], (0,))
    out["word_embedding"], out["word_embedding_scale"] = word, word_scale
    if is_per_layer(params):
        out["blocks"] = {i: _quantize_block(layer, False) for i, layer in params["blocks"].items()}
    else:
        out["blocks"] = _quantize_block(params["blocks"], True)
    out["top_query_layer"] = _quantize_block(params["top_query_layer"], False)
    return config.replace(weights="int8"), out

