"""The PanGu-alpha network (PANGU.md, "The network") in Flax linen.

Parameters are a plain nested dict:

    word_embedding       [vocab, embed]      also the tied output head
    position_embedding   [positions, embed]
    top_query_embedding  [positions, embed]  query of the top query layer
    blocks/...           ordinary blocks, stacked on a leading `layers` axis
                         (or, unstacked, blocks/{"0": ..., "1": ...}: one
                         dict per layer; see `unstack_layers`)
    final_ln/{scale,bias}
    top_query_layer/...  the last layer, laid out like one block

and each block holds ln1 and ln2 ({scale, bias}); attention with
{query,key,value}_kernel [heads, head_dim, embed], {query,key,value}_bias
[heads, head_dim], output_kernel [embed, heads, head_dim], output_bias
[embed]; mlp with up_kernel [mlp, embed], up_bias [mlp], down_kernel
[embed, mlp], down_bias [embed]. Every matrix is stored output first ([out,
in]; MindSpore stores the attention's so, the FFN's input first): decoding
one sequence reads each matrix along its rows (`REDUCTION_ROWS`). Stored
[in, out], XLA transposed the attention matrices (and kept the copies, 1.2
GB for 2.6B) or reduced down the columns (measured on an H100: 3.5 -> 2.9
ms/token for 2.6B).

Stacked blocks run under `nn.scan`, so compile time does not grow with
depth; that is the layout of training and of every checkpoint store. For
decoding, `unstack_layers` splits them into per-layer arrays, run by an
unrolled loop: measured on an H100, XLA copies each layer's slice out of a
stacked weight before a small matmul (about 2.8x the weight bytes per token),
while separate arrays are read in place.

The key/value cache is an explicit pytree (`init_cache`) passed in and
returned; its blocks follow the parameters' layout. It records the position held by every slot (-1: empty or padding);
a key is visible to a query when its position is valid and not after the
query's position, which gives the causal mask, left padding and decoding one
rule.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import PanguConfig
from .decode_attention import decode_attention

Params = dict[str, Any]
Cache = dict[str, Any]

# What the original adds to masked scores is -10000; any large negative value
# gives the same float32 softmax, and this one also keeps fully masked
# (padding) rows finite.
_MASKED = -1e9


def _param(module: nn.Module, name: str, init, shape, dtype, axes: tuple[str, ...]):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


Matrix = tuple[jax.Array, jax.Array | None]


def _matrix(module: nn.Module, name: str, shape, axes: tuple[str, ...], channels: tuple[int, ...], init=None) -> Matrix:
    """A weight matrix and, for int8 weights, its float32 scale over the output `channels` (dims of `shape`)."""
    c: PanguConfig = module.config
    if c.weights == "int8":
        values = _param(module, name, nn.initializers.zeros, shape, jnp.int8, axes)
        scale = _param(module, f"{name}_scale", nn.initializers.ones, tuple(shape[i] for i in channels),
                       jnp.float32, tuple(axes[i] for i in channels))
        return values, scale
    return _param(module, name, init or nn.initializers.normal(0.02), shape, c.jnp_param_dtype, axes), None


# A product with at most this many input rows (decoding one sequence) and a
# matrix stored output first runs as `_reduction_dot`, float32 products
# summed along the matrix's rows, on a GPU: XLA computes the einsum of a
# converted int8 matrix as a gemm that streams the int8 bytes at a third to a
# half of the copy bandwidth, and picks slower kernels than the reduction for
# most float matrices too. H200, 13B int8, one row
# (`benchmarks/matvec_micro.py`): query/key/value 29 us as a row reduction
# against 41 us as the einsum; decoding 7.5 -> 4.9 ms/token. In float, with
# the FFN also stored output first: 13B float16 7.15-7.19 -> 6.62-6.63
# ms/token, 2.6B bfloat16 2.09 -> 1.96-1.98; on two H200s at tensor=2, 13B
# float16 5.97 -> 5.11 ms/token. From two rows on, each row would
# read the matrix again. On a CPU XLA's einsum is the faster by far (350M
# query/key/value: 0.6 against 41 ms), so there the reduction is not used.
REDUCTION_ROWS = 1


def _reduction_rows() -> int:
    return REDUCTION_ROWS if jax.default_backend() == "gpu" else 0


def _dot(config: PanguConfig, equation: str, x: jax.Array, matrix: Matrix, **kwargs) -> jax.Array:
    """einsum in the compute dtype; an int8 matrix's scale multiplies the output's trailing channel dims."""
    values, scale = matrix
    kept, contracted, w_kept, w_dims = _split_equation(equation)
    if w_dims == w_kept + contracted and math.prod(x.shape[:len(kept)]) <= _reduction_rows():
        y = _reduction_dot(x.astype(config.jnp_dtype), values, len(kept), len(w_kept))
        y = y if scale is None else y * scale
        return y.astype(kwargs.get("preferred_element_type", config.jnp_dtype))
    y = jnp.einsum(equation, x.astype(config.jnp_dtype), values.astype(config.jnp_dtype),
                   precision=_matmul_precision(config), **kwargs)
    return y if scale is None else (y * scale).astype(y.dtype)


def _split_equation(equation: str) -> tuple[str, str, str, str]:
    """(x's kept dims, the contracted dims, w's kept dims, w's) of "x,w->out" where x's contracted dims trail."""
    inputs, out = equation.split("->")
    x_dims, w_dims = inputs.split(",")
    contracted = "".join(d for d in x_dims if d in w_dims and d not in out)
    kept, w_kept = x_dims[:len(x_dims) - len(contracted)], "".join(d for d in w_dims if d not in contracted)
    if x_dims != kept + contracted or out != kept + w_kept or w_dims not in (contracted + w_kept, w_kept + contracted):
        raise ValueError(f"_dot: {equation!r} is not x [rows..., in...] times w [in..., out...] or [out..., in...]")
    return kept, contracted, w_kept, w_dims


def _reduction_dot(x: jax.Array, w: jax.Array, rows_ndim: int, outputs_ndim: int) -> jax.Array:
    """x [rows..., in...] times w [out..., in...] as products summed along w's rows, in float32.

    A matrix with more inputs than outputs (the FFN's down projection) has
    its rows cut into as many parts as it has inputs per output, summed
    apart and then together: rows as long as they are many read fastest
    (H200, 13B int8 [5120, 20480]: 49 -> 35 us, 5.57 -> 4.94 ms/token). The
    optimization barrier keeps XLA from merging the two sums back into one.
    The parts' sums are added elementwise, which XLA fuses into the kernels
    that read the result; as a sum they were a kernel of their own (2.6B
    bfloat16 on an H200: 1.96 -> 1.88 ms/token).
    """
    size = math.prod(w.shape[outputs_ndim:])
    outputs = w.size // size
    parts = size // outputs if size > outputs and size % outputs == 0 else 1
    y = jnp.sum(x.reshape(-1, 1, parts, size // parts).astype(jnp.float32)
                * w.reshape(outputs, parts, size // parts).astype(jnp.float32), axis=3)
    if parts > 1:
        y = lax.optimization_barrier(y)
    y = functools.reduce(operator.add, (y[..., part] for part in range(parts)))
    return y.reshape(x.shape[:rows_ndim] + w.shape[:outputs_ndim])


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
        # Both moments in one pass (as flax's LayerNorm does): XLA computes
        # them in one reduction kernel instead of two in a row.
        mean = x.mean(-1, keepdims=True)
        var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0)
        return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


def _visible(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[batch, 1, query, key] mask: key holds a real token not after the query."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    return (k >= 0) & (k <= q)


def _sixteen_bit_gpu(config: PanguConfig) -> bool:
    return config.dtype in ("bfloat16", "float16") and jax.default_backend() == "gpu"


def _fused_attention(config: PanguConfig) -> bool:
    """Whether attention runs as one cuDNN kernel: asked for, on a GPU, in 16 bits, a head_dim cuDNN takes."""
    return (config.attention in ("auto", "cudnn") and _sixteen_bit_gpu(config) and config.head_dim % 8 == 0
            and config.head_dim <= 128)


def _decode_kernel(config: PanguConfig) -> bool:
    """Whether one new token attends to the cache through `decode_attention`'s Pallas kernel."""
    return config.attention == "auto" and _sixteen_bit_gpu(config)


class Attention(nn.Module):
    """Multi-head attention whose query may come from a different input."""

    config: PanguConfig

    def _project(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x times the projection `name`, and its bias (not yet added), both in the compute dtype."""
        c = self.config
        kernel = _matrix(self, f"{name}_kernel", (c.num_heads, c.head_dim, c.hidden_size),
                         ("heads", "kv", "embed"), (0, 1))
        bias = _param(
            self, f"{name}_bias", nn.initializers.zeros, (c.num_heads, c.head_dim),
            c.jnp_param_dtype, ("heads", "kv"),
        )
        return _dot(c, "bte,nke->btnk", x, kernel), bias.astype(c.jnp_dtype)

    @nn.compact
    def __call__(
        self,
        query_input: jax.Array,
        kv_input: jax.Array,
        positions: jax.Array,
        layer_cache: Cache | None,
        cache_positions: jax.Array | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, Cache]:
        """The attention output (float32), and the new keys/values: alone, or written into `layer_cache`.

        With a cache, the new entries are written at `cache_index` first and
        one attention runs over the whole cache (`cache_positions` already
        holds the new tokens' positions): fewer, larger kernels than
        attending to the cache and the new tokens apart.
        """
        c = self.config
        precision = _matmul_precision(c)
        score_scale = 1 / math.sqrt(c.head_dim)
        (q, q_bias), (k, k_bias), (v, v_bias) = (self._project(n, query_input if n == "query" else kv_input)
                                                 for n in ("query", "key", "value"))
        if layer_cache is not None and query_input.shape[1] == 1 and _decode_kernel(c):
            # One kernel adds the biases, writes the new key and value into
            # the cache and attends to the written slots (on an H100, 2.6B at
            # batch 1: 4.3 us a layer, in place of cuDNN's 5.2 us and three
            # small kernels).
            # At batch 1 XLA computes the three projections as one reduction
            # kernel with three outputs, which stacking would have to copy
            # into one array (a kernel a layer). From batch 2 on it computes
            # them as one matmul, whose output three separate arrays would
            # have to be sliced out of (three kernels a layer), while the
            # stacked one costs one (H100, 2.6B bf16 batch 32: 495 -> 431
            # kernels a step, 8,940 -> 9,080 tokens/s).
            qkv = (q[:, 0], k[:, 0], v[:, 0])
            out, keys, values = decode_attention(
                qkv if q.shape[0] == 1 else jnp.stack(qkv, axis=1), layer_cache["key"], layer_cache["value"],
                cache_positions, positions[:, 0], cache_index, scale=score_scale, biases=(q_bias, k_bias, v_bias))
            return self._output(out[:, None]), {"key": keys, "value": values}
        q, k, v = q + q_bias, k + k_bias, v + v_bias
        if layer_cache is None:
            new_kv, key_positions = {"key": k, "value": v}, positions
        else:
            new_kv = {n: lax.dynamic_update_slice_in_dim(layer_cache[n], new.astype(layer_cache[n].dtype),
                                                         cache_index, 1)
                      for n, new in (("key", k), ("value", v))}
            key_positions = cache_positions
        visible = _visible(positions, key_positions)
        keys, values = (new_kv[n].astype(c.jnp_dtype) for n in ("key", "value"))
        if _fused_attention(c):
            # cuDNN's fused attention never writes the [heads, length, slots]
            # scores to memory (a prefill's float32 scores cost more time than
            # its matmuls; a decode step's, a chain of small kernels). It also
            # scales the scores, which saves scaling the query in a kernel of
            # its own, and is told how many slots are written. The bias is
            # finite, so padding rows stay finite too.
            bias = jnp.where(visible, 0, jnp.finfo(c.jnp_dtype).min / 2).astype(c.jnp_dtype)
            filled = None
            if layer_cache is not None:
                filled = jnp.broadcast_to(cache_index + q.shape[1], q.shape[:1]).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q, keys, values, bias=bias, scale=score_scale,
                                               key_value_seq_lengths=filled,
                                               implementation="cudnn")
        else:  # the query scaled first, as the original does
            q = q * jnp.asarray(score_scale, c.jnp_dtype)
            scores = jnp.einsum("btnk,bsnk->bnts", q, keys, precision=precision, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(jnp.where(visible, scores, _MASKED), axis=-1)
            out = jnp.einsum("bnts,bsnk->btnk", probs.astype(c.jnp_dtype), values, precision=precision)

        return self._output(out), new_kv

    def _output(self, out: jax.Array) -> jax.Array:
        """The output projection (float32) of the heads' outputs [batch, length, heads, head_dim]."""
        c = self.config
        # Output first, like the projections in: see the module docstring.
        kernel, scale = _matrix(self, "output_kernel", (c.hidden_size, c.num_heads, c.head_dim),
                                ("embed", "heads", "kv"), (0,))
        bias = _param(self, "output_bias", nn.initializers.zeros, (c.hidden_size,),
                      c.jnp_param_dtype, ("embed",))
        flat = (kernel.reshape(c.hidden_size, c.hidden_size), scale)
        y = _dot(c, "bti,ei->bte", out.reshape(*out.shape[:2], c.hidden_size), flat,
                 preferred_element_type=jnp.float32)
        return y + bias.astype(jnp.float32)


class Mlp(nn.Module):
    """FFN up, gelu, FFN down.

    The down projection, like the attention's output projection, comes out
    in float32 for the float32 residual stream. Split over its input rows on
    a mesh, its partial sums are then all-reduced in float32: more exact,
    and XLA runs them as its one-shot all-reduce kernel, which takes float32
    but not float16 (NCCL otherwise; 13B on 4 H100s: 5.15 against 5.34
    ms/token with NCCL, in one run).
    """

    config: PanguConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        up_k = _matrix(self, "up_kernel", (c.ffn_size, c.hidden_size), ("mlp", "embed"), (0,))
        up_b = _param(self, "up_bias", nn.initializers.zeros, (c.ffn_size,), c.jnp_param_dtype, ("mlp",))
        down_k = _matrix(self, "down_kernel", (c.hidden_size, c.ffn_size), ("embed", "mlp"), (0,))
        down_b = _param(self, "down_bias", nn.initializers.zeros, (c.hidden_size,), c.jnp_param_dtype, ("embed",))
        h = _dot(c, "bti,oi->bto", x, up_k).astype(jnp.float32) + up_b.astype(jnp.float32)
        h = jax.nn.gelu(h, approximate=c.activation == "gelu_tanh").astype(c.jnp_dtype)
        return _dot(c, "bti,oi->bto", h, down_k, preferred_element_type=jnp.float32) + down_b.astype(jnp.float32)


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
        cache_index: jax.Array | None,
        query_input: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        c = self.config
        a = LayerNorm(c.layer_norm_epsilon, name="ln1")(x)
        query_input = a if query_input is None else query_input
        attn, new_kv = Attention(c, name="attention")(
            query_input, a, positions, layer_cache, cache_positions, cache_index
        )
        x = x + attn  # both float32
        x = x + Mlp(c, name="mlp")(LayerNorm(c.layer_norm_epsilon, name="ln2")(x))
        self.sow("intermediates", "hidden", x)
        return x, new_kv


@functools.partial(jax.jit, static_argnums=0)
def _block(config: PanguConfig, params: Params, *args) -> tuple[jax.Array, Cache]:
    """One ordinary block applied: a jitted function, so that every layer of the same shapes reuses one trace."""
    return Block(config).apply({"params": params}, *args)


class BlockLoop(nn.Module):
    """The ordinary blocks as separate per-layer modules "0", "1", ... (unrolled).

    Outside `init` each layer runs as `_block`, a jitted function whose
    trace JAX caches, so that all layers share one trace. Tracing them one
    by one cost every process about half a second a program before its
    first token, compilation cache or not (2.6B, traced and lowered on the
    CPU host: the prefill 0.55-0.58 -> 0.11-0.13 s, a decode chunk
    0.66-0.69 -> 0.11-0.14 s; 13B 0.74 -> 0.14 and 0.91 -> 0.12; on an
    H200, 2.6B's first token with the compilation cache 2.37 -> 0.90 s).
    XLA inlines the calls (on a CPU the compiled decode has the same
    instructions; on the H200 2.6B decodes as fast as before). Each
    block's output is sown as one entry of "hidden".
    """

    config: PanguConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, caches: tuple[Cache, ...] | None, positions: jax.Array,
        cache_positions: jax.Array | None, cache_index: jax.Array | None,
    ) -> tuple[jax.Array, tuple[Cache, ...]]:
        new_kv = []
        layers = None if self.is_initializing() else self.variables["params"]
        for i in range(self.config.num_blocks):
            name = str(i)
            layer_cache = None if caches is None else caches[i]
            args = (x, layer_cache, positions, cache_positions, cache_index)
            if layers is None:
                x, kv = Block(self.config, name=name)(*args)
            else:
                if name not in layers:
                    raise ValueError(f"no parameters for block {name} (blocks/{name}); the model has "
                                     f"{self.config.num_blocks} blocks")
                try:
                    x, kv = _block(self.config, nn.meta.unbox(layers[name]), *args)
                except flax.errors.FlaxError as e:
                    raise ValueError(f"block {name} (blocks/{name}): {e}") from e
                self.sow("intermediates", "hidden", x)
            new_kv.append(kv)
        return x, tuple(new_kv)


class PanguAlpha(nn.Module):
    config: PanguConfig
    unstacked: bool = False

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, last_only: bool = False
    ) -> tuple[jax.Array, Any, Cache]:
        """Logits, and the blocks' and top layer's keys and values.

        Without a cache, the new tokens' keys and values, for the caller to
        cache; with one, its blocks and top layer with the new entries
        written at `cache["index"]` (see `forward`).
        """
        c = self.config
        emb_init = nn.initializers.normal(0.02)
        word = _matrix(self, "word_embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"), (0,), emb_init)
        pos_table = _param(self, "position_embedding", emb_init, (c.max_positions, c.hidden_size), c.jnp_param_dtype, (None, "embed"))
        top_table = _param(self, "top_query_embedding", emb_init, (c.max_positions, c.hidden_size), c.jnp_param_dtype, (None, "embed"))

        rows = jnp.take(word[0], tokens, axis=0, mode="clip").astype(jnp.float32)
        if word[1] is not None:
            rows = rows * jnp.take(word[1], tokens, axis=0, mode="clip")[..., None]
        x = rows + jnp.take(pos_table, positions, axis=0, mode="clip").astype(jnp.float32)
        self.sow("intermediates", "embeddings", x)

        cache_positions = None if cache is None else _written_positions(cache, positions)
        cache_index = None if cache is None else cache["index"]
        if self.unstacked:
            blocks = BlockLoop(c, name="blocks")
        else:
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="blocks")
        x, block_kv = blocks(x, None if cache is None else cache["blocks"], positions, cache_positions, cache_index)

        h = LayerNorm(c.layer_norm_epsilon, name="final_ln")(x)
        self.sow("intermediates", "top_input", h)
        top_query = jnp.take(top_table, positions, axis=0, mode="clip")
        out, top_kv = Block(c, name="top_query_layer")(
            h, None if cache is None else cache["top"], positions, cache_positions, cache_index, query_input=top_query
        )
        if last_only:
            out = out[:, -1:]
        logits = _dot(c, "bte,ve->btv", out, word, preferred_element_type=jnp.float32)
        return logits, block_kv, top_kv


