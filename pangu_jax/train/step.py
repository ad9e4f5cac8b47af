"""The training state and the compiled steps that update and evaluate it, placed on a mesh by the rules table.

The state is created or restored directly sharded from abstract shapes:
every parameter by its logical axes (`sharding.TRAIN_RULES`: the batch
over `data` and `fsdp`, each matrix's embedding dimension over `fsdp`, heads
and the FFN over `tensor`), every optimizer moment like its parameter. The
train step is jitted with the state's shardings in and out, the state
donated. A batch's rows are split into micro-batches whose gradients are
summed before one optimizer step; the loss is the mean over every trained
token of the whole batch. A step whose loss or gradient norm is not finite
changes nothing but the step and the counters of such steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import PanguConfig
from ..layers import in_compute_dtype
from ..model import PanguAlpha
from ..sharding import TRAIN_RULES, Rules, check_mesh, logical_sharding, param_shardings
from .lora import join, split_trainable

__all__ = ["BATCH_AXES", "TrainState", "Trainer", "token_loss"]

Params = dict[str, Any]
BATCH_AXES = ("batch", "length")


@flax.struct.dataclass
class TrainState:
    """What a run carries from step to step (and saves)."""

    step: jax.Array  # [] int32: optimizer steps taken, skipped ones included
    params: Params  # what trains: every parameter, or with adapters the adapters alone
    frozen: Params  # with adapters: the base, never updated; else {}
    opt_state: Any
    bad_steps: jax.Array  # [] int32: steps in a row whose loss or gradient norm was not finite
    skipped: jax.Array  # [] int32: all such steps


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weight x negative log-likelihood of each target, sum of the weights), in float32 or wider."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(dtype), targets)
    weights = weights.astype(dtype)
    return jnp.sum(nll * weights), jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled steps of one run: `config` the model (kernels resolved), on `mesh` under `rules`.

    `accumulation` micro-batches make a batch; `dropout` and `remat` are
    `PanguAlpha`'s, and so is `causal_rows` (true for batches of the
    `concat` packing); `seed` draws the dropout masks (from the step alone,
    so a resumed run draws the same ones).
    """

    config: PanguConfig
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: Rules = TRAIN_RULES
    accumulation: int = 1
    dropout: float = 0.0
    remat: str = "full"
    causal_rows: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_mesh(self.config, self.mesh, self.rules)

    # --- placement ---------------------------------------------------------------

    def param_shardings(self) -> Params:
        return param_shardings(self.config, self.mesh, rules=self.rules)

    def batch_sharding(self) -> NamedSharding:
        return logical_sharding(self.mesh, BATCH_AXES, self.rules)

    def state_shardings(self, state: TrainState) -> TrainState:
        """The sharding of every leaf of a (possibly abstract) state: moments like their parameters."""
        trainable, frozen = split_trainable(self.config, self.param_shardings())
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt = optax.tree_map_params(self.optimizer, lambda _, sharding: sharding, state.opt_state, trainable,
                                    transform_non_params=lambda _: replicated)
        return TrainState(step=replicated, params=trainable, frozen=frozen, opt_state=opt, bad_steps=replicated,
                          skipped=replicated)

    def _fresh(self, trainable: Params, frozen: Params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=trainable, frozen=frozen, opt_state=self.optimizer.init(trainable),
                          bad_steps=zero, skipped=zero)

    def new_state(self, params: Params) -> TrainState:
        """A fresh state around `params` (the whole tree, placed or not), placed by the rules.

        The given arrays are donated: the state takes their memory.
        """
        parts = split_trainable(self.config, params)
        shardings = self.state_shardings(jax.eval_shape(self._fresh, *parts))
        placed = jax.device_put(parts, (shardings.params, shardings.frozen))
        return jax.jit(self._fresh, out_shardings=shardings, donate_argnums=(0, 1))(*placed)

    def abstract_state(self, params: Params) -> TrainState:
        """The shapes, dtypes and shardings of `new_state(params)`, allocating nothing (for a restore)."""
        abstract = jax.eval_shape(self._fresh, *split_trainable(self.config, params))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings(abstract))

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a batch (`TrainData.batch(step, process_index=...)`) as global arrays."""
        sharding = self.batch_sharding()
        return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in batch.items()}

    # --- the model's loss ------------------------------------------------------------

    def _loss_terms(self, params: Params, batch: dict[str, jax.Array], rng: jax.Array | None):
        model = PanguAlpha(self.config, dropout=self.dropout, remat=self.remat, causal_rows=self.causal_rows)
        with nn.logical_axis_rules(self.rules):  # the activations' layout (`layers.activations`), on `_on_mesh`'s mesh
            logits, _, _ = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                       segment_ids=batch["segment_ids"],
                                       rngs=None if rng is None else {"dropout": rng})
        return token_loss(logits, batch["targets"], batch["loss_weights"])

    # --- the steps -------------------------------------------------------------------

    def _on_mesh(self, fn):
        """`fn` traced and run with the mesh set, as the activations' layout constraints need."""

        def run(*args):
            with jax.set_mesh(self.mesh):
                return fn(*args)

        return run

    @functools.cached_property
    def _jitted_step(self):
        return jax.jit(self._step, donate_argnums=0)

    @functools.cached_property
    def step(self):
        """`step(state, batch) -> (state, metrics)`: one optimizer step, compiled, the state donated."""
        return self._on_mesh(self._jitted_step)

    def lower_step(self, state: TrainState, batch: dict[str, Any]) -> jax.stages.Lowered:
        """The step lowered for `state` and `batch`, arrays or shapes (`abstract_state`; the batch's
        `jax.ShapeDtypeStruct`s placed by `batch_sharding()`), allocating nothing:
        `.compile().memory_analysis()` says what one device needs before a run starts."""
        with jax.set_mesh(self.mesh):
            return self._jitted_step.lower(state, batch)

    def _step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step) if self.dropout else None
        trainable = in_compute_dtype(self.config, state.params)  # once a step, for every micro-batch

        def gradients(index, piece):
            """((sum of the piece's token losses, its trained tokens), the sum's gradients)"""
            piece_rng = None if rng is None else jax.random.fold_in(rng, index)
            return jax.value_and_grad(lambda p: self._loss_terms(join(p, state.frozen), piece, piece_rng),
                                      has_aux=True)(trainable)

        def accumulate(carry, inputs):
            grads, loss, weight = carry
            (nll, count), piece_grads = gradients(*inputs)
            grads = jax.tree.map(lambda g, p: g + p.astype(jnp.float32), grads, piece_grads)
            return (grads, loss + nll, weight + count), None

        if self.accumulation == 1:  # no zeroed sums to add the only piece's gradients to
            (total, weight), grads = gradients(0, batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            micro = {k: v.reshape(self.accumulation, v.shape[0] // self.accumulation, *v.shape[1:])
                     for k, v in batch.items()}
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, total, weight), _ = jax.lax.scan(accumulate, start, (jnp.arange(self.accumulation), micro))
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = total / weight
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), frozen=state.frozen,
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1), skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": weight, "skipped": ~finite}
        return new_state, metrics

    @functools.cached_property
    def evaluate(self):
        """`evaluate(state, batch) -> (sum of negative log-likelihoods, trained tokens)`, without dropout."""
        return self._on_mesh(jax.jit(lambda state, batch: self._loss_terms(join(state.params, state.frozen), batch,
                                                                             None)))
