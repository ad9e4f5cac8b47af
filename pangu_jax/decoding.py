"""Generation: one bucketed prefill, then the decode on the device, in compiled loops of steps.

Prompts of different lengths are left-padded to a shared bucket; padding
slots hold position -1 and are never attended to, so each row computes what
it would alone, and every row's next token reads the same column. The room
for new tokens is bucketed too, and each row's limit is data, so other
prompt lengths and token counts in the same buckets reuse the compiled
programs.

`generate` runs the whole decode as one program: loops of `CHUNK` steps
while some row has that many tokens due, then single steps until every row
is done, so no step runs past the rows' limits. `stream` hands out each
chunk's new tokens while the next chunk runs; on one device its chunks are
loops whose condition the GPU reads, which stop when every row is done. The
state (`DecodeState`) is donated from call to call, so the cache is updated
in place. Parameters come in either layout (`layouts`); stacked ones are
turned into the per-layer layout decoding reads fastest once
(`for_decoding`).
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .cache import Cache
from .config import PanguConfig
from .layouts import Params, is_per_layer, per_layer
from .model import forward, prefill
from .sampling import Sampler
from .sharding import RULES, Rules, cache_shardings, logical_sharding
from .special_tokens import EOD_ID, EOT_ID, PAD_ID

__all__ = ["CHUNK", "DecodeState", "Generation", "Progress", "bucket", "check_prompts", "for_decoding", "generate",
           "left_pad", "start", "stream"]

_MIN_BUCKET = 16
CHUNK = 16


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries from step to step: B rows, room for W new tokens each."""

    step: jax.Array  # [] int32: steps taken (the prefill's token is step 0)
    out: jax.Array  # [B, W] int32: each row's new tokens, PAD_ID past its last
    lengths: jax.Array  # [B] int32: how many new tokens each row has
    done: jax.Array  # [B] bool: the row stopped (a stop token, or its limit)
    keys: jax.Array  # [B] PRNG keys, one per row, so a row's draws depend on its own seed alone
    cache: Cache  # the key/value cache (`cache`)
    last: jax.Array  # [B] int32: each row's latest token, the next step's input
    seen: jax.Array | None  # [B, V] bool: the tokens the repetition penalty applies to (None: no penalty)
    limits: jax.Array  # [B] int32: how many new tokens each row may have


@flax.struct.dataclass
class Progress:
    """Copies of what the host reads from a `DecodeState`, which itself is donated to the next step."""

    step: jax.Array
    out: jax.Array
    lengths: jax.Array
    done: jax.Array


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


def left_pad(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions [len(prompts), width] of the prompts padded on the left (padding: PAD_ID, -1)."""
    tokens = np.full((len(prompts), width), PAD_ID, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = ids
        positions[row, width - len(ids):] = np.arange(len(ids))
    return tokens, positions


_decoding_copy: dict[tuple[int, ...], tuple[list[weakref.ref], Params]] = {}


def for_decoding(params: Params) -> Params:
    """The per-layer parameters decoding reads fastest (`layouts.per_layer`), made once per stacked tree.

    Per-layer parameters come back as they are. Stacked ones are split on
    their first use and the copy kept for the next call while the tree's
    arrays live (for the model most recently given): that holds the model
    twice. To hold it once, split it yourself, freeing the stacked arrays:
    `layouts.per_layer(params, free_stacked=True)`.
    """
    if is_per_layer(params):
        return params
    leaves = jax.tree_util.tree_leaves(params)
    key = tuple(map(id, leaves))
    if key in _decoding_copy and all(ref() is leaf for ref, leaf in zip(_decoding_copy[key][0], leaves)):
        return _decoding_copy[key][1]
    copy = per_layer(params)
    _decoding_copy.clear()
    _decoding_copy[key] = ([weakref.ref(leaf) for leaf in leaves], copy)
    weakref.finalize(leaves[0], _decoding_copy.pop, key, None)
    return copy


def _emit(state: DecodeState, logits: jax.Array, sampler: Sampler, stop_ids: tuple[int, ...]) -> DecodeState:
    """Sample each row's next token from `logits` [B, V] and record it for rows still going."""
    split = jax.vmap(jax.random.split)(state.keys)
    token = sampler(logits, split[:, 1], state.seen)
    active = ~state.done & ~jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))
    column = jnp.where(active, token, PAD_ID)[:, None]
    lengths = state.lengths + active
    seen = None if state.seen is None else state.seen.at[jnp.arange(token.shape[0]), token].set(True)
    return state.replace(
        step=state.step + 1,
        out=jax.lax.dynamic_update_slice_in_dim(state.out, column, state.step, axis=1),
        lengths=lengths,
        done=~active | (lengths >= state.limits),
        keys=split[:, 0],
        last=token,
        seen=seen,
    )