def _written_positions(cache: Cache, positions: jax.Array) -> jax.Array:
    """The cache's slot positions once `positions` are written at its index."""
    return lax.dynamic_update_slice_in_dim(cache["positions"], positions, cache["index"], 1)


def init_cache(
    config: PanguConfig, batch_size: int, length: int | None = None, dtype=None, *, unstacked: bool = False
) -> Cache:
    """An empty cache of `length` slots (default: every position) per row.

    `unstacked=True` gives one key/value pair per block (a tuple), to go with
    unstacked parameters; otherwise the blocks' keys and values are stacked
    on a leading layers axis like the stacked parameters.
    """
    length = config.max_positions if length is None else length
    if batch_size <= 0 or length <= 0:
        raise ValueError(f"init_cache needs a positive batch_size and length, got {batch_size} and {length}")
    dtype = config.jnp_dtype if dtype is None else dtype
    kv_shape = (batch_size, length, config.num_heads, config.head_dim)
    if unstacked:
        blocks = tuple({n: jnp.zeros(kv_shape, dtype) for n in ("key", "value")} for _ in range(config.num_blocks))
    else:
        blocks = {n: jnp.zeros((config.num_blocks, *kv_shape), dtype) for n in ("key", "value")}
    return {
        "blocks": blocks,
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
    unstacked = is_unstacked(params)
    if cache is not None and isinstance(cache["blocks"], tuple) != unstacked:
        layout = "unstacked" if unstacked else "stacked"
        raise ValueError(
            f"forward: the parameters are {layout} but the cache is not; "
            f"make the cache with init_cache(..., unstacked={unstacked})"
        )
    return _apply(config, params, tokens.astype(jnp.int32), positions, cache, last_only)


def _apply(config: PanguConfig, params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None,
           last_only: bool) -> tuple[jax.Array, Cache | None]:
    model = PanguAlpha(config, unstacked=is_unstacked(params))
    logits, blocks, top = model.apply({"params": params}, tokens, positions, cache, last_only)
    if cache is None:
        return logits, None
    return logits, {"blocks": blocks, "top": top, "positions": _written_positions(cache, positions),
                    "index": cache["index"] + positions.shape[1]}


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames="last_only")
def prefill(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache_length: int,
    *,
    last_only: bool = True,
) -> tuple[jax.Array, Cache]:
    """Logits and a fresh cache of `cache_length` slots holding these tokens.

    `forward` with an empty `init_cache`: each layer writes its keys and
    values straight into its cache slots, so no copy of every layer's new
    entries waits to be written at the end. `positions` as in `forward`
    (-1: padding); the cache's layout follows the parameters'.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != tokens.shape or tokens.ndim != 2:
        raise ValueError(f"prefill: tokens {tokens.shape} and positions {positions.shape} must be one [batch, length]")
    if cache_length < tokens.shape[1]:
        raise ValueError(f"prefill: cache_length {cache_length} cannot hold {tokens.shape[1]} tokens")
    cache = init_cache(config, tokens.shape[0], cache_length, unstacked=is_unstacked(params))
    return _apply(config, params, tokens, positions, cache, last_only)


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
    unstacked = is_unstacked(params)
    _, state = PanguAlpha(config, unstacked=unstacked).apply(
        {"params": params}, tokens, jnp.asarray(positions, jnp.int32), mutable=["intermediates"]
    )
    found = state["intermediates"]
    if unstacked:
        blocks = jnp.stack(found["blocks"]["hidden"])
    else:
        blocks = found["blocks"]["hidden"][0]
    return {
        "embeddings": found["embeddings"][0],
        "blocks": blocks,
        "top_input": found["top_input"][0],
        "output": found["top_query_layer"]["hidden"][0],
    }


def _boxed_init(config: PanguConfig, rng: jax.Array, unstacked: bool = False):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return PanguAlpha(config, unstacked=unstacked).init(rng, tokens, tokens)["params"]


def init_params(config: PanguConfig, rng: jax.Array | int = 0, *, unstacked: bool = False) -> Params:
    """Random parameters (normal 0.02 matrices, LayerNorm ones/zeros), stacked or per layer.

    The two layouts draw different random values.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return nn.unbox(_boxed_init(config, rng, unstacked))


