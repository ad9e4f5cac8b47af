"""The network's matrix products: an einsum in the compute dtype, or, for one row, a reduction along the rows.

Every matrix is stored output first ([out..., in...]), so that a product with
a single input row (decoding one sequence) can read the matrix along its
rows: with `PanguConfig.matvec == "reduction"` such a product runs as
float32 products summed along the matrix's rows, which on a GPU reads the
weights faster than XLA's matmul does (above all an int8 matrix, which the
einsum first converts). From two rows on, each row would read the matrix
again, so the einsum runs. benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from .config import PanguConfig

# A matrix and, for int8 weights, its float32 scale over the output channels.
Matrix = tuple[jax.Array, jax.Array | None]

# The names a widened product's output carries (`einsum`), for remat policies that save products
# (`model.REMAT_POLICIES`): its custom gradient hides its dot from jax.checkpoint_policies.checkpoint_dots.
WIDENED_PRODUCT = "widened_product"
WIDENED_BATCHED_PRODUCT = "widened_batched_product"  # with dims both operands and the output keep

# Products with at most this many input rows run as a row reduction (with `matvec="reduction"`).
REDUCTION_ROWS = 1


def dot(config: PanguConfig, equation: str, x: jax.Array, matrix: Matrix, **kwargs) -> jax.Array:
    """einsum in the compute dtype; an int8 matrix's scale multiplies the output's trailing channel dims.

    `equation` is "x,w->out" with x [rows..., in...] and w [in..., out...]
    or [out..., in...] (only the latter can run as a row reduction).
    """
    values, scale = matrix
    kept, contracted, w_kept, w_dims = split_equation(equation)
    rows = math.prod(x.shape[:len(kept)])
    if config.matvec == "reduction" and w_dims == w_kept + contracted and rows <= REDUCTION_ROWS:
        y = reduction_dot(x.astype(config.jnp_dtype), values, len(kept), len(w_kept))
        y = y if scale is None else y * scale
        return y.astype(kwargs.get("preferred_element_type", config.jnp_dtype))
    y = einsum(config, equation, x, values, kwargs.get("preferred_element_type"))
    return y if scale is None else (y * scale).astype(y.dtype)


def einsum(config: PanguConfig, equation: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """jnp.einsum of `a` and `b` in the compute dtype, its output in `out_dtype` (default: the compute dtype).

    A wider output keeps the products' sums in that dtype. Differentiated,
    such a product's cotangent is cast to the compute dtype before the
    backward's two products, so that they run in the compute dtype as the
    forward's does (mixed-precision training's rule); JAX's own transpose
    would multiply the wide cotangent by the widened operand, on a GPU in
    float32 at a fraction of the bfloat16 rate.
    """
    a, b = a.astype(config.jnp_dtype), b.astype(config.jnp_dtype)
    if out_dtype is None or jnp.dtype(out_dtype) == config.jnp_dtype:
        return jnp.einsum(equation, a, b, precision=matmul_precision(config))
    y = _widened_einsum(equation, matmul_precision(config), jnp.dtype(out_dtype), a, b)
    inputs, out = equation.split("->")
    batched = any(d in out for d in set(inputs.split(",")[0]) & set(inputs.split(",")[1]))
    return checkpoint_name(y, WIDENED_BATCHED_PRODUCT if batched else WIDENED_PRODUCT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _widened_einsum(equation: str, precision, out_dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(equation, a, b, precision=precision, preferred_element_type=out_dtype)


def _widened_einsum_forward(equation, precision, out_dtype, a, b):
    return _widened_einsum(equation, precision, out_dtype, a, b), (a, b)


def _widened_einsum_backward(equation, precision, out_dtype, operands, cotangent):
    a, b = operands
    _, transpose = jax.vjp(functools.partial(jnp.einsum, equation, precision=precision), a, b)
    return transpose(cotangent.astype(a.dtype))


_widened_einsum.defvjp(_widened_einsum_forward, _widened_einsum_backward)


def split_equation(equation: str) -> tuple[str, str, str, str]:
    """(x's kept dims, the contracted dims, w's kept dims, w's) of "x,w->out" where x's contracted dims trail."""
    inputs, out = equation.split("->")
    x_dims, w_dims = inputs.split(",")
    contracted = "".join(d for d in x_dims if d in w_dims and d not in out)
    kept, w_kept = x_dims[:len(x_dims) - len(contracted)], "".join(d for d in w_dims if d not in contracted)
    if x_dims != kept + contracted or out != kept + w_kept or w_dims not in (contracted + w_kept, w_kept + contracted):
        raise ValueError(f"dot: {equation!r} is not x [rows..., in...] times w [in..., out...] or [out..., in...]")
    return kept, contracted, w_kept, w_dims


def reduction_dot(x: jax.Array, w: jax.Array, rows_ndim: int, outputs_ndim: int) -> jax.Array:
    """x [rows..., in...] times w [out..., in...] as products summed along w's rows, in float32.

    A matrix with more inputs than outputs (the FFN's down projection) has
    its rows cut into as many parts as it has inputs per output, summed
    apart and then added elementwise: rows as long as they are many read
    fastest, and XLA fuses the elementwise adds into the kernels that read
    the result. The optimization barrier keeps XLA from merging the two sums
    back into one.
    """
    size = math.prod(w.shape[outputs_ndim:])
    outputs = w.size // size
    parts = size // outputs if size > outputs and size % outputs == 0 else 1
    y = jnp.sum(x.reshape(-1, 1, parts, size // parts).astype(jnp.float32)
                * w.reshape(outputs, parts, size // parts).astype(jnp.float32), axis=3)
    if parts > 1:
        y = lax.optimization_barrier(y)
    y = functools.reduce(operator.add, (y[..., part] for part in range(parts)))
    return y.reshape(x.shape[:rows_ndim] + w.shape[:outputs_ndim])


def matmul_precision(config: PanguConfig):
    """float32 means float32: keep GPUs from silently using TF32 (and float64 from anything less)."""
    return lax.Precision.HIGHEST if config.dtype in ("float32", "float64") else lax.Precision.DEFAULT
