"""Experiment (kept for the record, lost to XLA): a decode step's products with their small neighbours fused in.

    python benchmarks/fused_matvec_experiment.py [--model 2.6B] [--dtype bfloat16] [--weights float|int8]
        [--ops ...] [--tiles 8x512w4s1u1,...] [--sweep] [--layer] [--json PATH]

At batch 1 each of a block's four products is a matrix-vector product that
XLA runs as a row reduction at 0.8-0.9 of the copy bandwidth, but the
LayerNorms' moments and normalisations, the gelu and the residual adds
around them cost six more small kernels a layer (about 12 us of a 2.6B
layer's 60 on an H200). `fused_matvec` below does a product and its
neighbours in one Pallas (Triton) kernel: each program owns `block_n` rows of
a matrix stored output first ([out, in], as the model stores every block
matrix), walks them in `block_k`-wide steps summing in float32, and adds
bias, gelu and residual at the end. The LayerNorm either comes first, each
program computing the row's moments (the model's numerics exactly), or is
folded through the product, W x' = rstd * (W (g x) - mean * (W g)) + W b,
with the moments summed from the same steps.

The harness: the four ops as the model computes them (LN1 + query/key/
value, attention output + bias + residual, LN2 + FFN up + bias + gelu, FFN
down + bias + residual; `xla` is the model's own code, `_dot`'s row
reductions on a GPU) against the kernel with each tile shape, every op over
the preset's layers' worth of distinct random matrices (more bytes than the
L2 cache holds) in a jitted loop of `REPS` passes; with `--layer` also whole
layers chained through the residual stream (the attention stood in for by
q + k + v), XLA's against the kernels' with each op's fastest tiles. Prints
the time per call, the matrix bytes read per second and the largest
difference from XLA's output.

Measured on an H200 (2026-12-01, `benchmarks/results/2026-12-01-h200-fused-matvec-experiment.json`;
`--sweep --layer`, then `--tiles` lists of about 20 forms, 2.6B bfloat16
and 13B float16): the kernel's best forms read 2.1-3.0 TB/s (2.6B) and
2.9-3.8 TB/s (13B), where XLA's reductions alone read 2.7-3.9 TB/s in the
model; op for op, 0.80-0.96 of the speed of XLA's reduction with its small
kernels (FFN down 1.00-1.05). Chained layers: 2.6B 54.3-55.2 us against
XLA's 57.1-58.7 (-5%), 13B 178-182 against 161-162 (+10%). Folding the
LayerNorm the same way in XLA instead (moments apart, the rest one
multi-output row reduction) made decoding slower still: 2.6B 1.96 -> 2.49
ms/token, 13B 6.62 -> 9.66. Not adopted.
The first round (2026-11-28, H100, `git show 95b7ad4:benchmarks/fused_matvec_experiment.py`:
matrices input first, `tl.dot` on rows padded to 16, too few programs)
read 1.0-1.9 TB/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import re
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
from pangu_jax.model import LayerNorm, _dot  # noqa: E402

ACTIVATIONS = (None, "gelu_tanh", "gelu_erf")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How a call is cut, and which way the kernel is written.

    `block_n` matrix rows per program, `block_k` columns per step, Triton's
    warps and stages; `unroll`: the steps as straight-line code (else a
    loop); `fold_norm`: the LayerNorm folded through the product (else the
    moments first); `step_sum`: each step's products summed at once (else
    a [block_n, block_k] float32 accumulator); `evict_first`: weights loaded
    with the evict-first cache policy.
    """

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2
    unroll: bool = True
    fold_norm: bool = False
    step_sum: bool = False
    evict_first: bool = False


