"""Next-token samplers: small frozen dataclasses, usable as static jit arguments."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Repetition penalty, then temperature, top-k and top-p (nucleus) sampling.

    `temperature == 0` is greedy (argmax). `top_k == 0` and `top_p == 1.0`
    switch those filters off. The original PanGu-alpha demo samples from the
    top 5 tokens, renormalised: `Sampler(top_k=5)`. `repetition_penalty`
    (1.0: off) divides the positive logits and multiplies the negative ones
    of every token already seen in the row (prompt included), as in CTRL and
    HuggingFace transformers.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 switches it off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalises_repeats(self) -> bool:
        return self.repetition_penalty != 1

    def __call__(self, logits: jax.Array, keys: jax.Array, seen: jax.Array | None = None) -> jax.Array:
        """[batch, vocab] float logits -> [batch] int32 token ids.

        `keys` holds one PRNG key per row ([batch] typed keys or [batch, 2]
        raw uint32), so each row's draw depends on its own key alone; a
        single key is split over the rows. `seen` ([batch, vocab] bool) marks
        the tokens the repetition penalty applies to.
        """
        logits = logits.astype(jnp.float32)
        if self.penalises_repeats and seen is not None:
            penalised = jnp.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
            logits = jnp.where(seen, penalised, logits)
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        keys = _row_keys(keys, logits.shape[0])
        logits = logits / self.temperature
        if self.top_k:
            k = min(self.top_k, logits.shape[-1])
            values, ids = jax.lax.top_k(logits, k)
        else:
            ids = jnp.argsort(-logits, axis=-1)
            values = jnp.take_along_axis(logits, ids, axis=-1)
        if self.top_p < 1:
            probs = jax.nn.softmax(values, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
            values = jnp.where(before < self.top_p, values, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, values)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _row_keys(keys: jax.Array, batch: int) -> jax.Array:
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.ndim == (0 if typed else 1):
        return jax.random.split(keys, batch)
    return keys