def abstract_params(config: PanguConfig, *, unstacked: bool = False) -> Params:
    """Shapes and dtypes of the parameters (stacked or per layer), allocating nothing."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, config, unstacked=unstacked), jax.random.key(0)))


def param_logical_axes(config: PanguConfig, *, unstacked: bool = False) -> Params:
    """The logical axis names of every parameter, as PartitionSpecs (in the unstacked layout if asked)."""
    specs = nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))
    if unstacked:
        per_layer = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s[1:]), specs["blocks"],
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        specs = {**specs, "blocks": {str(i): per_layer for i in range(config.num_blocks)}}
    return specs


def is_unstacked(params: Params) -> bool:
    """Whether the blocks are per-layer dicts ("0", "1", ...) rather than stacked arrays."""
    return "0" in params["blocks"]


def unstack_layers(params: Params, *, delete_stacked: bool = False) -> Params:
    """The same parameters with one array per block, the layout decoding reads fastest.

    Each layer is sliced out as its own array (on a device, a copy that keeps
    the stacked array's sharding). `delete_stacked=True` frees each stacked
    device array as soon as it is split, so the peak is the model plus one
    stacked weight rather than twice the model; the input tree is unusable
    afterwards. Already unstacked parameters come back unchanged.
    """
    if is_unstacked(params):
        return params
    blocks = params["blocks"]
    count = jax.tree_util.tree_leaves(blocks)[0].shape[0]

    def split(a):
        parts = [a[i] for i in range(count)]
        if delete_stacked and isinstance(a, jax.Array):
            a.delete()
        return parts

    pieces = jax.tree_util.tree_map(split, blocks)
    layers = {str(i): jax.tree_util.tree_map(lambda p, i=i: p[i], pieces, is_leaf=lambda x: isinstance(x, list))
              for i in range(count)}
    return {**params, "blocks": layers}


def stack_layers(params: Params) -> Params:
    """Undo `unstack_layers`: the blocks stacked on a leading layers axis."""
    if not is_unstacked(params):
        return params
    layers = params["blocks"]
    stack = jnp.stack if any(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(layers)) else np.stack
    blocks = jax.tree_util.tree_map(lambda *a: stack(a), *(layers[str(i)] for i in range(len(layers))))
    return {**params, "blocks": blocks}