def _largest_dividing_power_of_2(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def fitted(tiles: Tiles, n: int, k: int) -> Tiles:
    """`tiles` with block_n and block_k cut down to powers of two that divide n and k."""
    return dataclasses.replace(tiles, block_n=_largest_dividing_power_of_2(n, tiles.block_n),
                               block_k=_largest_dividing_power_of_2(k, tiles.block_k))


def _kernel(*refs, n_matrices: int, int8: bool, layer_norm: bool, bias: bool, residual: bool,
            activation: str | None, round_first: bool, k_size: int, block_k: int, epsilon: float,
            compute_dtype, unroll: bool, fold_norm: bool, step_sum: bool,
            evict_first: bool):
    refs = list(refs)
    x_ref = refs.pop(0)
    w_refs = [refs.pop(0) for _ in range(n_matrices)]
    scale_refs = [refs.pop(0) for _ in range(n_matrices)] if int8 else [None] * n_matrices
    g_ref, b_ref = (refs.pop(0), refs.pop(0)) if layer_norm else (None, None)
    bias_ref = refs.pop(0) if bias else None
    residual_ref = refs.pop(0) if residual else None
    out_refs = refs
    steps = k_size // block_k

    def loop(step, start):
        if unroll:
            for i in range(steps):
                start = step(i, start)
            return start
        return lax.fori_loop(0, steps, step, start)

    def span(i):
        return pl.ds(i * block_k if isinstance(i, int) else pl.multiple_of(i * block_k, block_k), block_k)

    fold = layer_norm and fold_norm
    if layer_norm and not fold:  # as model.LayerNorm: biased variance from both moments
        def moments(i, acc):
            x = x_ref[span(i)].astype(jnp.float32)
            return acc[0] + x, acc[1] + x * x

        row = jnp.zeros((block_k,), jnp.float32)
        total, squares = loop(moments, (row, row))
        mean = jnp.sum(total) / k_size
        rstd = lax.rsqrt(jnp.maximum(jnp.sum(squares) / k_size - mean * mean, 0) + epsilon)

    def product(w_ref, scale_ref, out_ref):
        block_n = w_ref.shape[0]

        def add(acc, w, x):
            return acc + (jnp.sum(w * x[None, :], axis=1) if step_sum else w * x[None, :])

        def step(i, accs):
            x = x_ref[span(i)].astype(jnp.float32)
            w = plgpu.load(w_ref.at[:, span(i)], eviction_policy="evict_first" if evict_first else None
                           ).astype(jnp.float32)
            if not fold:
                if layer_norm:
                    x = ((x - mean) * rstd * g_ref[span(i)] + b_ref[span(i)]).astype(compute_dtype).astype(jnp.float32)
                return (add(accs[0], w, x),)
            g, b = g_ref[span(i)], b_ref[span(i)]
            wgx, wg, wb, total, squares = accs
            return (add(wgx, w, g * x), add(wg, w, g), add(wb, w, b), total + x, squares + x * x)

        tile = jnp.zeros((block_n,) if step_sum else (block_n, block_k), jnp.float32)
        row = jnp.zeros((block_k,), jnp.float32)
        accs = loop(step, (tile, tile, tile, row, row) if fold else (tile,))
        total_of = (lambda a: a) if step_sum else (lambda a: jnp.sum(a, axis=1))
        if fold:
            wgx, wg, wb, total, squares = accs
            x_mean = jnp.sum(total) / k_size
            x_rstd = lax.rsqrt(jnp.maximum(jnp.sum(squares) / k_size - x_mean * x_mean, 0) + epsilon)
            y = x_rstd * (total_of(wgx) - x_mean * total_of(wg)) + total_of(wb)
        else:
            y = total_of(accs[0])
        if int8:
            y = y * scale_ref[...]
        if round_first:  # the model rounds a compute-dtype product before its bias
            y = y.astype(compute_dtype).astype(jnp.float32)
        if bias:
            y = y + bias_ref[...].astype(jnp.float32)
        if activation is not None:
            y = jax.nn.gelu(y, approximate=activation == "gelu_tanh")
        if residual:
            y = residual_ref[...] + y
        out_ref[...] = y.astype(out_ref.dtype)

    if n_matrices == 1:
        product(w_refs[0], scale_refs[0], out_refs[0])
        return
    which = pl.program_id(1)
    for i in range(n_matrices):
        pl.when(which == i)(functools.partial(product, w_refs[i], scale_refs[i], out_refs[i]))


@functools.partial(jax.jit, static_argnames=("epsilon", "activation", "round_first", "out_dtype", "compute_dtype",
                                             "tiles", "interpret"))
def fused_matvec(x: jax.Array, matrices: tuple[tuple[jax.Array, jax.Array | None], ...], *,
                 layer_norm: tuple[jax.Array, jax.Array] | None = None, epsilon: float = 1e-5,
                 bias: jax.Array | None = None, activation: str | None = None, round_first: bool = False,
                 residual: jax.Array | None = None, out_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                 tiles: Tiles = Tiles(), interpret: bool = False) -> tuple[jax.Array, ...]:
    """`residual + activation(M LN(x) + bias)` for each matrix M, one [out] row each, in one kernel.

    `x` [in]: one row (float32 for the residual stream). `matrices`: one or
    more (values [out..., in], int8 scale [out...] or None), all of one
    shape; values in the compute dtype or int8 (a float32 matrix in tests).
    `layer_norm` (scale, shift), each [in]: x is normalised first, with
    `epsilon`, as `model.LayerNorm`. `bias` [out...] and `residual`
    [out...] (float32), only with one matrix. With `round_first` the
    product is rounded to `compute_dtype` before the bias, as the model
    rounds a 16-bit product. `activation`: None, "gelu_tanh" or "gelu_erf".
    Returns one array [out...] in `out_dtype` per matrix.
    `interpret=True` runs the kernel in Pallas's interpreter (CPU).
    """
    (first, _), k = matrices[0], x.shape[-1]
    out_shape = first.shape[:-1]
    n = first.size // k
    if x.ndim != 1 or first.shape[-1] != k:
        raise ValueError(f"fused_matvec: x must be one row [in] and the matrices [out..., in]; "
                         f"got x {x.shape} and a matrix {first.shape}")
    if any(m[0].shape != first.shape or m[0].dtype != first.dtype for m in matrices):
        raise ValueError(f"fused_matvec: the matrices must share one shape and dtype, got "
                         f"{[(m[0].shape, str(m[0].dtype)) for m in matrices]}")
    int8 = first.dtype == jnp.int8
    if any((m[1] is not None) != int8 for m in matrices):
        raise ValueError("fused_matvec: int8 matrices need their scales, and only they take one")
    if (bias is not None or residual is not None) and len(matrices) != 1:
        raise ValueError("fused_matvec: a bias or residual goes with one matrix only")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_matvec: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, value in (("bias", bias), ("residual", residual)):
        if value is not None and value.shape != out_shape:
            raise ValueError(f"fused_matvec: {name} must be [out...] = {out_shape}, got {value.shape}")
    tiles = fitted(tiles, n, k)
    block_n, block_k = tiles.block_n, tiles.block_k

    rows = pl.BlockSpec((block_n,), lambda j, i: (j,))
    whole = pl.BlockSpec((k,), lambda j, i: (0,))
    in_specs = [whole] + [pl.BlockSpec((block_n, k), lambda j, i: (j, 0))] * len(matrices)
    operands = [x] + [m[0].reshape(n, k) for m in matrices]
    if int8:
        in_specs += [rows] * len(matrices)
        operands += [m[1].reshape(n).astype(jnp.float32) for m in matrices]
    if layer_norm is not None:
        in_specs += [whole, whole]
        operands += [layer_norm[0].astype(jnp.float32), layer_norm[1].astype(jnp.float32)]
    if bias is not None:
        in_specs.append(rows)
        operands.append(bias.reshape(n))
    if residual is not None:
        in_specs.append(rows)
        operands.append(residual.reshape(n).astype(jnp.float32))
    kernel = functools.partial(
        _kernel, n_matrices=len(matrices), int8=int8, layer_norm=layer_norm is not None, bias=bias is not None,
        residual=residual is not None, activation=activation, round_first=round_first, k_size=k,
        block_k=block_k, epsilon=epsilon, compute_dtype=compute_dtype, unroll=tiles.unroll,
        fold_norm=tiles.fold_norm, step_sum=tiles.step_sum, evict_first=tiles.evict_first)
    outs = pl.pallas_call(
        kernel,
        grid=(n // block_n, len(matrices)),
        in_specs=in_specs,
        out_specs=[rows] * len(matrices),
        out_shape=[jax.ShapeDtypeStruct((n,), out_dtype)] * len(matrices),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="pangu_fused_matvec",
    )(*operands)
    return tuple(o.reshape(out_shape) for o in outs)


REPS = 10
OPS = ("ln1+qkv", "out+residual", "ln2+up+gelu", "down+residual")


def parse_tiles(text: str) -> Tiles:
    """"8x512w4s2u1" -> Tiles(8, 512, 4, 2, True); a trailing f, r, e: fold_norm, step_sum, evict_first."""
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)u([01])(f?)(r?)(e?)", text)
    if not m:
        raise ValueError(f"--tiles: expected NxKwWsSuU[f][r][e] like 8x512w4s2u1 or 8x512w4s1u1re, got {text!r}")
    n, k, w, s, u = map(int, m.groups()[:5])
    return Tiles(n, k, w, s, bool(u), bool(m.group(6)), bool(m.group(7)), bool(m.group(8)))


def tiles_name(t: Tiles) -> str:
    return (f"{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages}u{int(t.unroll)}"
            + "f" * t.fold_norm + "r" * t.step_sum + "e" * t.evict_first)


SWEEP = ([Tiles(n, k, w, 1, True) for n, k, w in itertools.product((1, 2, 4, 8), (256, 512), (1, 2, 4))]
         + [Tiles(n, 512, w, 1, True, step_sum=True) for n, w in itertools.product((2, 4, 8), (2, 4))]
         + [Tiles(n, 512, 2, 1, True, fold_norm=True) for n in (2, 4)]
         + [Tiles(n, 512, w, s, False) for n, w, s in itertools.product((2, 4), (2, 4), (2, 4))])


def _matrix(key, shape, c: PanguConfig):
    if c.weights == "int8":
        values = jax.random.randint(key, shape, -127, 128, jnp.int8)
        return values, jnp.full(shape[:1], 0.02 / 64, jnp.float32)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(c.jnp_dtype), None


def make_layers(c: PanguConfig, seed: int = 0) -> list[dict]:
    """Per layer: the four ops' matrices, LayerNorm parameters and biases."""
    h, f = c.hidden_size, c.ffn_size
    rng = np.random.default_rng(seed)
    layers = []
    for i, key in enumerate(jax.random.split(jax.random.key(seed), c.num_layers)):
        k = jax.random.split(key, 6)
        vec = lambda n, mu, sd: jnp.asarray(mu + sd * rng.normal(size=n), jnp.float32)  # noqa: E731
        layers.append({
            "qkv": tuple(_matrix(k[j], (h, h), c) for j in range(3)),
            "out": _matrix(k[3], (h, h), c), "up": _matrix(k[4], (f, h), c), "down": _matrix(k[5], (h, f), c),
            "ln1": (vec(h, 1, 0.1), vec(h, 0, 0.1)), "ln2": (vec(h, 1, 0.1), vec(h, 0, 0.1)),
            "out_bias": vec(h, 0, 0.1), "up_bias": vec(f, 0, 0.1).astype(c.jnp_param_dtype),
            "down_bias": vec(h, 0, 0.1),
        })
    return layers


def xla_ops(c: PanguConfig):
    """op -> fn(x, residual, layer): the model's code for it."""
    def ln(x, params):
        return LayerNorm(c.layer_norm_epsilon).apply({"params": {"scale": params[0], "bias": params[1]}}, x)

    def qkv(x, r, p):
        a = ln(x[None], p["ln1"])
        return tuple(_dot(c, "bi,oi->bo", a, m)[0] for m in p["qkv"])

    def out(o, r, p):
        return (r + (_dot(c, "bi,oi->bo", o[None], p["out"], preferred_element_type=jnp.float32)[0]
                     + p["out_bias"]),)

    def up(x, r, p):
        y = _dot(c, "bi,oi->bo", ln(x[None], p["ln2"]), p["up"])[0].astype(jnp.float32)
        return (jax.nn.gelu(y + p["up_bias"].astype(jnp.float32),
                            approximate=c.activation == "gelu_tanh").astype(c.jnp_dtype),)

    def down(h, r, p):
        return (r + (_dot(c, "bi,oi->bo", h[None], p["down"], preferred_element_type=jnp.float32)[0]
                     + p["down_bias"]),)

    return dict(zip(OPS, (qkv, out, up, down)))


def kernel_ops(c: PanguConfig, tiles: dict, interpret: bool = False):
    """op -> fn(x, residual, layer) through `fused_matvec` with `tiles[op]` (`interpret`: on a CPU)."""
    common = dict(epsilon=c.layer_norm_epsilon, compute_dtype=c.jnp_dtype, interpret=interpret)
    act = c.activation
    return {
        "ln1+qkv": lambda x, r, p: fused_matvec(x, p["qkv"], layer_norm=p["ln1"], out_dtype=c.jnp_dtype,
                                                 round_first=True, tiles=tiles["ln1+qkv"], **common),
        "out+residual": lambda o, r, p: fused_matvec(o, (p["out"],), bias=p["out_bias"], residual=r,
                                                      tiles=tiles["out+residual"], **common),
        "ln2+up+gelu": lambda x, r, p: fused_matvec(x, (p["up"],), layer_norm=p["ln2"], bias=p["up_bias"],
                                                     activation=act, round_first=True, out_dtype=c.jnp_dtype,
                                                     tiles=tiles["ln2+up+gelu"], **common),
        "down+residual": lambda h, r, p: fused_matvec(h, (p["down"],), bias=p["down_bias"], residual=r,
                                                       tiles=tiles["down+residual"], **common),
    }


def _op_input(c: PanguConfig, op: str, rng):
    _, out, width = op_matrices(c, op)
    dtype = jnp.float32 if op.startswith("ln") else c.jnp_dtype
    return jnp.asarray(rng.normal(size=width), dtype), jnp.asarray(rng.normal(size=out), jnp.float32)


def op_loop(fn, layers):
    """REPS passes over every layer's op on one input; every output is carried, each pass seeded by the last."""
    @jax.jit
    def run(x, r, layers):
        def body(_, carry):
            _, seed = carry
            xi = x + seed.astype(x.dtype)
            outs = tuple(fn(xi, r, p) for p in layers)
            return outs, outs[-1][0][0].astype(jnp.float32) * 0
        first = tuple(jax.eval_shape(fn, x, r, p) for p in layers)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
        return jax.lax.fori_loop(0, REPS, body, (zeros, jnp.float32(0)))[0]
    return run


def layer_loop(ops):
    """REPS passes of the layers chained through the residual stream."""
    @jax.jit
    def run(x, layers):
        def body(_, x):
            for p in layers:
                q, k, v = ops["ln1+qkv"](x, None, p)
                x, = ops["out+residual"](q + k + v, x, p)
                h, = ops["ln2+up+gelu"](x, None, p)
                x, = ops["down+residual"](h, x, p)
            return x * 0.5
        return jax.lax.fori_loop(0, REPS, body, x)
    return run


def op_matrices(c: PanguConfig, op: str) -> tuple[int, int, int]:
    """(matrices, out, in) of an op."""
    h, f = c.hidden_size, c.ffn_size
    return {"ln1+qkv": (3, h, h), "out+residual": (1, h, h), "ln2+up+gelu": (1, f, h), "down+residual": (1, h, f)}[op]


def op_bytes(c: PanguConfig, op: str) -> int:
    count, n, k = op_matrices(c, op)
    return count * n * k * (1 if c.weights == "int8" else jnp.dtype(c.jnp_param_dtype).itemsize)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--weights", default="float", choices=["float", "int8"])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--tiles", default="8x512w4s1u1", help="comma-separated tile shapes to time per op")
    p.add_argument("--sweep", action="store_true", help=f"also the {len(SWEEP)} tile shapes of SWEEP")
    p.add_argument("--layer", action="store_true", help="also whole chained layers with each op's fastest tiles")
    p.add_argument("--json")
    args = p.parse_args()
    c = PanguConfig.preset(args.model, dtype=args.dtype, param_dtype=args.dtype, weights=args.weights)
    layers = make_layers(c)
    card, rng, rows, best = _card(), np.random.default_rng(1), [], {}
    candidates = [parse_tiles(t) for t in args.tiles.split(",") if t] + (SWEEP if args.sweep else [])
    for op in args.ops.split(","):
        x, r = _op_input(c, op, rng)
        nbytes = op_bytes(c, op) * len(layers)
        calls = REPS * len(layers)
        reference = op_loop(xla_ops(c)[op], layers)
        want = reference(x, r, layers)
        xla_us = _median_time(lambda: jax.block_until_ready(reference(x, r, layers)), 7) / calls * 1e6
        rows.append({"op": op, "impl": "xla", "us": xla_us, "TBps": nbytes / len(layers) / xla_us / 1e6})
        print(json.dumps(rows[-1]), flush=True)
        _, n, k = op_matrices(c, op)
        for tiles in dict.fromkeys(fitted(t, n, k) for t in candidates):
            run = op_loop(kernel_ops(c, {o: tiles for o in OPS})[op], layers)
            try:
                got = run(x, r, layers)
                us = _median_time(lambda: jax.block_until_ready(run(x, r, layers)), 7) / calls * 1e6
            except Exception as e:  # a tile shape Triton cannot compile
                print(f"{op} {tiles_name(tiles)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                       for gs, ws in zip(got, want) for g, w in zip(gs, ws))
            rows.append({"op": op, "impl": "kernel", "tiles": tiles_name(tiles), "us": us,
                         "TBps": nbytes / len(layers) / us / 1e6, "vs_xla": xla_us / us, "max_diff": diff})
            print(json.dumps(rows[-1]), flush=True)
            if op not in best or us < best[op][1]:
                best[op] = (tiles, us)
    if args.layer and len(best) == len(OPS):
        x = jnp.asarray(rng.normal(size=c.hidden_size), jnp.float32)
        for impl, ops in (("xla", xla_ops(c)), ("kernel", kernel_ops(c, {o: t for o, (t, _) in best.items()}))):
            run = layer_loop(ops)
            got = run(x, layers)
            us = _median_time(lambda: jax.block_until_ready(run(x, layers)), 7) / (REPS * len(layers)) * 1e6
            nbytes = sum(op_bytes(c, o) for o in OPS)
            rows.append({"op": "layer", "impl": impl, "us": us, "TBps": nbytes / us / 1e6,
                         "tiles": " ".join(tiles_name(t) for t, _ in best.values()) if impl == "kernel" else "",
                         "out_mean_abs": float(jnp.mean(jnp.abs(got)))})
            print(json.dumps(rows[-1]), flush=True)
    title = (f"decode products at one row, {args.model} {args.dtype} {args.weights}, on {card}, "
             f"{time.strftime('%Y-%m-%d')}")
    shown = [r for r in rows if r["impl"] == "xla" or r["op"] == "layer"] + [
        next(r for r in rows if r["op"] == op and r.get("tiles") == tiles_name(t)) for op, (t, _) in best.items()]
    _print_table(title, shown, ["op", "impl", "tiles", "us", "TBps", "vs_xla", "max_diff"])
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": time.strftime("%Y-%m-%d"), "card": card, "model": args.model, "dtype": args.dtype,
                       "weights": args.weights,
                       "command": "python benchmarks/fused_matvec_experiment.py " + " ".join(sys.argv[1:]),
                       "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
