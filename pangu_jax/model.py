"""The PanGu-alpha network (PANGU.md, "The network") in Flax linen.

Parameters are a plain nested dict:

    word_embedding       [vocab, embed]      also the tied output head
    position_embedding   [positions, embed]
    top_query_embedding  [positions, embed]  query of the top query layer
    blocks/...           ordinary blocks, stacked on a leading `layers` axis
    final_ln/{scale,bias}
    top_query_layer/...  the last layer, laid out like one block

and each block holds ln1 and ln2 ({scale, bias}); attention with
{query,key,value}_kernel [embed, heads, head_dim], {query,key,value}_bias
[heads, head_dim], output_kernel [heads, head_dim, embed], output_bias
[embed]; mlp with up_kernel [embed, mlp], up_bias [mlp], down_kernel
[mlp, embed], down_bias [embed].

The key/value cache is an explicit pytree (`init_cache`) passed in and
returned. It records the position held by every slot (-1: empty or padding);
a key is visible to a query when its position is valid and not after the
query's position, which gives the causal mask, left padding and decoding one
rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .config import PanguConfig

Params = dict[str, Any]
Cache = dict[str, Any]

# What the original adds to masked scores is -10000; any large negative value
# gives the same float32 softmax, and this one also keeps fully masked
# (padding) rows finite.
_MASKED = -1e9


def _param(module: nn.Module, name: str, init, shape, dtype, axes: tuple[str, ...]):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _matmul_precision(config: PanguConfig):
    # float32 means float32: keep GPUs from silently using TF32.
    return lax.Precision.HIGHEST if config.dtype == "float32" else lax.Precision.DEFAULT


class LayerNorm(nn.Module):
    """LayerNorm in float32 with biased variance, whatever the compute dtype."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (features,), jnp.float32, ("embed",))
        bias = _param(self, "bias", nn.initializers.zeros, (features,), jnp.float32, ("embed",))
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