@functools.partial(
    jax.jit, static_argnames=("config", "sampler", "cache_length", "out_width", "stop_ids", "mesh", "rules")
)
def _prefill(
    config: PanguConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    limits: jax.Array,
    seeds: jax.Array,
    *,
    sampler: Sampler,
    cache_length: int,
    out_width: int,
    stop_ids: tuple[int, ...],
    mesh: jax.sharding.Mesh | None,
    rules: Rules,
) -> DecodeState:
    """Run the prompts into a fresh cache and emit the first new token; `seeds` [B] uint32 make the rows' keys."""
    batch = tokens.shape[0]
    logits, cache = prefill(config, params, tokens, positions, cache_length)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(mesh, cache, rules))
    seen = None
    if sampler.penalises_repeats:
        prompt = jnp.where(positions >= 0, tokens, config.vocab_size)  # padding falls off the end
        seen = jnp.zeros((batch, config.vocab_size), bool).at[jnp.arange(batch)[:, None], prompt].set(True, mode="drop")
    zeros = jnp.zeros((batch,), jnp.int32)
    state = DecodeState(step=jnp.int32(0), out=jnp.full((batch, out_width), PAD_ID, jnp.int32), lengths=zeros,
                        done=zeros.astype(bool), keys=jax.vmap(jax.random.key)(seeds), cache=cache, last=zeros,
                        seen=seen, limits=limits)
    return _emit(state, logits[:, -1], sampler, stop_ids)


def _step(config: PanguConfig, params: Params, sampler: Sampler, stop_ids: tuple[int, ...],
          state: DecodeState) -> DecodeState:
    """One decode step: every row's next token."""
    logits, cache = forward(config, params, state.last[:, None], cache=state.cache)
    return _emit(state.replace(cache=cache), logits[:, -1], sampler, stop_ids)


def _progress(state: DecodeState) -> Progress:
    return Progress(*(jnp.copy(x) for x in (state.step, state.out, state.lengths, state.done)))


def _most_due(state: DecodeState) -> jax.Array:
    """The most tokens a row still going may yet emit."""
    return jnp.max(jnp.where(state.done, 0, state.limits - state.lengths))


@functools.partial(
    jax.jit, static_argnames=("config", "sampler", "stop_ids", "chunk", "to_end"), donate_argnames="state"
)
def _decode(config: PanguConfig, params: Params, state: DecodeState, *, sampler: Sampler,
            stop_ids: tuple[int, ...], chunk: int, to_end: bool) -> tuple[DecodeState, Progress]:
    """One chunk of `chunk` steps (a stream's on a mesh), or with `to_end` every step left until each row is done.

    Returns the new state and copies of what the host reads from it: the
    state is donated to the next call, so a stream reads the copies while
    that call runs. A row is done at a stop token or at its own limit,
    which the state carries, so another `max_new_tokens` does not
    recompile. With `to_end`, loops of `chunk` steps run while some row has
    that many tokens due, then single steps: whole chunks to the end would
    run past the limits, and single steps throughout would have the host
    decide every step whether to go on.
    """
    step = functools.partial(_step, config, params, sampler, stop_ids)

    def run_chunk(st: DecodeState) -> DecodeState:
        return jax.lax.fori_loop(0, chunk, lambda _, s: step(s), st)

    if to_end:
        state = jax.lax.while_loop(lambda st: _most_due(st) >= chunk, run_chunk, state)
        state = jax.lax.while_loop(lambda st: ~jnp.all(st.done), step, state)
    else:
        state = run_chunk(state)
    return state, _progress(state)


# Loops as CUDA graph nodes whose condition the GPU reads (conditional
# nodes), besides XLA's default graphs of kernels.
_GRAPHS_WITH_LOOPS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}


