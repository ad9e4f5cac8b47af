"""Generation: one bucketed prefill, then the whole decode in a jitted while loop.

Prompts of different lengths are left-padded to a shared bucket; padding
slots hold position -1 and are never attended to, so each row computes what
it would alone, and every row's next token reads the same column.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import PanguConfig
from .model import Params, forward, init_cache
from .sampling import Sampler

PAD_ID = 6
EOD_ID = 8
EOT_ID = 9
_MIN_BUCKET = 16


def bucket(length: int, limit: int) -> int:
    """The smallest power of two >= length (at least 16), capped at `limit`."""
    size = _MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, limit)


def check_prompts(config: PanguConfig, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Plain int lists, each non-empty, in the vocabulary, and leaving room for one new token."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one token (tokenize a non-empty text)")
        if len(ids) >= config.max_positions:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; the model has {config.max_positions} positions, "
                f"so a prompt may hold at most {config.max_positions - 1} to leave room for a new token"
            )
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id(s) {bad[:5]} outside [0, {config.vocab_size})")
        checked.append(ids)
    return checked


def _left_pad(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), width), PAD_ID, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = ids
        positions[row, width - len(ids):] = np.arange(len(ids))
    return tokens, positions


@functools.partial(
    jax.jit, static_argnames=("config", "sampler", "cache_length", "steps", "stop_ids")
)
def _generate(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    limits: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    cache_length: int,
    steps: int,
    stop_ids: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """New tokens [batch, steps] (PAD after a row ends) and each row's count."""
    batch = tokens.shape[0]
    cache = init_cache(config, batch, cache_length)
    logits, cache = forward(config, params, tokens, positions, cache, last_only=True)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def emit(state, logits):
        """Sample from the last logits and record the token for rows still going."""
        step, out, lengths, done, rng, cache, _ = state
        rng, key = jax.random.split(rng)
        token = sampler(logits[:, -1], key)
        active = ~done & ~jnp.isin(token, stops)
        out = out.at[:, step].set(jnp.where(active, token, PAD_ID))
        lengths = lengths + active
        done = ~active | (lengths >= limits)
        return step + 1, out, lengths, done, rng, cache, token

    def cond(state):
        step, _, _, done, *_ = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        *rest, cache, last = state
        logits, cache = forward(config, params, last[:, None], cache=cache)
        return emit((*rest, cache, last), logits)

    zeros = jnp.zeros((batch,), jnp.int32)
    out = jnp.full((batch, steps), PAD_ID, jnp.int32)
    state = emit((jnp.int32(0), out, zeros, zeros.astype(bool), rng, cache, None), logits)
    _, out, lengths, *_ = jax.lax.while_loop(cond, body, state)
    return out, lengths


def generate(
    config: PanguConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 50,
    *,
    temperature: float = 1.0,
    top_k: int = 5,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (EOT_ID, EOD_ID),
) -> list[list[int]]:
    """New token ids for each prompt (the stop token itself is not included).

    Defaults follow the original demo: top-k 5 sampling, stop at `<eot>` or
    `<eod>`, 50 new tokens. `temperature=0` is greedy. A row also stops when
    it reaches the model's last position.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    prompts = check_prompts(config, prompts)
    width = bucket(max(len(p) for p in prompts), config.max_positions)
    limits = [min(max_new_tokens, config.max_positions - len(p)) for p in prompts]
    steps = max(limits)
    tokens, positions = _left_pad(prompts, width)
    out, lengths = _generate(
        config, params, jnp.asarray(tokens), jnp.asarray(positions),
        jnp.asarray(limits, jnp.int32), jax.random.key(seed),
        sampler=sampler, cache_length=width + bucket(steps, 1 << 30),
        steps=steps, stop_ids=tuple(int(s) for s in stop_ids),
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[row, : lengths[row]].tolist() for row in range(len(prompts))]
