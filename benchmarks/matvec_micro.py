"""How fast do decode's matrix products read their weights at a few rows, written different ways?

    python benchmarks/matvec_micro.py [--model 2.6B] [--rows 1,8] [--weights float,int8]
        [--forms einsum,reduce,reduce16,packed] [--matrices qkv,output,up,down,head] [--no-torch] [--json PATH]

For each matrix of a block, stored output first as the model stores it
(query/key/value joined [3 * embed, embed], the attention output [embed,
embed], FFN up [ffn, embed], down [embed, ffn], the head [vocab, embed]),
the preset's layers' worth of distinct matrices (more bytes
than the L2 cache holds) are multiplied by a `rows`-row input in a chain
(each output cut or tiled to the next input; nothing else between the
products), 16 chains in a fori_loop. Forms:

- `einsum`: what `pangu_jax.model._dot` does (int8 values converted to the
  compute dtype, then one matmul, the scale after), which XLA lowers to a
  Triton or cuBLAS gemm, or at one row sometimes to a reduction;
- `reduce`: the products in float32 summed over the input dim, which XLA
  lowers to one reduction kernel that converts each weight as it reads it;
- `reduce16`: the same with the products in the compute dtype, summed in float32;
- `packed`: the matrix read as 32-bit words (`unpack`), four int8 or two
  bfloat16 values each, converted in registers and summed in float32.

Prints, per matrix and form, the time per chain, the weight bytes read per
second and the ratio to the best copy bandwidth measured in the same run;
with PyTorch and a GPU also `torch.matmul` (cuBLAS) on the same float
shapes, for what a vendor library reaches.

Measured on an H200 (2026-12-01, one row, 13B): int8 einsums of block
matrices read 1.3-2.1 TB/s, int8 row reductions 2.1-2.9 TB/s, int8
reductions down the columns no faster than the einsum; float row
reductions 3.7-4.4 TB/s; `packed` no gain (`benchmarks/results/2026-12-01-h200-int8-row-reduction.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, _median_time, append_record, measure_bandwidths  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402
from pangu_jax.quantize import quantize_matrix  # noqa: E402

STEPS = 16


def shapes(c: PanguConfig) -> dict[str, tuple[tuple[int, int], int]]:
    """matrix -> (stored shape, which dim is the input)."""
    e, f = c.hidden_size, c.ffn_size
    return {"qkv": ((3 * e, e), 1), "output": ((e, e), 1), "up": ((f, e), 1), "down": ((e, f), 1),
            "head": ((c.vocab_size, e), 1)}


def unpack(w: jax.Array) -> jax.Array:
    """The matrix read as 32-bit words along its last dim, each word's values unpacked in float32.

    [..., n] int8 -> [..., n / 4, 4] and [..., n] bfloat16 -> [..., n / 2, 2],
    so that a reduction loads four bytes at a time whatever the element type.
    """
    per_word = 4 // w.dtype.itemsize
    words = lax.bitcast_convert_type(w.reshape(*w.shape[:-1], w.shape[-1] // per_word, per_word), jnp.uint32)
    if w.dtype == jnp.int8:
        signed = lax.bitcast_convert_type(words, jnp.int32)
        parts = [lax.shift_right_arithmetic(lax.shift_left(signed, jnp.int32(24 - 8 * b)), jnp.int32(24))
                 for b in range(4)]
        return jnp.stack(parts, -1).astype(jnp.float32)
    if w.dtype != jnp.bfloat16:
        raise ValueError(f"unpack: int8 or bfloat16 matrices, got {w.dtype}")
    low = lax.bitcast_convert_type(lax.shift_left(words, jnp.uint32(16)), jnp.float32)
    high = lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.stack([low, high], -1)


def matvec(form: str, x: jax.Array, w: jax.Array, scale: jax.Array | None, in_dim: int) -> jax.Array:
    """x [rows, in] times w (its input dim `in_dim`), float32 [rows, out]."""
    dtype = x.dtype
    if form == "einsum":
        eq = "rk,kn->rn" if in_dim == 0 else "rk,nk->rn"
        y = jnp.einsum(eq, x, w.astype(dtype), preferred_element_type=jnp.float32)
    elif form == "packed":
        x32, words = x.astype(jnp.float32), unpack(w)
        if in_dim == 0:  # [in, out / k, k]
            y = jnp.sum(x32[:, :, None, None] * words[None], axis=1).reshape(x.shape[0], -1)
        else:  # [out, in / k, k]
            y = jnp.sum(x32.reshape(x.shape[0], 1, *words.shape[1:]) * words[None], axis=(2, 3))
    else:
        product_dtype = jnp.float32 if form == "reduce" else dtype
        xs = x.astype(product_dtype)[:, :, None] if in_dim == 0 else x.astype(product_dtype)[:, None, :]
        y = jnp.sum(xs * w.astype(product_dtype)[None], axis=1 + in_dim, dtype=jnp.float32)
    return y if scale is None else y * scale


def chain(form: str, in_dim: int, size_in: int):
    """A jitted function: `STEPS` times, every matrix in turn times the previous output (cut or tiled to fit)."""

    def fit(y):
        if y.shape[1] >= size_in:
            return y[:, :size_in]
        return jnp.tile(y, (1, size_in // y.shape[1]))

    @jax.jit
    def run(mats, scales, x):
        def step(_, x):
            for w, s in zip(mats, scales):
                x = fit(matvec(form, x, w, s, in_dim)).astype(x.dtype)
            return x
        return lax.fori_loop(0, STEPS, step, x)

    return run


def make_matrices(count: int, shape, in_dim: int, weights: str, dtype, key):
    """`count` random matrices, as int8 values and float32 scales or in `dtype` (scales None)."""
    mats, scales = [], []
    for k in jax.random.split(key, count):
        # Scaled so that a product keeps its input's size from matrix to matrix.
        w = jax.random.normal(k, shape, jnp.float32) / shape[in_dim] ** 0.5
        if weights == "int8":
            values, scale = quantize_matrix(w, channels=(1 - in_dim,))
            mats.append(values)
            scales.append(scale)
        else:
            mats.append(w.astype(dtype))
            scales.append(None)
    return mats, scales


def torch_seconds(shape, in_dim: int, count: int, rows: int, repeats: int) -> float | None:
    """Seconds per chain of `count` torch.matmul calls on distinct float16 matrices (cuBLAS), if CUDA is there."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    mats = [torch.randn(shape, device="cuda", dtype=torch.float16) * 0.02 for _ in range(count)]
    size_in = shape[in_dim]
    x = torch.randn(rows, size_in, device="cuda", dtype=torch.float16)

    def run():
        for w in mats:
            (x @ w) if in_dim == 0 else (x @ w.T)

    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / STEPS)
    mats.clear()
    torch.cuda.empty_cache()
    return statistics.median(times)


