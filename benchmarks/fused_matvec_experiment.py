"""Experiment (kept for the record, lost to XLA): a decode step's matmuls with their small neighbours fused in.

    python benchmarks/fused_matvec_experiment.py [--model 2.6B] [--rows 1,32] [--ops ...] [--sweep] [--json PATH]

The idea: at batch 1, XLA runs six small kernels a layer besides the
matmuls (LayerNorm moments and apply twice, the gelu after FFN up, the add
of FFN down's split-K partial sums; 1.4-2.4 us each on an H100, about a
tenth of a 2.6B step). `fused_matmul` below folds them into one Pallas
(Triton) kernel per matmul: an optional LayerNorm of the input rows (each
program recomputes the moments), one to three weights of one shape against
the same input (query, key and value together), then bias, gelu (tanh
form) and residual add. Each program owns `block_n` output columns and
walks the whole contraction in `block_k` steps with `tl.dot` (rows padded
to 16), reading the weights in their stored layout.

Measured on an H100 (2026-11-28, `benchmarks/results/2026-11-28-h100x4-fused-matvec-experiment.json`),
one row, best of ~48 tile shapes each: LN1 + query/key/value 26.1 us (1.5
TB/s), output projection 12.6 us (1.0), LN2 + FFN up 28.1 us (1.9), FFN
down 29.5 us (1.8): 96 us a layer, where the model's XLA kernels for the
same work, small ones included, take about 73 us (matvecs at 2.2-2.7 TB/s;
`infer/bench.py profile`). At 32 rows the kernel lost too (LN1 + q/k/v
39.4 us against XLA's 25.7 in this harness). A plain multiply-and-sum in
place of `tl.dot` read 1.1-1.8 TB/s. What the fused neighbours save (~10
us a layer) the slower weight reads lose twice over, so the model keeps
XLA's matmuls. (In this harness XLA's own times come out slower than in the
model, e.g. FFN down 42 us against 22, so compare the kernel's bandwidth
with the model's profile, not with the harness's XLA column.) Left here so
the numbers can be checked again with a newer Triton or other tiles.

The harness: for each of a block's four decode matmuls (LN1 + query/key/
value, output projection + bias + residual, LN2 + FFN up + bias + gelu, FFN
down + bias + residual), random bfloat16 weights in eight copies (so they
do not sit in the 50 MB L2 between calls), run one after another inside a
jitted while loop (ten passes), as the decode loop runs its layers: XLA's
version (the model's jnp code) and the kernel with default tiles, or with
`--sweep` every tile shape. Prints the time per call (the loop's median
wall time over its calls, so the gaps between XLA's kernels count), the
weight bytes over that time, and the largest difference from XLA's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, _median_time, _print_table  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402
from pangu_jax.decode_attention import _next_power_of_2  # noqa: E402
from pangu_jax.model import LayerNorm  # noqa: E402

# Rows are padded to at least this many for the tensor cores (tl.dot needs
# 16); a tl.dot also gets Triton's software pipelining of the weight loads,
# which a plain multiply-and-sum does not (on an H100 it read 1.1-1.8 TB/s).
DOT_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How one kernel call is cut: output columns per program, contraction step, Triton's warps and stages."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def _largest_dividing_power_of_2(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def default_tiles(n: int, k: int, out_first: bool) -> Tiles:
    """The sweep's fastest tiles on an H100 for 2.6B's shapes, where they divide n and k."""
    if out_first:
        return Tiles(_largest_dividing_power_of_2(n, 32), _largest_dividing_power_of_2(k, 256), 4, 4)
    wide = n >= 8192  # FFN up: wide tiles; FFN down: narrow ones, long steps
    return Tiles(_largest_dividing_power_of_2(n, 128 if wide else 32),
                 _largest_dividing_power_of_2(k, 256 if wide else 512), 4, 3 if wide else 4)


def supported(rows: int, n: int, k: int) -> bool:
    """Whether the kernel takes these shapes: power-of-two tiles of at least 16 must divide n and k."""
    return rows >= 1 and _largest_dividing_power_of_2(n, 16) == 16 and _largest_dividing_power_of_2(k, 16) == 16


def _kernel(*refs, n_weights: int, out_first: bool, rows: int, k_size: int, block_k: int, epsilon: float,
            layer_norm: bool, bias: bool, activation: str | None, residual: bool, compute_dtype):
    x_ref, w_refs = refs[0], refs[1:1 + n_weights]
    rest = list(refs[1 + n_weights:])
    ln_scale_ref, ln_shift_ref = (rest.pop(0), rest.pop(0)) if layer_norm else (None, None)
    bias_ref = rest.pop(0) if bias else None
    residual_ref = rest.pop(0) if residual else None
    out_refs = rest
    padded_rows = x_ref.shape[0]
    row_ok = jnp.arange(padded_rows) < rows
    steps = k_size // block_k

    def x_chunk(step):
        span = pl.ds(step * block_k, block_k)
        return plgpu.load(x_ref.at[:, span], mask=row_ok[:, None], other=0).astype(jnp.float32)

    if layer_norm:  # as model.LayerNorm: both moments in one pass, biased variance
        def moments(step, carry):
            total, squares = carry
            xs = x_chunk(step)
            return total + xs.sum(1), squares + (xs * xs).sum(1)

        zeros = jnp.zeros((padded_rows,), jnp.float32)
        total, squares = lax.fori_loop(0, steps, moments, (zeros, zeros))
        mean = total / k_size
        rstd = lax.rsqrt(jnp.maximum(squares / k_size - mean * mean, 0) + epsilon)

    def step_fn(step, accs):
        span = pl.ds(step * block_k, block_k)
        xs = x_chunk(step)
        if layer_norm:
            xs = (xs - mean[:, None]) * rstd[:, None] * ln_scale_ref[span][None, :] + ln_shift_ref[span][None, :]
        xs = xs.astype(compute_dtype)
        out = []
        for w_ref, acc in zip(w_refs, accs):
            w = w_ref[:, span] if out_first else w_ref[span, :]
            contract = 1 if out_first else 0
            out.append(acc + lax.dot_general(xs, w, (((1,), (contract,)), ((), ())),
                                             preferred_element_type=jnp.float32))
        return tuple(out)

    block_n = out_refs[0].shape[1]
    accs = lax.fori_loop(0, steps, step_fn,
                         tuple(jnp.zeros((padded_rows, block_n), jnp.float32) for _ in w_refs))
    for acc, out_ref in zip(accs, out_refs):
        # As in the model, a matmul with a 16-bit output (FFN up) is rounded
        # before its bias; one with a float32 output (into the residual) is not.
        y = acc if out_ref.dtype == jnp.float32 else acc.astype(compute_dtype).astype(jnp.float32)
        if bias:
            y = y + bias_ref[...].astype(jnp.float32)[None, :]
        if activation == "gelu_tanh":
            y = jax.nn.gelu(y, approximate=True)
        if residual:
            y = plgpu.load(residual_ref, mask=row_ok[:, None], other=0).astype(jnp.float32) + y
        plgpu.store(out_ref, y.astype(out_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("out_first", "epsilon", "activation", "out_dtype", "tiles",
                                             "interpret"))
def fused_matmul(x: jax.Array, weights: tuple[jax.Array, ...], *, out_first: bool,
                  layer_norm: tuple[jax.Array, jax.Array] | None = None, epsilon: float = 1e-5,
                  bias: jax.Array | None = None, activation: str | None = None,
                  residual: jax.Array | None = None, out_dtype=None, tiles: Tiles | None = None,
                  interpret: bool = False) -> tuple[jax.Array, ...]:
    """`[activation](LN(x) @ w + bias) + residual` for each w in `weights`, in one kernel.

    `x` [rows, k] (any float dtype; float32 when it is the residual stream).
    `weights`: one to three matrices of one shape, [n, k] if `out_first` else
    [k, n], in the compute dtype (x is rounded to theirs before the matmul).
    `layer_norm`: (scale, shift), each [k] float32, applied to x first with
    `epsilon`. `bias` [n] (only with one weight): added to the matmul output,
    rounded first to the compute dtype unless `out_dtype` is float32. `activation`: None or "gelu_tanh".
    `residual` [rows, n] float32 is added last. Returns one [rows, n] array
    per weight in `out_dtype` (default: the weights' dtype).
    `interpret=True` runs the kernel in Pallas's interpreter (CPU).
    """
    rows, k = x.shape
    n = weights[0].shape[0 if out_first else 1]
    if not 1 <= len(weights) <= 3 or any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"fused_matmul: one to three weights of one shape, got {[w.shape for w in weights]}")
    if weights[0].shape != ((n, k) if out_first else (k, n)):
        raise ValueError(f"fused_matmul: x is {x.shape}, so a weight must be {(n, k) if out_first else (k, n)}"
                         f" (out_first={out_first}), got {weights[0].shape}")
    if bias is not None and len(weights) != 1:
        raise ValueError("fused_matmul: a bias goes with one weight only")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"fused_matmul: activation must be None or 'gelu_tanh', got {activation!r}")
    if not supported(rows, n, k):
        raise ValueError(f"fused_matmul: n ({n}) and k ({k}) must be multiples of 16")
    compute_dtype = weights[0].dtype
    out_dtype = compute_dtype if out_dtype is None else out_dtype
    tiles = default_tiles(n, k, out_first) if tiles is None else tiles
    padded_rows = _next_power_of_2(max(rows, DOT_ROWS))
    block_n, block_k = tiles.block_n, min(tiles.block_k, k)
    if n % block_n or k % block_k:
        raise ValueError(f"fused_matmul: tiles {tiles} do not divide n={n}, k={k}")

    whole = lambda j: (0, 0)  # noqa: E731
    columns = pl.BlockSpec((padded_rows, block_n), lambda j: (0, j))
    weight = (pl.BlockSpec((block_n, k), lambda j: (j, 0)) if out_first
              else pl.BlockSpec((k, block_n), lambda j: (0, j)))
    in_specs = [pl.BlockSpec((padded_rows, k), whole)] + [weight] * len(weights)
    operands = [x, *weights]
    if layer_norm is not None:
        in_specs += [pl.BlockSpec((k,), lambda j: (0,))] * 2
        operands += [layer_norm[0].astype(jnp.float32), layer_norm[1].astype(jnp.float32)]
    if bias is not None:
        in_specs.append(pl.BlockSpec((block_n,), lambda j: (j,)))
        operands.append(bias)
    if residual is not None:
        in_specs.append(columns)
        operands.append(residual)
    kernel = functools.partial(
        _kernel, n_weights=len(weights), out_first=out_first, rows=rows, k_size=k, block_k=block_k,
        epsilon=epsilon, layer_norm=layer_norm is not None, bias=bias is not None, activation=activation,
        residual=residual is not None, compute_dtype=compute_dtype)
    return tuple(pl.pallas_call(
        kernel,
        grid=(n // block_n,),
        in_specs=in_specs,
        out_specs=[columns] * len(weights),
        out_shape=[jax.ShapeDtypeStruct((rows, n), out_dtype)] * len(weights),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="pangu_decode_matmul",
    )(*operands))


COPIES = 8
REPS = 10
EPS = 1e-5


def _layer_norm(x, scale, shift):
    """The model's own LayerNorm."""
    return LayerNorm(EPS).apply({"params": {"scale": scale, "bias": shift}}, x)


def _ops(h: int, f: int, dtype, interpret: bool = False):
    """name -> (weight shape, weights per call, x width, out_first, xla(x, ws, aux), kernel(x, ws, aux, tiles))."""
    def xla_qkv(x, ws, a):
        y = _layer_norm(x, a["scale"], a["shift"]).astype(dtype)
        return tuple(jnp.einsum("bk,nk->bn", y, w) for w in ws)

    def into_residual(equation):
        def run(x, ws, a):
            return (a["residual"] + (jnp.einsum(equation, x, ws[0], preferred_element_type=jnp.float32)
                                     + a["bias"].astype(jnp.float32)),)
        return run

    def xla_up(x, ws, a):
        y = _layer_norm(x, a["scale"], a["shift"]).astype(dtype)
        z = jnp.einsum("bk,kn->bn", y, ws[0]).astype(jnp.float32) + a["bias"].astype(jnp.float32)
        return (jax.nn.gelu(z, approximate=True).astype(dtype),)

    def kernel(out_first, ln, bias, act, res, out_dtype):
        def run(x, ws, a, tiles):
            return fused_matmul(x, ws, out_first=out_first, layer_norm=(a["scale"], a["shift"]) if ln else None,
                                 epsilon=EPS, bias=a["bias"] if bias else None, activation=act,
                                 residual=a["residual"] if res else None, out_dtype=out_dtype, tiles=tiles,
                                 interpret=interpret)
        return run

    return {
        "ln1+qkv": ((h, h), 3, h, True, xla_qkv, kernel(True, True, False, None, False, dtype)),
        "out+bias+residual": ((h, h), 1, h, True, into_residual("bk,nk->bn"), kernel(True, False, True, None, True, jnp.float32)),
        "ln2+up+bias+gelu": ((h, f), 1, h, False, xla_up, kernel(False, True, True, "gelu_tanh", False, dtype)),
        "down+bias+residual": ((f, h), 1, f, False, into_residual("bk,kn->bn"), kernel(False, False, True, None, True, jnp.float32)),
    }


def _loop(op, weights, reps: int):
    """A jitted while loop of `reps` passes over all copies, as the decode loop runs its layers.

    Each output feeds the next call's residual where there is one; every
    output is carried by the loop (so none is dropped), and each pass's
    input depends on the last pass's output (so none is hoisted out of it).
    """
    @jax.jit
    def run(x, aux):
        def body(_, carry):
            outs, aux, seed = carry
            xi = x + seed.astype(x.dtype)
            outs = []
            for ws in weights:
                y = op(xi, ws, aux)
                outs.append(y)
                if "residual" in aux:
                    aux = {**aux, "residual": y[0]}
            return tuple(outs), aux, outs[-1][0][0, 0].astype(jnp.float32) * 0
        first = tuple(jax.eval_shape(op, x, ws, aux) for ws in weights)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
        return jax.lax.fori_loop(0, reps, body, (zeros, aux, jnp.float32(0)))[0]
    return run


def _us_per_call(fn, x, aux, calls: int) -> float:
    return _median_time(lambda: jax.block_until_ready(fn(x, aux)), 7) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--rows", default="1,32")
    p.add_argument("--ops", help="comma-separated subset of the four matmuls")
    p.add_argument("--sweep", action="store_true", help="try every tile shape, not just the default")
    p.add_argument("--json")
    args = p.parse_args()
    config = PanguConfig.preset(args.model)
    h, f, dtype = config.hidden_size, config.ffn_size, jnp.bfloat16
    ops = _ops(h, f, dtype)
    names = args.ops.split(",") if args.ops else list(ops)
    rng = np.random.default_rng(0)
    rows_out = []
    for name in names:
        shape, n_weights, width, out_first, xla, kern = ops[name]
        keys = jax.random.split(jax.random.key(len(rows_out)), COPIES * n_weights)
        weights = [tuple((0.02 * jax.random.normal(keys[c * n_weights + i], shape, jnp.float32)).astype(dtype)
                         for i in range(n_weights)) for c in range(COPIES)]
        n = shape[0] if out_first else shape[1]
        weight_bytes = n_weights * shape[0] * shape[1] * 2
        for rows in map(int, args.rows.split(",")):
            x = jnp.asarray(rng.normal(size=(rows, width)), jnp.float32 if "ln" in name else dtype)
            aux = {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=width), jnp.float32),
                   "shift": jnp.asarray(0.1 * rng.normal(size=width), jnp.float32),
                   "bias": jnp.asarray(0.1 * rng.normal(size=n), dtype)}
            if "residual" in name:
                aux["residual"] = jnp.asarray(rng.normal(size=(rows, n)), jnp.float32)
            reference = _loop(xla, weights, REPS)
            want = reference(x, aux)
            base = {"op": name, "rows": rows, "weight_MB": weight_bytes / 1e6}
            xla_us = _us_per_call(reference, x, aux, REPS * COPIES)
            rows_out.append({**base, "impl": "xla", "us": xla_us, "TBps": weight_bytes / xla_us / 1e6, "vs_xla": 1.0})
            print(json.dumps(rows_out[-1]), flush=True)
            default = default_tiles(n, width, out_first)
            candidates = [default]
            if args.sweep:
                candidates += [Tiles(bn, bk, w, s) for bn, bk, w, s in itertools.product(
                    (16, 32, 64, 128), (128, 256, 512), (4, 8), (3, 4))
                    if n % bn == 0 and width % bk == 0 and bn * bk <= 32768]
            for tiles in dict.fromkeys(candidates):
                run = _loop(lambda x, ws, a, t=tiles: kern(x, ws, a, t), weights, REPS)
                try:
                    got = run(x, aux)
                    us = _us_per_call(run, x, aux, REPS * COPIES)
                except Exception as e:  # a tile shape Triton cannot compile
                    print(f"{name} rows {rows} {tiles}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                           for gs, ws_ in zip(got, want) for g, w in zip(gs, ws_))
                rows_out.append({**base, "impl": "default" if tiles == default else "sweep",
                                 "tiles": f"n{tiles.block_n} k{tiles.block_k} w{tiles.num_warps} s{tiles.num_stages}",
                                 "us": us, "TBps": weight_bytes / us / 1e6,
                                 "vs_xla": xla_us / us, "max_diff": diff})
                print(json.dumps(rows_out[-1]), flush=True)
    card = _card()
    best = [r for r in rows_out if r["impl"] != "sweep"]
    if args.sweep:
        for key in dict.fromkeys((r["op"], r["rows"]) for r in rows_out):
            tried = [r for r in rows_out if (r["op"], r["rows"]) == key and r["impl"] != "xla"]
            if tried:
                best.append({**min(tried, key=lambda r: r["us"]), "impl": "best"})
    _print_table(f"decode matmuls, {args.model} bf16, on {card}, {time.strftime('%Y-%m-%d')}", best,
                 ["op", "rows", "impl", "tiles", "us", "TBps", "vs_xla", "max_diff"])
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": time.strftime("%Y-%m-%d"), "card": card, "model": args.model,
                       "command": "python benchmarks/fused_matvec_experiment.py " + " ".join(sys.argv[1:]),
                       "rows": rows_out}, out, indent=1)


if __name__ == "__main__":
    main()