@functools.partial(
    jax.jit, static_argnames=("config", "sampler", "stop_ids", "chunk"), donate_argnames="state",
    compiler_options=_GRAPHS_WITH_LOOPS,
)
def _decode_until_done(config: PanguConfig, params: Params, state: DecodeState, *, sampler: Sampler,
                       stop_ids: tuple[int, ...], chunk: int) -> tuple[DecodeState, Progress]:
    """A stream's chunk on one device: single steps until every row is done, at most `chunk` of them.

    Compiled with loops as CUDA graph conditional nodes, the loop's
    condition is read by the GPU, not the host, so the call returns as soon
    as the steps are enqueued, and the last chunk runs only the steps left.
    On a mesh the steps' all-reduces keep the loop out of CUDA graphs, so
    there a stream runs `_decode`'s fixed chunks.
    """
    start = state.step
    step = functools.partial(_step, config, params, sampler, stop_ids)
    state = jax.lax.while_loop(lambda st: (st.step - start < chunk) & ~jnp.all(st.done), step, state)
    return state, _progress(state)


def _row_seeds(seed: int | Sequence[int], batch: int) -> np.ndarray:
    """One seed per row (uint32): `seed` for every row, or one seed per row."""
    seeds = np.full(batch, seed) if np.ndim(seed) == 0 else np.asarray(seed).reshape(-1)
    if len(seeds) != batch:
        raise ValueError(f"seed: got {len(seeds)} seeds for {batch} prompts; give one int or one per prompt")
    return seeds.astype(np.uint32)


def _params_mesh(params: Params) -> jax.sharding.Mesh | None:
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


def _caller_stacklevel() -> int:
    """The `stacklevel` of a warning that names the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "pangu_jax":
        frame, level = frame.f_back, level + 1
    return level


def _warn_if_capped(config: PanguConfig, max_new_tokens: int, limits: list[int]) -> None:
    capped = [row for row, limit in enumerate(limits) if limit < max_new_tokens]
    if capped:
        rows = ", ".join(f"prompt {row} to {limits[row]}" for row in capped[:5]) + (" ..." if len(capped) > 5 else "")
        warnings.warn(f"max_new_tokens {max_new_tokens} is capped by the model's {config.max_positions} positions "
                      f"(prompt plus new tokens): {rows} new tokens", stacklevel=_caller_stacklevel())


class Generation:
    """A prefilled batch decoding on the device: what `start` returns, and what `generate` and `stream` drive.

    `rows` prompts, at most `steps` new tokens each (the prefill's counts),
    decoded in loops of `chunk` steps; `state` is the `DecodeState`.
    """

    def __init__(self, config: PanguConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampler: Sampler, seed: int | Sequence[int], stop_ids: Sequence[int], rules: Rules):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        prompts = check_prompts(config, prompts)
        self.rows = len(prompts)
        seeds = _row_seeds(seed, self.rows)
        params = for_decoding(params)
        mesh = _params_mesh(params)
        if mesh is not None and self.rows % mesh.shape["data"]:
            # Fill the batch to a multiple of the data axis with copies of the first row.
            extra = mesh.shape["data"] - self.rows % mesh.shape["data"]
            prompts = prompts + [prompts[0]] * extra
            seeds = np.concatenate([seeds, np.repeat(seeds[:1], extra)])
        width = bucket(max(len(p) for p in prompts), config.max_positions)
        limits = [min(max_new_tokens, config.max_positions - len(p)) for p in prompts]
        _warn_if_capped(config, max_new_tokens, limits[:self.rows])
        self.steps = max(limits)
        self.chunk = CHUNK
        tokens, positions = left_pad(prompts, width)
        # Host arrays go to the device as they are: a jnp.asarray or key made
        # here would compile a small program of its own in every process.
        inputs = [tokens, positions, np.asarray(limits, np.int32), seeds]
        inputs = [jax.device_put(x, None if mesh is None else
                                 logical_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), rules))
                  for x in inputs]
        self.config, self.params, self.sampler, self.mesh = config, params, sampler, mesh
        self.stop_ids = tuple(int(s) for s in stop_ids)
        # Room for the new tokens (and a streamed last chunk's overshoot) in a
        # bucket, so that other token counts in the same bucket reuse the programs.
        room = bucket(self.steps + self.chunk, 1 << 30)
        self.state = _prefill(
            config, params, *inputs, sampler=sampler, stop_ids=self.stop_ids, cache_length=width + room,
            out_width=room, mesh=mesh, rules=tuple(rules),
        )

    def _decode_program(self, to_end: bool):
        """The jitted decode function a call of `decode(to_end)` runs, and its options."""
        options = dict(sampler=self.sampler, stop_ids=self.stop_ids, chunk=self.chunk)
        if to_end or self.mesh is not None:
            return _decode, {**options, "to_end": to_end}
        return _decode_until_done, options

    def decode(self, to_end: bool) -> Progress:
        """One chunk of at most `chunk` steps, or with `to_end` every step left, enqueued on the device.

        Returns copies of the new state's step, tokens, lengths and done flags.
        """
        program, options = self._decode_program(to_end)
        self.state, progress = program(self.config, self.params, self.state, **options)
        return progress

    def lower_decode(self, to_end: bool) -> jax.stages.Lowered:
        """The decode program `decode(to_end)` runs, lowered for the current state (to inspect or measure)."""
        program, options = self._decode_program(to_end)
        return program.lower(self.config, self.params, self.state, **options)

    def finish(self) -> None:
        """Decode every step left, on the device, until each row is done.

        Whether a row stopped at the prefill's token is left to the device:
        reading it here first would leave the device idle while the decode
        program is handed to it. Only a run with no step left by count (one
        new token) dispatches nothing.
        """
        if self.steps > 1:
            self.decode(to_end=True)

    def finished(self, progress: Progress | None = None) -> bool:
        """Whether every row is done (or every step taken), in `progress` or the current state."""
        progress = self.state if progress is None else progress
        return int(progress.step) >= self.steps or bool(np.asarray(progress.done)[: self.rows].all())

    def tokens(self, progress: Progress | None = None) -> list[list[int]]:
        """Each row's new tokens so far, in `progress` or the current state."""
        progress = self.state if progress is None else progress
        out, lengths = np.asarray(progress.out), np.asarray(progress.lengths)
        return [out[row, : lengths[row]].tolist() for row in range(self.rows)]


def start(
    config: PanguConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 50,
    *,
    temperature: float = 1.0,
    top_k: int = 5,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] = (EOT_ID, EOD_ID),
    rules: Rules = RULES,
) -> Generation:
    """Check and prefill a batch: the options that `generate` and `stream` take.

    Defaults follow the original demo: top-k 5 sampling, stop at `<eot>` or
    `<eod>`, 50 new tokens. `temperature=0` is greedy. A row also stops when
    it reaches the model's last position. `seed` is one int or one per
    prompt; a row's draws depend only on its own seed and prompt, so each
    row equals what it would give alone.

    Parameters placed on a mesh (`sharding.shard_params`) run there: the
    batch splits over the `data` axis (filled up with copies of the first
    prompt when it does not divide), the cache over `tensor` like the heads.
    """
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    return Generation(config, params, prompts, max_new_tokens, sampler, seed, stop_ids, rules)


