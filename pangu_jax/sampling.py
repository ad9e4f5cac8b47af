"""Next-token samplers: small frozen dataclasses, usable as static jit arguments."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Temperature, then top-k, then top-p (nucleus) sampling.

    `temperature == 0` is greedy (argmax). `top_k == 0` and `top_p == 1.0`
    switch those filters off. The original PanGu-alpha demo samples from the
    top 5 tokens, renormalised: `Sampler(top_k=5)`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """[batch, vocab] float logits -> [batch] int32 token ids."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
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
        choice = jax.random.categorical(rng, values, axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
