"""Can a LayerNorm's normalisation ride inside the one-row product that reads it, as XLA fuses it?

    python benchmarks/layernorm_fold_micro.py [--model 2.6B] [--dtype bfloat16]
        [--forms ln,ln_f32,centered,centered16,sigma] [--outputs 7680] [--profile] [--json PATH]

Decoding one row, each LayerNorm costs two small kernels before its
product: the moments (a reduction), then the normalisation (a loop fusion
that XLA does not fuse into the row reduction reading it). This times a
chain of the preset's layers of "LayerNorm, then a product with a distinct
[outputs, embed] matrix stored output first" (the residual add after each
product closes the chain), with the norm written different ways:

- `ln`: the model's (`pangu_jax.model.LayerNorm`, converted to the compute
  dtype, then `_reduction_dot`);
- `ln_f32`: the same, not converted;
- `centered`: only the centring and the scale go before the product,
  ((x - mean) * scale) . W, and rsqrt(var + eps) and the LayerNorm's bias
  after it: r * acc + (W . bias + product bias), the second term computed
  once outside the chain (a decoder would keep it with the weights);
- `centered16`: the same, the centred input converted to the compute dtype;
- `sigma`: the bias through the product too, ((x - mean) * scale + bias *
  sqrt(var + eps)) . W, so only r * acc + product bias after it, nothing
  precomputed.

Each form's output is checked against `ln_f32`'s; with `--profile`, the GPU
kernels per layer (`infer/bench.py`'s `profile_kernels`).

Measured on an H200 (2026-12-01;
`benchmarks/results/2026-12-01-h200-layernorm-fold-micro.json`): XLA fuses
no form's producer into the row reduction, not even the centring alone; the
folded forms run one kernel a layer more (the rsqrt after the product) and
take the same time within 2%. So the model keeps its LayerNorm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, _median_time, append_record, profile_kernels  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402
from pangu_jax.model import _reduction_dot  # noqa: E402

FORMS = ("ln", "ln_f32", "centered", "centered16", "sigma")


def _moments(x, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0)
    return mean, var + eps


def layer(form: str, x, scale, bias, w, product_bias, folded_bias, eps, dtype):
    """LayerNorm(x) . w^T + product_bias for x [1, embed] float32, w [outputs, embed]: float32 [1, outputs]."""
    mean, var = _moments(x, eps)
    if form in ("ln", "ln_f32"):
        a = (x - mean) * jax.lax.rsqrt(var) * scale + bias
        return _reduction_dot(a.astype(dtype) if form == "ln" else a, w, 1, 1) + product_bias
    if form in ("centered", "centered16"):
        a = (x - mean) * scale
        acc = _reduction_dot(a.astype(dtype) if form == "centered16" else a, w, 1, 1)
        return acc * jax.lax.rsqrt(var) + folded_bias
    if form == "sigma":
        a = (x - mean) * scale + bias * jnp.sqrt(var)
        return _reduction_dot(a, w, 1, 1) * jax.lax.rsqrt(var) + product_bias
    raise ValueError(f"unknown form {form!r}")


ROUNDS = 8  # the chain run this many times in one call, so that dispatch is not timed


def chain(form: str, eps: float, dtype, rounds: int = ROUNDS):
    def once(x, layers):
        for scale, bias, w, product_bias, folded_bias in layers:
            y = layer(form, x, scale, bias, w, product_bias, folded_bias, eps, dtype)
            x = x + y[:, : x.shape[1]] * 0.01
        return x

    return jax.jit(lambda x, layers: jax.lax.fori_loop(0, rounds, lambda _, x: once(x, layers), x))


def make_layers(count: int, outputs: int, embed: int, dtype, key):
    layers = []
    for k in jax.random.split(key, count):
        ks = jax.random.split(k, 4)
        w = (jax.random.normal(ks[0], (outputs, embed), jnp.float32) * 0.02).astype(dtype)
        scale = 1 + 0.1 * jax.random.normal(ks[1], (embed,), jnp.float32)
        bias = 0.1 * jax.random.normal(ks[2], (embed,), jnp.float32)
        product_bias = 0.1 * jax.random.normal(ks[3], (outputs,), jnp.float32)
        folded = _reduction_dot(bias[None], w, 1, 1)[0] + product_bias
        layers.append((scale, bias, w, product_bias, folded))
    return layers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--outputs", type=int, default=None, help="rows of each matrix (default 3 x embed: q/k/v)")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's blocks")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    forms = args.forms.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise SystemExit(f"--forms: unknown form {unknown[0]!r}; choose from {', '.join(FORMS)}")
    c = PanguConfig.preset(args.model)
    dtype = jnp.dtype(args.dtype)
    embed = c.hidden_size
    outputs = args.outputs or 3 * embed
    count = args.layers or c.num_blocks
    layers = make_layers(count, outputs, embed, dtype, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, embed), jnp.float32) + 0.5
    reference = chain("ln_f32", c.layer_norm_epsilon, dtype)(x, layers)
    steps = ROUNDS * count
    rows = []
    for form in forms:
        run = chain(form, c.layer_norm_epsilon, dtype)
        out = jax.block_until_ready(run(x, layers))
        seconds = _median_time(lambda: jax.block_until_ready(run(x, layers)), args.repeats) / steps
        row = {"form": form, "model": args.model, "dtype": args.dtype, "outputs": outputs, "layers": count,
               "us_per_layer": seconds * 1e6,
               "max_abs_diff_vs_ln_f32": float(jnp.max(jnp.abs(out - reference))),
               "weight_TBps": outputs * embed * dtype.itemsize / seconds / 1e12}
        if args.profile:
            found = profile_kernels(lambda: run(x, layers), steps, top=8)
            row.update(kernels_per_layer=found["kernels_per_step"], kernel_us_per_layer=found["kernel_us_per_step"],
                       top=found["top"])
        rows.append(row)
        print(f"{form:12s} {row['us_per_layer']:8.2f} us/layer  {row['weight_TBps']:.2f} TB/s  "
              f"kernels/layer {row.get('kernels_per_layer', '-')}  diff {row['max_abs_diff_vs_ln_f32']:.2e}",
              flush=True)
    if args.json:
        append_record(args.json, "python benchmarks/layernorm_fold_micro.py " + " ".join(argv or sys.argv[1:]),
                      _card(), rows)
    print(f"median of {args.repeats} calls of {ROUNDS} rounds of the chain; {_card()}")


if __name__ == "__main__":
    main()
