"""Looking inside the network: what one forward pass computes at every layer, and what it predicts.

`inspect_forward` runs the model once and returns, on request, the residual
stream after every layer, every layer's attention probabilities and the
logit lens; `top_k` turns a row of logits into the likeliest next tokens
with their text; `token_log_likelihoods` scores a text token by token. The
model only sows what it computes (`PanguAlpha`, `layers.Attention`):
nothing is kept unless a caller here makes the collection mutable, so the
ordinary `forward` pays nothing for it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from .config import PanguConfig
from .layers import LayerNorm
from .layouts import stacked
from .model import PanguAlpha, Params, forward
from .products import dot
from .tokenizer import Tokenizer

__all__ = ["Inspection", "Prediction", "inspect_forward", "token_log_likelihoods", "token_log_probs", "top_k"]


@flax.struct.dataclass
class Inspection:
    """What one forward pass computed; a field that was not asked for is None.

    L counts every layer, the top query layer included (`PanguConfig.num_layers`).

    `logits` [B, T, V]: the model's output, as `forward` gives it.
    `hidden` [L + 1, B, T, E]: the residual stream: the embeddings (word
    plus position), then each layer's output; `hidden[-1]` is the top query
    layer's output, which the head reads.
    `attention` [L, B, N, T, T]: each layer's attention probabilities, per
    head; row t says how token t's attention spreads over the tokens (zero
    where the causal mask or a document boundary hides them). The last layer
    is the top query layer, whose queries are its position embeddings.
    `lens` [L, B, T, V] (the logit lens): each layer's next-token logits.
    An ordinary block's output goes through the final LayerNorm and the
    tied head, as if the top query layer were not there (for the last
    ordinary block that is exactly the input of the top query layer, times
    the head); the top query layer's output goes through the head alone, as
    in the network (no LayerNorm follows it), so `lens[-1]` equals `logits`.
    """

    logits: jax.Array
    hidden: jax.Array | None = None
    attention: jax.Array | None = None
    lens: jax.Array | None = None


def inspect_forward(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    hidden: bool = False,
    attention: bool = False,
    lens: bool = False,
) -> Inspection:
    """One forward pass of `tokens` [batch, length], returning what is asked for (`Inspection`).

    `positions` and `segment_ids` as in `forward` (no cache). Attention
    probabilities exist only in the explicit attention path, so asking for
    them runs that path whatever `config.attention` says (fused kernels never
    form them). Per-layer parameters are stacked first (`layouts.stacked`, a
    copy). `lens` holds L x vocabulary logits per token: for a large model
    ask for it on short inputs. With nothing asked for this is `forward`.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"inspect_forward: tokens must be [batch, length] with length >= 1, got shape {tokens.shape}")
    if not (hidden or attention or lens):
        return Inspection(logits=forward(config, params, tokens, positions, segment_ids=segment_ids)[0])
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    for name, array in (("positions", positions), ("segment_ids", segment_ids)):
        if array is not None and jnp.shape(array) != tokens.shape:
            raise ValueError(f"inspect_forward: {name} shape {jnp.shape(array)} differs from tokens shape {tokens.shape}")
    config = config.resolved()
    if attention:
        config = config.replace(attention="explicit")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return _inspect(config, stacked(params), tokens, jnp.asarray(positions, jnp.int32), segment_ids,
                    hidden=hidden, attention=attention, lens=lens)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("hidden", "attention", "lens"))
def _inspect(config: PanguConfig, params: Params, tokens: jax.Array, positions: jax.Array,
             segment_ids: jax.Array | None, *, hidden: bool, attention: bool, lens: bool) -> Inspection:
    collections = (["intermediates"] if hidden or lens else []) + (["attention"] if attention else [])
    (logits, _, _), state = PanguAlpha(config).apply(
        {"params": params}, tokens, positions, segment_ids=segment_ids, mutable=collections)
    found = {}
    if hidden or lens:
        sown = state["intermediates"]
        stream = jnp.concatenate([sown["embeddings"][0][None], sown["blocks"]["hidden"][0],
                                  sown["top_query_layer"]["hidden"][0][None]])  # [L + 1, B, T, E]
        if hidden:
            found["hidden"] = stream
        if lens:
            normed = LayerNorm(config.layer_norm_epsilon, config.accum_dtype).apply(
                {"params": params["final_ln"]}, stream[1:-1])
            head = (params["word_embedding"], params.get("word_embedding_scale"))
            found["lens"] = dot(config, "lbte,ve->lbtv", jnp.concatenate([normed, stream[-1:]]), head,
                                preferred_element_type=config.accum_dtype)
    if attention:
        sown = state["attention"]
        found["attention"] = jnp.concatenate([sown["blocks"]["attention"]["weights"][0],
                                              sown["top_query_layer"]["attention"]["weights"][0][None]])
    return Inspection(logits=logits, **found)


@functools.partial(jax.jit, static_argnums=0)
def token_log_probs(config: PanguConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: [batch, length - 1], float32.

    Rows may be right-padded: a token never sees those after it, so the
    entries of the real tokens do not depend on the padding.
    """
    logits, _ = forward(config, params, tokens)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T - 1, V]: each predicts the next token
    chosen = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def token_log_likelihoods(config: PanguConfig, params: Params, text: str | Sequence[int],
                          tokenizer: Tokenizer | None = None) -> np.ndarray:
    """Each token's log-likelihood given those before it, for a text (encoded by `tokenizer`) or token ids.

    Entry t - 1 is log p(token_t | tokens_<t), t = 1 .. n - 1: the first
    token has nothing before it and no entry. Their sum is the log-likelihood
    of the sequence given its first token.
    """
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("token_log_likelihoods: a text needs a tokenizer (or pass token ids)")
        text = tokenizer.encode(text)
    ids = np.asarray(text, np.int32)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"token_log_likelihoods: needs a sequence of at least 2 tokens, got shape {ids.shape}")
    return np.asarray(token_log_probs(config, params, ids[None])[0])


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One candidate next token: its id, probability and decoded text."""

    token_id: int
    probability: float
    text: str


def top_k(logits: jax.Array | np.ndarray, tokenizer: Tokenizer, k: int = 10) -> list[Prediction]:
    """The `k` likeliest tokens of one row of logits [vocab], best first, with their probabilities and text.

    Any row will do: `forward`'s last position (the next token), or a layer
    of `Inspection.lens`.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 1:
        raise ValueError(f"top_k: takes one row of logits [vocab], got shape {logits.shape}")
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(int(i), float(probabilities[i]), tokenizer.decode([int(i)])) for i in best]