def time_chain(form: str, shape, in_dim: int, weights: str, dtype, rows: int, count: int, repeats: int) -> float:
    """Median seconds of one chain."""
    mats, scales = make_matrices(count, shape, in_dim, weights, dtype, jax.random.key(0))
    run = chain(form, in_dim, shape[in_dim])
    x = jax.random.normal(jax.random.key(1), (rows, shape[in_dim]), jnp.float32).astype(dtype)
    return _median_time(lambda: jax.block_until_ready(run(mats, scales, x)), repeats) / STEPS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--weights", default="float,int8")
    p.add_argument("--forms", default="einsum,reduce,reduce16,packed")
    p.add_argument("--matrices", default="qkv,output,up,down,head")
    p.add_argument("--count", type=int, help="distinct matrices per chain (default: the preset's layers)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    c = PanguConfig.preset(args.model)
    dtype = jnp.dtype(args.dtype)
    count = args.count or c.num_layers
    bandwidth = measure_bandwidths()["best"]
    print(f"{_card()}, {args.model} {args.dtype}, {count} matrices a chain, best copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s", flush=True)
    rows_out = []

    def record(name, shape, rows, weights, form, seconds, itemsize):
        nbytes = count * shape[0] * shape[1] * itemsize
        rows_out.append({"matrix": name, "shape": list(shape), "rows": rows, "weights": weights, "form": form,
                         "us_per_matrix": seconds / count * 1e6, "weight_GBps": nbytes / seconds / 1e9,
                         "ratio_to_copy": nbytes / seconds / bandwidth})
        print(json.dumps(rows_out[-1]), flush=True)

    for name in args.matrices.split(","):
        shape, in_dim = shapes(c)[name]
        for rows in map(int, args.rows.split(",")):
            for weights in args.weights.split(","):
                for form in args.forms.split(","):
                    seconds = time_chain(form, shape, in_dim, weights, dtype, rows, count, args.repeats)
                    record(name, shape, rows, weights, form, seconds, 1 if weights == "int8" else dtype.itemsize)
            seconds = None if args.no_torch else torch_seconds(shape, in_dim, count, rows, args.repeats)
            if seconds is not None:
                record(name, shape, rows, "float16", "torch.matmul", seconds, 2)
    if args.json:
        append_record(args.json, "python benchmarks/matvec_micro.py " + " ".join(argv or sys.argv[1:]), _card(),
                      rows_out, copy_bandwidth_GBps=bandwidth / 1e9)


if __name__ == "__main__":
    main()
