"""An independent float64 NumPy PanGu-alpha forward pass, from PANGU.md alone.

It reads MindSpore-named tensors in their stored layouts, so comparing it
with the Flax model checks the model and the name mapping together.
"""

from __future__ import annotations

import math

import numpy as np


def _layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _gelu(x, activation):
    if activation == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _block(w, pfx, x, query_source, heads, eps, activation):
    g = lambda n: w[pfx + n].astype(np.float64)  # noqa: E731
    t, hidden = x.shape
    d = hidden // heads
    a = _layer_norm(x, g("layernorm1.gamma"), g("layernorm1.beta"), eps)
    q_in = a if query_source is None else query_source
    q = q_in @ g("attention.dense1.weight").T + g("attention.dense1.bias")  # stored [out, in]
    k = a @ g("attention.dense2.weight").T + g("attention.dense2.bias")
    v = a @ g("attention.dense3.weight").T + g("attention.dense3.bias")
    q, k, v = (m.reshape(t, heads, d).transpose(1, 0, 2) for m in (q, k, v))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    scores = scores + np.triu(np.full((t, t), -10000.0), k=1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    o = (probs @ v).transpose(1, 0, 2).reshape(t, hidden)
    x = x + o @ g("attention.projection.weight") + g("attention.projection.bias")  # stored [in, out]
    m = _layer_norm(x, g("layernorm2.gamma"), g("layernorm2.beta"), eps)
    m = _gelu(m @ g("output.mapping.weight") + g("output.mapping.bias"), activation)
    return x + m @ g("output.projection.weight") + g("output.projection.bias")


def reference_forward(weights, tokens, *, heads, num_blocks, eps=1e-5, activation="gelu_tanh"):
    """Logits [len, vocab] (float64) for one sequence of token ids at positions 0..len-1."""
    w = weights
    f64 = lambda n: w[n].astype(np.float64)  # noqa: E731
    tokens = np.asarray(tokens)
    pos = np.arange(len(tokens))
    word = f64("backbone.word_embedding.embedding_table")
    x = word[tokens] + f64("backbone.position_embedding.embedding_table")[pos]
    for i in range(num_blocks):
        x = _block(w, f"backbone.blocks.{i}.", x, None, heads, eps, activation)
    h = _layer_norm(x, f64("backbone.layernorm.gamma"), f64("backbone.layernorm.beta"), eps)
    top_query = f64("backbone.top_query_embedding.embedding_table")[pos]
    out = _block(w, "backbone.top_query_layer.", h, top_query, heads, eps, activation)
    return out @ word.T
