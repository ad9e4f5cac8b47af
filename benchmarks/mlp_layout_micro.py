"""Which FFN weight layout decodes faster as an einsum: stored [in, out] (the library until format 4) or [out, in]?

    python benchmarks/mlp_layout_micro.py [--model 2.6B] [--batches 1,32] [--profile] [--json PATH]

At batch 1 XLA computes a small matmul whose weight is stored [out, in] as a
row reduction (the attention projections: 3.4 TB/s on an H200) and one
stored [in, out] as a Triton gemm (the FFN: 3.2 TB/s), and which small
kernels around them it can fuse differs too. This times the FFN half of the
decoder alone, as the model computes it (LayerNorm in float32, up, bias,
gelu, down in float32, bias, residual), over the preset's layers with
per-layer weights, 16 steps in a fori_loop, for each layout of up and down.
Prints ms per step, the weight bytes over it, and with `--profile` the GPU
kernels per step (`infer/bench.py`'s `profile_kernels`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, append_record, measure_bandwidths, profile_kernels  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402

STEPS = 16
EQUATIONS = {  # layout -> (up, down) einsum
    "in_out": ("be,ef->bf", "bf,fe->be"),
    "out_in": ("be,fe->bf", "bf,ef->be"),
}


def make_weights(c: PanguConfig, dtype, up_layout: str, down_layout: str, key) -> list[dict]:
    e, f = c.hidden_size, c.ffn_size
    keys = iter(jax.random.split(key, 4 * c.num_layers))

    def normal(*shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return [{"up": normal(e, f) if up_layout == "in_out" else normal(f, e), "up_b": normal(f),
             "down": normal(f, e) if down_layout == "in_out" else normal(e, f), "down_b": normal(e)}
            for _ in range(c.num_layers)]


def ffn_steps(c: PanguConfig, dtype, up_layout: str, down_layout: str):
    up_eq, down_eq = EQUATIONS[up_layout][0], EQUATIONS[down_layout][1]

    def layer(x, w):
        mean = x.mean(-1, keepdims=True)
        var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0)
        a = ((x - mean) * lax.rsqrt(var + c.layer_norm_epsilon)).astype(dtype)
        h = jnp.einsum(up_eq, a, w["up"]).astype(jnp.float32) + w["up_b"].astype(jnp.float32)
        h = jax.nn.gelu(h, approximate=c.activation == "gelu_tanh").astype(dtype)
        y = jnp.einsum(down_eq, h, w["down"], preferred_element_type=jnp.float32)
        return x + y + w["down_b"].astype(jnp.float32)

    @jax.jit
    def run(weights, x):
        def step(_, x):
            for w in weights:
                x = layer(x, w)
            return x / jnp.max(jnp.abs(x))  # keep the values bounded from step to step
        return lax.fori_loop(0, STEPS, step, x)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="also count GPU kernels per step (GPU only)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    c = PanguConfig.preset(args.model)
    dtype = jnp.dtype(args.dtype)
    bandwidth = measure_bandwidths()
    rows = []
    for (up, down), batch in itertools.product(itertools.product(EQUATIONS, EQUATIONS),
                                               map(int, args.batches.split(","))):
        weights = make_weights(c, dtype, up, down, jax.random.key(0))
        run = ffn_steps(c, dtype, up, down)
        x = jax.random.normal(jax.random.key(1), (batch, c.hidden_size), jnp.float32)
        x = jax.block_until_ready(run(weights, x))  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            x = jax.block_until_ready(run(weights, x))
            times.append((time.perf_counter() - start) / STEPS)
        seconds = statistics.median(times)
        nbytes = sum(w.nbytes for w in jax.tree.leaves(weights))
        row = {"up": up, "down": down, "batch": batch, "ms_per_step": seconds * 1e3,
               "weight_GBps": nbytes / seconds / 1e9, "ratio_to_limit": nbytes / bandwidth["best"] / seconds}
        if args.profile:
            row.update(profile_kernels(lambda: run(weights, x), STEPS, top=8))
        print(json.dumps({k: v for k, v in row.items() if k not in ("top", "families")}), flush=True)
        rows.append(row)
    if args.json:
        append_record(args.json, "python benchmarks/mlp_layout_micro.py " + " ".join(argv or sys.argv[1:]), _card(),
                      rows, **{f"{k}_bandwidth_GBps": v / 1e9 for k, v in bandwidth.items()})


if __name__ == "__main__":
    main()