def _visible(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[batch, 1, query, key] mask: key holds a real token not after the query."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    return (k >= 0) & (k <= q)


class Attention(nn.Module):
    """Multi-head attention whose query may come from a different input."""

    config: PanguConfig

    def _project(self, name: str, x: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        kernel = _param(
            self, f"{name}_kernel", init, (c.hidden_size, c.num_heads, c.head_dim),
            c.jnp_param_dtype, ("embed", "heads", "kv"),
        )
        bias = _param(
            self, f"{name}_bias", nn.initializers.zeros, (c.num_heads, c.head_dim),
            c.jnp_param_dtype, ("heads", "kv"),
        )
        y = jnp.einsum(
            "bte,enk->btnk", x.astype(c.jnp_dtype), kernel.astype(c.jnp_dtype),
            precision=_matmul_precision(c),
        )
        return y + bias.astype(c.jnp_dtype)

    @nn.compact
    def __call__(
        self,
        query_input: jax.Array,
        kv_input: jax.Array,
        positions: jax.Array,
        layer_cache: Cache | None,
        cache_positions: jax.Array | None,
    ) -> tuple[jax.Array, Cache]:
        c = self.config
        precision = _matmul_precision(c)
        q = self._project("query", query_input) * jnp.asarray(1 / math.sqrt(c.head_dim), c.jnp_dtype)
        k = self._project("key", kv_input)
        v = self._project("value", kv_input)

        # Scores against the cached keys and the new keys are computed apart and
        # joined after the matmuls, so the cache is read once and only the new
        # entries are written (by the caller).
        def scores(keys, key_positions):
            s = jnp.einsum("btnk,bsnk->bnts", q, keys.astype(c.jnp_dtype),
                           precision=precision, preferred_element_type=jnp.float32)
            return jnp.where(_visible(positions, key_positions), s, _MASKED)

        def mix(probs, vals):
            return jnp.einsum("bnts,bsnk->btnk", probs.astype(c.jnp_dtype), vals.astype(c.jnp_dtype),
                              precision=precision)

        if layer_cache is None:
            out = mix(jax.nn.softmax(scores(k, positions), axis=-1), v)
        else:
            cached = scores(layer_cache["key"], cache_positions)
            probs = jax.nn.softmax(jnp.concatenate([cached, scores(k, positions)], axis=-1), axis=-1)
            split = cached.shape[-1]
            out = mix(probs[..., :split], layer_cache["value"]) + mix(probs[..., split:], v)

        kernel = _param(
            self, "output_kernel", nn.initializers.normal(0.02),
            (c.num_heads, c.head_dim, c.hidden_size), c.jnp_param_dtype, ("heads", "kv", "embed"),
        )
        bias = _param(self, "output_bias", nn.initializers.zeros, (c.hidden_size,),
                      c.jnp_param_dtype, ("embed",))
        y = jnp.einsum("btnk,nke->bte", out, kernel.astype(c.jnp_dtype), precision=precision)
        return y + bias.astype(c.jnp_dtype), {"key": k, "value": v}


class Mlp(nn.Module):
    config: PanguConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        precision = _matmul_precision(c)
        init = nn.initializers.normal(0.02)
        up_k = _param(self, "up_kernel", init, (c.hidden_size, c.ffn_size), c.jnp_param_dtype, ("embed", "mlp"))
        up_b = _param(self, "up_bias", nn.initializers.zeros, (c.ffn_size,), c.jnp_param_dtype, ("mlp",))
        down_k = _param(self, "down_kernel", init, (c.ffn_size, c.hidden_size), c.jnp_param_dtype, ("mlp", "embed"))
        down_b = _param(self, "down_bias", nn.initializers.zeros, (c.hidden_size,), c.jnp_param_dtype, ("embed",))
        h = jnp.einsum("bte,ef->btf", x.astype(c.jnp_dtype), up_k.astype(c.jnp_dtype), precision=precision)
        h = h.astype(jnp.float32) + up_b.astype(jnp.float32)
        h = jax.nn.gelu(h, approximate=c.activation == "gelu_tanh").astype(c.jnp_dtype)
        y = jnp.einsum("btf,fe->bte", h, down_k.astype(c.jnp_dtype), precision=precision)
        return y + down_b.astype(c.jnp_dtype)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the residual stream stays float32.

    `query_input` replaces LN1(x) as the query source: the top query layer
    passes the raw top-query position embedding there.
    """

    config: PanguConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_cache: Cache | None,
        positions: jax.Array,
        cache_positions: jax.Array | None,
        query_input: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        c = self.config
        a = LayerNorm(c.layer_norm_epsilon, name="ln1")(x)
        query_input = a if query_input is None else query_input
        attn, new_kv = Attention(c, name="attention")(query_input, a, positions, layer_cache, cache_positions)
        x = x + attn.astype(jnp.float32)
        x = x + Mlp(c, name="mlp")(LayerNorm(c.layer_norm_epsilon, name="ln2")(x)).astype(jnp.float32)
        self.sow("intermediates", "hidden", x)
        return x, new_kv


class PanguAlpha(nn.Module):
    config: PanguConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, last_only: bool = False
    ) -> tuple[jax.Array, Cache | None]:
        c = self.config
        emb_init = nn.initializers.normal(0.02)
        word = _param(self, "word_embedding", emb_init, (c.vocab_size, c.hidden_size), c.jnp_param_dtype, ("vocab", "embed"))
        pos_table = _param(self, "position_embedding", emb_init, (c.max_positions, c.hidden_size), c.jnp_param_dtype, (None, "embed"))
        top_table = _param(self, "top_query_embedding", emb_init, (c.max_positions, c.hidden_size), c.jnp_param_dtype, (None, "embed"))

        x = (jnp.take(word, tokens, axis=0, mode="clip").astype(jnp.float32)
             + jnp.take(pos_table, positions, axis=0, mode="clip").astype(jnp.float32))
        self.sow("intermediates", "embeddings", x)

        cache_positions = None if cache is None else cache["positions"]
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_blocks,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="blocks")
        x, block_kv = blocks(x, None if cache is None else cache["blocks"], positions, cache_positions)

        h = LayerNorm(c.layer_norm_epsilon, name="final_ln")(x)
        self.sow("intermediates", "top_input", h)
        top_query = jnp.take(top_table, positions, axis=0, mode="clip")
        out, top_kv = Block(c, name="top_query_layer")(
            h, None if cache is None else cache["top"], positions, cache_positions, query_input=top_query
        )
        if last_only:
            out = out[:, -1:]
        logits = jnp.einsum(
            "bte,ve->btv", out.astype(c.jnp_dtype), word.astype(c.jnp_dtype),
            precision=_matmul_precision(c), preferred_element_type=jnp.float32,
        )
        if cache is None:
            return logits, None
        return logits, _write_cache(cache, block_kv, top_kv, positions)


def _write_cache(cache: Cache, block_kv: Cache, top_kv: Cache, positions: jax.Array) -> Cache:
    index = cache["index"]

    def put(old, new, axis):
        return lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), index, axis)

    return {
        "blocks": {name: put(cache["blocks"][name], block_kv[name], 2) for name in ("key", "value")},
        "top": {name: put(cache["top"][name], top_kv[name], 1) for name in ("key", "value")},
        "positions": put(cache["positions"], positions, 1),
        "index": index + positions.shape[1],
    }


def init_cache(config: PanguConfig, batch_size: int, length: int | None = None, dtype=None) -> Cache:
    """An empty cache of `length` slots (default: every position) per row."""
    length = config.max_positions if length is None else length
    if batch_size <= 0 or length <= 0:
        raise ValueError(f"init_cache needs a positive batch_size and length, got {batch_size} and {length}")
    dtype = config.jnp_dtype if dtype is None else dtype
    kv_shape = (batch_size, length, config.num_heads, config.head_dim)
    return {
        "blocks": {n: jnp.zeros((config.num_blocks, *kv_shape), dtype) for n in ("key", "value")},
        "top": {n: jnp.zeros(kv_shape, dtype) for n in ("key", "value")},
        "positions": jnp.full((batch_size, length), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def next_positions(cache: Cache, length: int) -> jax.Array:
    """Positions that continue each cached row: one past its last real token."""
    start = cache["positions"].max(axis=1) + 1
    return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


@functools.partial(jax.jit, static_argnums=0, static_argnames="last_only")
def forward(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Logits (float32, [batch, length, vocab]) and the updated cache.

    `tokens` is [batch, length] int. `positions` defaults to 0..length-1, or,
    with a cache, to the positions that follow each cached row. A position of
    -1 marks padding: such a token is never attended to. Without a cache the
    returned cache is None. `last_only` returns the last column's logits
    alone ([batch, 1, vocab]), as a prefill needs. Compiled with jit,
    `config` static.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"forward: tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] == 0:
        raise ValueError("forward: tokens has length 0; give at least one token")
    if positions is None:
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        else:
            positions = next_positions(cache, tokens.shape[1])
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != tokens.shape:
        raise ValueError(f"forward: positions shape {positions.shape} differs from tokens shape {tokens.shape}")
    return PanguAlpha(config).apply({"params": params}, tokens.astype(jnp.int32), positions, cache, last_only)


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(
    config: PanguConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The residual stream (float32) at every stage, for studying the model.

    `embeddings` [batch, length, hidden]: word plus position embedding;
    `blocks` [blocks, batch, length, hidden]: each ordinary block's output;
    `top_input`: the final LayerNorm's output, which the top query layer reads;
    `output`: the top query layer's output (logits = output @ word_embedding.T).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, state = PanguAlpha(config).apply(
        {"params": params}, tokens, jnp.asarray(positions, jnp.int32), mutable=["intermediates"]
    )
    found = state["intermediates"]
    return {
        "embeddings": found["embeddings"][0],
        "blocks": found["blocks"]["hidden"][0],
        "top_input": found["top_input"][0],
        "output": found["top_query_layer"]["hidden"][0],
    }


def _boxed_init(config: PanguConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return PanguAlpha(config).init(rng, tokens, tokens)["params"]


def init_params(config: PanguConfig, rng: jax.Array | int = 0) -> Params:
    """Random parameters (normal 0.02 matrices, LayerNorm ones/zeros)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return nn.unbox(_boxed_init(config, rng))


def abstract_params(config: PanguConfig) -> Params:
    """Shapes and dtypes of the parameters, allocating nothing."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))


def param_logical_axes(config: PanguConfig) -> Params:
    """The logical axis names of every parameter, as PartitionSpecs."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))
