"""The network's modules (PANGU.md, "The network"): LayerNorm, attention, the FFN and the pre-LayerNorm block.

Shapes in comments: B batch, T new tokens, S key slots (T, or the cache's
length), N heads, H head_dim, E embed, F the FFN's width.

Parameters carry logical axis names (`sharding.RULES` maps them onto a
mesh). Every matrix is stored output first ([out, in]; `products`). The
residual stream and LayerNorm stay in the accumulation dtype (float32, or
float64 for a float64 model) whatever the compute dtype, as in the original
fp16 network. Attention runs as the config says (`PanguConfig.resolved`):
a prompt's as einsums and a softmax ("explicit") or one cuDNN kernel; a
decode step's (one new token against the cache) also as our Pallas kernel,
which writes the new key and value into the cache itself.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .config import PanguConfig
from .kernels.cudnn_attention import cudnn_attention
from .kernels.decode_attention import decode_attention
from .products import Matrix, dot, einsum

Cache = dict[str, Any]

# The original adds -10000 to masked scores; any large negative value gives
# the same softmax, and this one also keeps fully masked (padding) rows finite.
MASKED = -1e9


def param(module: nn.Module, name: str, init, shape, dtype, axes: tuple[str | None, ...]) -> jax.Array:
    """A parameter with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


COMPUTE_DTYPE_BIASES = ("query_bias", "key_bias", "value_bias")


def in_compute_dtype(config: PanguConfig, params: Any) -> Any:
    """`params` with every leaf that the network only ever uses in the compute dtype already cast to it.

    Those are the float matrices, the adapters and the query, key and value
    biases; every other leaf (embeddings, LayerNorm, the biases added in the
    accumulation dtype) stays as it is. The network computes the same
    numbers from either tree; a training step casts once, before its
    layers, instead of in every layer of the forward pass, of its
    recomputation and of the backward pass, and its gradients of the cast
    leaves come out in the compute dtype.
    """

    def cast(path, leaf):
        name = getattr(path[-1], "key", "")
        used_cast = name.endswith(("_kernel", "_lora_a", "_lora_b")) or name in COMPUTE_DTYPE_BIASES
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return leaf.astype(config.jnp_dtype) if used_cast and floating else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def matrix(module: nn.Module, name: str, shape, axes: tuple[str, ...], channels: tuple[int, ...],
           init=None) -> Matrix:
    """A weight matrix and, for int8 weights, its float32 scale over the output `channels` (dims of `shape`)."""
    c: PanguConfig = module.config
    if c.weights == "int8":
        values = param(module, name, nn.initializers.zeros, shape, jnp.int8, axes)
        scale = param(module, f"{name}_scale", nn.initializers.ones, tuple(shape[i] for i in channels),
                      jnp.float32, tuple(axes[i] for i in channels))
        return values, scale
    return param(module, name, init or nn.initializers.normal(0.02), shape, c.jnp_param_dtype, axes), None


def lora_delta(module: nn.Module, name: str, x: jax.Array, in_shape: tuple[int, ...], in_axes: tuple[str, ...],
               out_shape: tuple[int, ...], out_axes: tuple[str, ...]) -> jax.Array | None:
    """The low-rank adapter's part of the product `name` for x [..., *in_shape]: (alpha/rank) x A^T B^T
    [..., *out_shape], in the compute dtype; None when the config puts no adapter on `name`.

    A [rank, *in_shape] starts random, B [*out_shape, rank] at zero, so a
    fresh adapter changes nothing.
    """
    c: PanguConfig = module.config
    if c.lora_rank == 0 or name not in c.lora_targets:
        return None
    r, n_in = c.lora_rank, math.prod(in_shape)
    a = param(module, f"{name}_lora_a", nn.initializers.normal(1 / math.sqrt(n_in)), (r, *in_shape),
              c.jnp_param_dtype, ("lora", *in_axes))
    b = param(module, f"{name}_lora_b", nn.initializers.zeros, (*out_shape, r), c.jnp_param_dtype,
              (*out_axes, "lora"))
    lead = x.shape[:x.ndim - len(in_shape)]
    h = jnp.einsum("xi,ri->xr", x.reshape(-1, n_in).astype(c.jnp_dtype), a.reshape(r, n_in).astype(c.jnp_dtype))
    y = jnp.einsum("xr,or->xo", h, b.reshape(-1, r).astype(c.jnp_dtype))
    return (y * jnp.asarray(c.lora_alpha / r, c.jnp_dtype)).reshape(*lead, *out_shape)


