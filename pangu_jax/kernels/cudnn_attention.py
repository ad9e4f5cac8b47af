"""Attention as one cuDNN kernel (`PanguConfig.attention` or `decode_attention` "cudnn"; GPU, 16 bits).

cuDNN's fused attention never writes the [heads, length, slots] scores to
memory (a prompt's float32 scores cost more than its matmuls; a decode
step's, a chain of small kernels); it scales the scores itself, and can be
told how many cache slots are written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cudnn_attention(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array | None, *, scale: float,
                    filled: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """softmax(scale * q.k + mask) . v: q [B, T, N, H], keys and values [B, S, N, H] -> [B, T, N, H].

    `visible` [B, 1, T, S] says which slots each query sees; it becomes a
    finite bias, so a row that sees nothing (padding) stays finite. None:
    no bias, every slot visible but for `causal` (with a bias, cuDNN always
    computes its gradient too: a [B, N, T, S] write in every backward pass).
    `filled` [B]: how many leading slots are written, when the rest are
    known to be empty (a decode step's cache). `causal`: `visible` hides
    every slot after its query's index (T = S), so the kernel may skip those
    blocks.
    """
    bias = None if visible is None else jnp.where(visible, 0, jnp.finfo(q.dtype).min / 2).astype(q.dtype)
    return jax.nn.dot_product_attention(q, keys, values, bias=bias, scale=scale, key_value_seq_lengths=filled,
                                        is_causal=causal, implementation="cudnn")


def saves_cudnn_attention(primitive: jax.extend.core.Primitive, *_, **__) -> bool:
    """A remat policy: keep what cuDNN's attention forward returns (its output and softmax statistics, all
    its backward needs) instead of running the kernel again in the backward pass."""
    return primitive.name.startswith("dot_product_attention_fwd")