def generate(config: PanguConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 50,
             **options) -> list[list[int]]:
    """New token ids for each prompt (the stop token itself is not included).

    The decode runs on the device until every row is done. `options` are
    those of `start`: temperature, top_k, top_p, repetition_penalty, seed,
    stop_ids, rules.
    """
    run = start(config, params, prompts, max_new_tokens, **options)
    run.finish()
    return run.tokens()


def stream(config: PanguConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 50,
           **options) -> Iterator[list[list[int]]]:
    """`generate`, handing out each row's new tokens after every compiled chunk.

    Yields, per chunk, a list with each row's tokens since the last yield
    (empty once a row is done); joined, they equal `generate`'s result for
    the same arguments. `options` as for `start`.

    The prefill's token is handed out before any decode program is compiled
    or loaded, so a fresh process shows it that much sooner. After it, each
    chunk is dispatched before the previous one's tokens are read, so the
    device never waits for the host (or the caller) between chunks.
    On one device a chunk stops when every row is done, so the last runs
    only the steps left. On a mesh, chunks have a fixed number of steps:
    there the last runs whole, and when every row stops early, the chunk
    already dispatched still runs (its tokens are not handed out).
    """
    run = start(config, params, prompts, max_new_tokens, **options)
    given = [0] * run.rows

    def news(progress: Progress | None = None) -> list[list[int]]:
        tokens = run.tokens(progress)
        new = [row[n:] for row, n in zip(tokens, given)]
        given[:] = [len(row) for row in tokens]
        return new

    yield news()
    if run.finished():
        return
    pending, steps = None, int(run.state.step)
    while steps < run.steps:
        upcoming, steps = run.decode(to_end=False), steps + run.chunk
        if pending is not None:
            yield news(pending)
            if run.finished(pending):
                return
        pending = upcoming
    yield news(pending)
