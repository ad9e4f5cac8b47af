"""The PanGu-alpha network (PANGU.md, "The network") in Flax linen, and the functions that run it.

Parameters are a plain nested dict:

    word_embedding       [vocab, embed]      also the tied output head
    position_embedding   [positions, embed]
    top_query_embedding  [positions, embed]  query of the top query layer
    blocks/...           the ordinary blocks (`layers.Block`), stacked on a
                         leading layers axis, or per layer (`layouts`)
    final_ln/{scale,bias}
    top_query_layer/...  the last layer, laid out like one block

and each block holds ln1 and ln2 ({scale, bias}); attention with
{query,key,value}_kernel [heads, head_dim, embed], {query,key,value}_bias
[heads, head_dim], output_kernel [embed, heads, head_dim], output_bias
[embed]; mlp with up_kernel [mlp, embed], up_bias [mlp], down_kernel
[embed, mlp], down_bias [embed]. Every matrix is stored output first
(`products`). The key/value cache is an explicit pytree (`cache`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import checkpoint_policies

from .cache import Cache, check_layout, init_cache, next_positions, written_positions
from .config import PanguConfig
from .kernels.cudnn_attention import saves_cudnn_attention
from .layers import Block, LayerNorm, activations, apply_dropout, matrix, param
from .layouts import is_per_layer
from .products import WIDENED_BATCHED_PRODUCT, WIDENED_PRODUCT, dot

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block(config: PanguConfig, causal_rows: bool, params: Params, *args) -> tuple[jax.Array, Cache]:
    """One ordinary block applied: a jitted function, so that every layer of the same shapes reuses one trace."""
    return Block(config, causal_rows=causal_rows).apply({"params": params}, *args)


class BlockLoop(nn.Module):
    """The ordinary blocks as separate per-layer modules "0", "1", ... (unrolled).

    Outside `init` each layer runs as `_block`, a jitted function whose
    trace JAX caches, so that all layers share one trace (tracing them one
    by one cost every process a noticeable time before its first token);
    XLA inlines the calls. Each block's output is sown as one entry of
    "hidden".
    """

    config: PanguConfig
    causal_rows: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, caches: tuple[Cache, ...] | None, positions: jax.Array,
        cache_positions: jax.Array | None, cache_index: jax.Array | None, segment_ids: jax.Array | None,
    ) -> tuple[jax.Array, tuple[Cache, ...]]:
        new_kv = []
        layers = None if self.is_initializing() else self.variables["params"]
        for i in range(self.config.num_blocks):
            name = str(i)
            layer_cache = None if caches is None else caches[i]
            args = (x, layer_cache, positions, cache_positions, cache_index, segment_ids)
            if layers is None:
                x, kv = Block(self.config, causal_rows=self.causal_rows, name=name)(*args)
            else:
                if name not in layers:
                    raise ValueError(f"no parameters for block {name} (blocks/{name}); the model has "
                                     f"{self.config.num_blocks} blocks")
                try:
                    x, kv = _block(self.config, self.causal_rows, nn.meta.unbox(layers[name]), *args)
                except flax.errors.FlaxError as e:
                    raise ValueError(f"block {name} (blocks/{name}): {e}") from e
                self.sow("intermediates", "hidden", x)
            new_kv.append(kv)
        return x, tuple(new_kv)


# What a scanned block keeps for the backward pass (`PanguAlpha.remat`); `..._and_attention` also keeps
# cuDNN attention's output and softmax statistics, so the backward pass does not run its forward again.
# Products in the compute dtype with a wider output carry names instead (`products.einsum`).
_WEIGHT_PRODUCTS = checkpoint_policies.save_from_both_policies(
    checkpoint_policies.checkpoint_dots_with_no_batch_dims, checkpoint_policies.save_only_these_names(WIDENED_PRODUCT))
REMAT_POLICIES = {
    "full": checkpoint_policies.nothing_saveable,
    "dots": checkpoint_policies.save_from_both_policies(
        checkpoint_policies.checkpoint_dots,
        checkpoint_policies.save_only_these_names(WIDENED_PRODUCT, WIDENED_BATCHED_PRODUCT)),
    "dots_with_no_batch_dims": _WEIGHT_PRODUCTS,
    "dots_with_no_batch_dims_and_attention": checkpoint_policies.save_from_both_policies(
        _WEIGHT_PRODUCTS, saves_cudnn_attention),
}


class PanguAlpha(nn.Module):
    """The whole network.

    `per_layer` runs the blocks as `BlockLoop` (per-layer parameters), else
    under nn.scan. Training's choices: `dropout` after the embeddings, on
    each residual branch and, with explicit attention, on the attention
    probabilities (active only when applied with a "dropout" rng), and
    `remat`, what each scanned block keeps
    for the backward pass ("none": everything; else a key of `REMAT_POLICIES`).
    `causal_rows`: without a cache, each row is one sequence in row order
    (the `concat` packing, padding only at its end), so attention hides a
    key by the row order alone, consulting neither positions nor segment
    ids: a fused kernel then takes no mask bias, whose gradient it would
    otherwise compute.
    """

    config: PanguConfig
    per_layer: bool = False
    dropout: float = 0.0
    remat: str = "none"
    causal_rows: bool = False

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, last_only: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, Any, Cache]:
        """Logits [B, T, V] (accumulation dtype), and the blocks' and top layer's keys and values.

        Without a cache, the new tokens' keys and values, for the caller to
        cache; with one, its blocks and top layer with the new entries
        written at `cache["index"]` (see `forward`).
        """
        c = self.config
        emb_init = nn.initializers.normal(0.02)
        word = matrix(self, "word_embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"), (0,), emb_init)
        pos_table = param(self, "position_embedding", emb_init, (c.max_positions, c.hidden_size),
                          c.jnp_param_dtype, (None, "embed"))
        top_table = param(self, "top_query_embedding", emb_init, (c.max_positions, c.hidden_size),
                          c.jnp_param_dtype, (None, "embed"))

        rows = jnp.take(word[0], tokens, axis=0, mode="clip").astype(c.accum_dtype)  # [B, T, E]
        if word[1] is not None:
            rows = rows * jnp.take(word[1], tokens, axis=0, mode="clip")[..., None]
        x = rows + jnp.take(pos_table, positions, axis=0, mode="clip").astype(c.accum_dtype)
        self.sow("intermediates", "embeddings", x)
        x = apply_dropout(self, self.dropout, activations(x))

        cache_positions = None if cache is None else written_positions(cache, positions)
        cache_index = None if cache is None else cache["index"]
        if self.per_layer:
            blocks = BlockLoop(c, self.causal_rows, name="blocks")
        else:
            block = Block if self.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[self.remat],
                                                                 prevent_cse=False)
            blocks = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0, "attention": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dropout, self.causal_rows, name="blocks")
        x, block_kv = blocks(x, None if cache is None else cache["blocks"], positions, cache_positions, cache_index,
                             segment_ids)

        h = LayerNorm(c.layer_norm_epsilon, c.accum_dtype, name="final_ln")(x)
        self.sow("intermediates", "top_input", h)
        top_query = activations(jnp.take(top_table, positions, axis=0, mode="clip"))
        out, top_kv = Block(c, self.dropout, self.causal_rows, name="top_query_layer")(
            h, None if cache is None else cache["top"], positions, cache_positions, cache_index, segment_ids,
            query_input=top_query,
        )
        if last_only:
            out = out[:, -1:]
        logits = dot(c, "bte,ve->btv", out, word, preferred_element_type=c.accum_dtype)
        return logits, block_kv, top_kv


def _check_tokens(name: str, tokens: jax.Array, positions: jax.Array | None,
                  segment_ids: jax.Array | None = None) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{name}: tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name}: tokens has length 0; give at least one token")
    for what, array in (("positions", positions), ("segment_ids", segment_ids)):
        if array is not None and array.shape != tokens.shape:
            raise ValueError(f"{name}: {what} shape {array.shape} differs from tokens shape {tokens.shape}")


@functools.partial(jax.jit, static_argnums=0, static_argnames="last_only")
def forward(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    *,
    segment_ids: jax.Array | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Logits ([batch, length, vocab], float32) and the updated cache.

    `tokens` is [batch, length] int; the parameters are stacked or per
    layer (`layouts`). `positions` defaults to 0..length-1, or, with a
    cache, to the positions that follow each cached row. A position of -1
    marks padding: such a token is never attended to. `segment_ids`
    ([batch, length], no cache) number the documents packed into a row:
    a token attends only to its own document's. Without a cache no token
    attends to one after it in the row, and the returned cache is None.
    `last_only` returns the last column's logits alone ([batch, 1, vocab]),
    as a prefill needs. Compiled with jit,
    `config` static; its "auto" kernels resolved for the backend
    (`PanguConfig.resolved`).
    """
    tokens = jnp.asarray(tokens)
    _check_tokens("forward", tokens, None, segment_ids)
    if positions is None:
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        else:
            positions = next_positions(cache, tokens.shape[1])
    positions = jnp.asarray(positions, jnp.int32)
    _check_tokens("forward", tokens, positions)
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("forward: segment_ids are for a whole packed row without a cache; "
                             "decode one document at a time")
        check_layout(cache, params)
    return _apply(config.resolved(), params, tokens.astype(jnp.int32), positions, cache, last_only, segment_ids)


