"""The decode-attention kernel alone, timed over a model's worth of layers.

    python benchmarks/decode_attention_micro.py [--model 2.6B] [--batches 1,32] [--positions 24,100] \
        [--slots 144] [--json PATH]

For each batch and new-token position, the kernel runs once per layer over
that many separate caches (so they do not sit in the L2 cache), as a decode
step does, q/k/v stacked from batch 2 on as the model passes them. The
table gives the GPU time per layer of the kernel and what follows it (the
join of split partial results), from a profile; the wall time per layer
beside it also counts launch gaps, which the model's large matmuls hide;
and the cache bytes read (the written slots' keys and values) over the GPU
time. Random bfloat16 values: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))


def time_kernel(config, batch: int, position: int, slots: int, repeats: int) -> tuple[float, float]:
    """Seconds per layer, wall (median of `repeats` passes) and GPU kernel time (one profiled pass),
    of the kernel run over `config.num_layers` caches."""
    import jax
    import jax.numpy as jnp

    from infer.bench import profile_kernels
    from pangu_jax.decode_attention import decode_attention

    heads, head_dim, layers = config.num_heads, config.head_dim, config.num_layers
    keys = jax.random.split(jax.random.key(position), 4)
    shape = (batch, slots, heads, head_dim)
    caches = [(jax.random.normal(jax.random.fold_in(keys[0], i), shape, jnp.bfloat16),
               jax.random.normal(jax.random.fold_in(keys[1], i), shape, jnp.bfloat16)) for i in range(layers)]
    qkv = jax.random.normal(keys[2], (batch, 3, heads, head_dim), jnp.bfloat16)
    if batch == 1:
        qkv = tuple(qkv[:, i] for i in range(3))
    filled = jnp.arange(slots)
    key_positions = jnp.broadcast_to(jnp.where(filled <= position, filled, -1), (batch, slots)).astype(jnp.int32)
    query_positions = jnp.full((batch,), position, jnp.int32)

    interpret = jax.default_backend() != "gpu"  # on CPU only the plumbing is checked

    @functools.partial(jax.jit, donate_argnums=0)
    def step(caches):
        """The caches, updated, and every layer's output (returned, so nothing is optimised away)."""
        done = [decode_attention(qkv, k, v, key_positions, query_positions, position, scale=0.1,
                                 interpret=interpret) for k, v in caches]
        return [d[1:] for d in done], [d[0] for d in done]

    held = {"caches": caches}

    def once():
        held["caches"], outputs = step(held["caches"])
        return jax.block_until_ready(outputs)

    once()  # compile
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        once()
        times.append(time.perf_counter() - began)

    kernel_us = profile_kernels(once, layers)["kernel_us_per_step"]
    return statistics.median(times) / layers, kernel_us / 1e6


def main(argv: list[str] | None = None) -> None:
    from infer.bench import _card, _print_table, append_record
    from pangu_jax import PanguConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--positions", default="24,100", help="the new token's slot (how much of the cache is written)")
    p.add_argument("--slots", type=int, default=144, help="cache length")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="append the rows to this JSON file")
    args = p.parse_args(argv)
    config = PanguConfig.preset(args.model)
    rows = []
    for batch, position in itertools.product(map(int, args.batches.split(",")), map(int, args.positions.split(","))):
        read = 2 * batch * (position + 1) * config.num_heads * config.head_dim * 2  # keys and values, bf16
        wall, kernel = time_kernel(config, batch, position, args.slots, args.repeats)
        seconds = kernel or wall  # no kernels in the profile off a GPU
        rows.append({"model": args.model, "batch": batch, "position": position, "slots": args.slots,
                     "gpu_us_per_layer": seconds * 1e6, "wall_us_per_layer": wall * 1e6,
                     "read_GBps": read / seconds / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    card = _card()
    _print_table(f"decode attention on {card}, {time.strftime('%Y-%m-%d')}", rows,
                 ["model", "batch", "position", "slots", "gpu_us_per_layer", "wall_us_per_layer", "read_GBps"])
    if args.json:
        command = "python benchmarks/decode_attention_micro.py " + " ".join(argv or sys.argv[1:])
        append_record(args.json, command, card, rows)


if __name__ == "__main__":
    main()