def with_lora(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta.astype(y.dtype)


def activations(x: jax.Array) -> jax.Array:
    """x [B, T, E] laid out by the logical axes ("batch", "length", "act_embed") where rules are in force
    (training, under `nn.logical_axis_rules`); as it is elsewhere. Without it XLA may carry a layout of
    the embedding tables (split over their embed dimension) into the activations."""
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def apply_dropout(module: nn.Module, rate: float, x: jax.Array) -> jax.Array:
    """Dropout at `rate`, active only when the model is applied with a "dropout" rng (training)."""
    if rate == 0:
        return x
    return nn.Dropout(rate)(x, deterministic=not module.has_rng("dropout"))


def visible(query_positions: jax.Array, key_positions: jax.Array,
            query_segments: jax.Array | None = None, key_segments: jax.Array | None = None,
            row_order: bool = False) -> jax.Array:
    """[B, 1, T, S] mask: the key holds a real token (position >= 0), not after the query, of its document.

    Positions give the causal rule, left padding and decoding at once;
    segment ids, where given ([B, T] and [B, S]), keep documents packed into
    one row from seeing each other. `row_order` (a row attending to itself,
    T = S) also hides every key that comes after its query in the row, which
    positions rising along each document already do: it lets a fused kernel
    skip the blocks above the diagonal.
    """
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    mask = (k >= 0) & (k <= q)
    if query_segments is not None:
        mask &= query_segments[:, None, :, None] == key_segments[:, None, None, :]
    if row_order:
        mask &= jnp.tril(jnp.ones((q.shape[2], k.shape[3]), bool))
    return mask


class LayerNorm(nn.Module):
    """LayerNorm with biased variance, in the accumulation dtype whatever the compute dtype."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (features,), self.dtype, ("embed",))
        bias = param(self, "bias", nn.initializers.zeros, (features,), self.dtype, ("embed",))
        x = x.astype(self.dtype)
        # Both moments in one pass, as flax's LayerNorm does: one reduction kernel, not two in a row.
        mean = x.mean(-1, keepdims=True)
        var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0)
        return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


class Attention(nn.Module):
    """Multi-head attention whose query may come from a different input (the top query layer's).

    `dropout` applies to the attention probabilities (explicit attention only).
    `causal_rows` (see `PanguAlpha`): without a cache, a key is hidden by
    the row order alone. Explicit attention sows its probabilities
    [B, N, T, S], before dropout, as "weights" in the "attention"
    collection: stored only where the caller makes that collection mutable
    (`pangu_jax.inspect`), else nothing is kept.
    """

    config: PanguConfig
    dropout: float = 0.0
    causal_rows: bool = False

    def _project(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, E] times the projection `name`: [B, T, N, H], and its bias [N, H] (not yet added)."""
        c = self.config
        kernel = matrix(self, f"{name}_kernel", (c.num_heads, c.head_dim, c.hidden_size),
                        ("heads", "kv", "embed"), (0, 1))
        bias = param(self, f"{name}_bias", nn.initializers.zeros, (c.num_heads, c.head_dim),
                     c.jnp_param_dtype, ("heads", "kv"))
        delta = lora_delta(self, name, x, (c.hidden_size,), ("embed",), (c.num_heads, c.head_dim), ("heads", "kv"))
        return with_lora(dot(c, "bte,nke->btnk", x, kernel), delta), bias.astype(c.jnp_dtype)

    @nn.compact
    def __call__(
        self,
        query_input: jax.Array,
        kv_input: jax.Array,
        positions: jax.Array,
        layer_cache: Cache | None,
        cache_positions: jax.Array | None,
        cache_index: jax.Array | None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        """The attention output [B, T, E] (accumulation dtype), and the new keys and values.

        Without a cache, the new keys and values alone ([B, T, N, H] each),
        for the caller to cache. With one, they are written into it at
        `cache_index` first and one attention runs over the whole cache
        (`cache_positions` [B, S] already holds the new tokens' positions):
        fewer, larger kernels than attending to the cache and the new
        tokens apart. `segment_ids` [B, T] (no cache) keep packed documents
        apart.
        """
        c = self.config
        score_scale = 1 / math.sqrt(c.head_dim)
        (q, q_bias), (k, k_bias), (v, v_bias) = (self._project(n, query_input if n == "query" else kv_input)
                                                 for n in ("query", "key", "value"))  # [B, T, N, H], [N, H]
        decoding = layer_cache is not None and query_input.shape[1] == 1
        if decoding and c.decode_attention in ("pallas", "pallas_interpret"):
            # One kernel adds the biases, writes the new key and value into
            # the cache and attends to the written slots. At batch 1 XLA
            # computes the three projections as one reduction with three
            # outputs, which stacking would copy; from batch 2 as one matmul,
            # whose output three arrays would be sliced out of.
            qkv = (q[:, 0], k[:, 0], v[:, 0])  # [B, N, H] each
            out, keys, values = decode_attention(
                qkv if q.shape[0] == 1 else jnp.stack(qkv, axis=1), layer_cache["key"], layer_cache["value"],
                cache_positions, positions[:, 0], cache_index, scale=score_scale, biases=(q_bias, k_bias, v_bias),
                interpret=c.decode_attention == "pallas_interpret")
            return self._output(out[:, None]), {"key": keys, "value": values}  # out [B, N, H]
        q, k, v = q + q_bias, k + k_bias, v + v_bias
        if layer_cache is None:
            new_kv, key_positions = {"key": k, "value": v}, positions  # S = T
        else:
            new_kv = {n: lax.dynamic_update_slice_in_dim(layer_cache[n], new.astype(layer_cache[n].dtype),
                                                         cache_index, 1)
                      for n, new in (("key", k), ("value", v))}  # [B, S, N, H]
            key_positions = cache_positions
        row_order = layer_cache is None
        if row_order and self.causal_rows:
            mask = None  # only the row order hides keys: a fused kernel needs no bias
        else:
            mask = visible(positions, key_positions, segment_ids, segment_ids, row_order)  # [B, 1, T, S]
        keys, values = (new_kv[n].astype(c.jnp_dtype) for n in ("key", "value"))  # [B, S, N, H]
        if (c.decode_attention if decoding else c.attention) == "cudnn":
            filled = None
            if layer_cache is not None:
                filled = jnp.broadcast_to(cache_index + q.shape[1], q.shape[:1]).astype(jnp.int32)  # [B]
            out = cudnn_attention(q, keys, values, mask, scale=score_scale, filled=filled,
                                  causal=row_order)  # [B, T, N, H]
        else:  # the query scaled first, as the original does
            q = q * jnp.asarray(score_scale, c.jnp_dtype)
            scores = einsum(c, "btnk,bsnk->bnts", q, keys, c.accum_dtype)  # [B, N, T, S]
            if mask is None:
                mask = jnp.tril(jnp.ones(scores.shape[-2:], bool))  # [T, S]
            probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1)
            self.sow("attention", "weights", probs)
            probs = apply_dropout(self, self.dropout, probs)
            out = einsum(c, "bnts,bsnk->btnk", probs, values)  # [B, T, N, H]
        return self._output(out), new_kv

    def _output(self, out: jax.Array) -> jax.Array:
        """The output projection [B, T, E] (accumulation dtype) of the heads' outputs [B, T, N, H].

        Coming out in the accumulation dtype, its partial sums are
        all-reduced in float32 when split over a mesh, which XLA runs as its
        one-shot all-reduce kernel (it takes float32, not float16).
        """
        c = self.config
        kernel, scale = matrix(self, "output_kernel", (c.hidden_size, c.num_heads, c.head_dim),
                               ("embed", "heads", "kv"), (0,))
        bias = param(self, "output_bias", nn.initializers.zeros, (c.hidden_size,), c.jnp_param_dtype, ("embed",))
        flat = (kernel.reshape(c.hidden_size, c.hidden_size), scale)  # [E, N*H]
        y = dot(c, "bti,ei->bte", out.reshape(*out.shape[:2], c.hidden_size), flat,
                preferred_element_type=c.accum_dtype)
        delta = lora_delta(self, "output", out, (c.num_heads, c.head_dim), ("heads", "kv"), (c.hidden_size,),
                           ("embed",))
        return with_lora(y, delta) + bias.astype(c.accum_dtype)


class Mlp(nn.Module):
    """FFN up [B, T, F], gelu, FFN down [B, T, E]; the down projection comes out in the accumulation dtype."""

    config: PanguConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        up_k = matrix(self, "up_kernel", (c.ffn_size, c.hidden_size), ("mlp", "embed"), (0,))
        up_b = param(self, "up_bias", nn.initializers.zeros, (c.ffn_size,), c.jnp_param_dtype, ("mlp",))
        down_k = matrix(self, "down_kernel", (c.hidden_size, c.ffn_size), ("embed", "mlp"), (0,))
        down_b = param(self, "down_bias", nn.initializers.zeros, (c.hidden_size,), c.jnp_param_dtype, ("embed",))
        up = with_lora(dot(c, "bti,oi->bto", x, up_k), lora_delta(self, "up", x, (c.hidden_size,), ("embed",),
                                                                  (c.ffn_size,), ("mlp",)))
        h = up.astype(c.accum_dtype) + up_b.astype(c.accum_dtype)  # [B, T, F]
        h = jax.nn.gelu(h, approximate=c.activation == "gelu_tanh").astype(c.jnp_dtype)
        down = dot(c, "bti,oi->bto", h, down_k, preferred_element_type=c.accum_dtype)
        down = with_lora(down, lora_delta(self, "down", h, (c.ffn_size,), ("mlp",), (c.hidden_size,), ("embed",)))
        return down + down_b.astype(c.accum_dtype)


class Block(nn.Module):
    """Pre-LayerNorm transformer block.

    `query_input` replaces LN1(x) as the query source: the top query layer
    passes the raw top-query position embedding there. `dropout` applies to
    the attention probabilities and to each residual branch's output;
    `causal_rows` is `Attention`'s.
    """

    config: PanguConfig
    dropout: float = 0.0
    causal_rows: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_cache: Cache | None,
        positions: jax.Array,
        cache_positions: jax.Array | None,
        cache_index: jax.Array | None,
        segment_ids: jax.Array | None = None,
        query_input: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        c = self.config
        x = activations(x)
        a = LayerNorm(c.layer_norm_epsilon, c.accum_dtype, name="ln1")(x)
        query_input = a if query_input is None else query_input
        attn, new_kv = Attention(c, self.dropout, self.causal_rows, name="attention")(
            query_input, a, positions, layer_cache, cache_positions, cache_index, segment_ids
        )
        x = x + apply_dropout(self, self.dropout, attn)  # [B, T, E], both in the accumulation dtype
        mlp = Mlp(c, name="mlp")(LayerNorm(c.layer_norm_epsilon, c.accum_dtype, name="ln2")(x))
        x = x + apply_dropout(self, self.dropout, mlp)
        self.sow("intermediates", "hidden", x)
        return x, new_kv