def _apply(config: PanguConfig, params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None,
           last_only: bool, segment_ids: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    model = PanguAlpha(config, per_layer=is_per_layer(params))
    logits, blocks, top = model.apply({"params": params}, tokens, positions, cache, last_only, segment_ids)
    if cache is None:
        return logits, None
    return logits, {"blocks": blocks, "top": top, "positions": written_positions(cache, positions),
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
    (-1: padding); the cache is laid out like the parameters.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != tokens.shape or tokens.ndim != 2:
        raise ValueError(f"prefill: tokens {tokens.shape} and positions {positions.shape} must be one [batch, length]")
    if cache_length < tokens.shape[1]:
        raise ValueError(f"prefill: cache_length {cache_length} cannot hold {tokens.shape[1]} tokens")
    cache = init_cache(config, tokens.shape[0], cache_length, params=params)
    return _apply(config.resolved(), params, tokens, positions, cache, last_only)


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(
    config: PanguConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The residual stream (accumulation dtype) at every stage, for studying the model.

    `embeddings` [batch, length, hidden]: word plus position embedding;
    `blocks` [blocks, batch, length, hidden]: each ordinary block's output;
    `top_input`: the final LayerNorm's output, which the top query layer reads;
    `output`: the top query layer's output (logits = output @ word_embedding.T).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    per_layer = is_per_layer(params)
    _, state = PanguAlpha(config.resolved(), per_layer=per_layer).apply(
        {"params": params}, tokens, jnp.asarray(positions, jnp.int32), mutable=["intermediates"]
    )
    found = state["intermediates"]
    blocks = jnp.stack(found["blocks"]["hidden"]) if per_layer else found["blocks"]["hidden"][0]
    return {
        "embeddings": found["embeddings"][0],
        "blocks": blocks,
        "top_input": found["top_input"][0],
        "output": found["top_query_layer"]["hidden"][0],
    }


def _boxed_init(config: PanguConfig, rng: jax.Array):
    """The parameters do not depend on the kernels, so they are made through the portable ones (a float32
    config naming cuDNN attention, whose kernel takes only 16-bit inputs, initialises like any other)."""
    portable = config.replace(attention="auto", decode_attention="auto", matvec="auto").resolved("cpu")
    tokens = jnp.zeros((1, 1), jnp.int32)
    return PanguAlpha(portable).init(rng, tokens, tokens)["params"]


def init_params(config: PanguConfig, rng: jax.Array | int = 0) -> Params:
    """Random parameters, stacked (normal 0.02 matrices, LayerNorm ones and zeros)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return nn.unbox(_boxed_init(config, rng))


def abstract_params(config: PanguConfig) -> Params:
    """Shapes and dtypes of the stacked parameters, allocating nothing."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))


def param_logical_axes(config: PanguConfig) -> Params:
    """The logical axis names of every stacked parameter, as PartitionSpecs."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))
