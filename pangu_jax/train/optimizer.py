"""The optimizer: AdamW with warmup then cosine decay, global-norm clipping, decay only where it belongs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .config import OptimizerConfig

__all__ = ["decay_mask", "make_optimizer", "schedule"]


def schedule(config: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the learning rate, then cosine decay to the end rate at `steps`."""
    warmup = min(config.warmup_steps, steps)
    decay = optax.cosine_decay_schedule(config.learning_rate, max(steps - warmup, 1),
                                        alpha=config.end_learning_rate / config.learning_rate)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: matrices and embeddings, not biases or LayerNorm."""

    def decays(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("bias") or name == "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


class ScaleByAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_in(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's scaling with both moments stored in `dtype` (bfloat16: half the optimizer state), updated in float32."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return ScaleByAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda n, g: b2 * n.astype(jnp.float32) + (1 - b2) * jnp.square(g), state.nu, updates)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        scaled = jax.tree.map(lambda m, n: (m / c1) / (jnp.sqrt(n / c2) + eps), mu, nu)
        store = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
        return scaled, ScaleByAdamState(count, store(mu), store(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (moments in `config.moments_dtype`), the rate from `schedule`."""
    if config.moments_dtype == "float32":
        adam = optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
    else:
        adam = scale_by_adam_in(jnp.bfloat16, config.b1, config.b2, config.eps)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        adam,
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule(config, steps)),
    )
