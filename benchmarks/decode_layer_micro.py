"""Which layer structure decodes fastest at batch 1? Variants of one T=1 decode step.

    python benchmarks/decode_layer_micro.py [--model 2.6B] [--cache 144,1024] [--json PATH]

32 pre-LayerNorm blocks of the given preset's sizes in bfloat16, per-layer
weight arrays, a key/value cache of `--cache` slots, then the tied head and
an argmax that feeds the next step; 16 steps in a fori_loop, as the library
decodes. Variants:

    qkv      separate: three projections (the library today); fused: one [E, 3E] matmul
    attend   apart: scores against the cache and the new key computed apart, then joined
             (the library today); write_first: the new key/value written into the cache
             first, then one attention over the cache
    cache    bsnd: [batch, slots, heads, head_dim] (the library today); bnsd: heads before slots

Prints ms per step, and per variant the GPU kernels per step and their summed
time against the wall time (`infer/bench.py`'s `profile_kernels`).
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

from infer.bench import measure_copy_bandwidth, profile_kernels  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402

STEPS = 16
DT = jnp.bfloat16


def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5)


def make_weights(c: PanguConfig, key, fused: bool):
    e, f, layers = c.hidden_size, c.ffn_size, c.num_layers - 1
    keys = iter(jax.random.split(key, 16 * layers + 2))

    def normal(*shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(DT)

    blocks = []
    for _ in range(layers):
        w = {"o": normal(e, e), "o_t": normal(e, e), "up": normal(e, f), "down": normal(f, e),
             "bo": normal(e), "bup": normal(f), "bdown": normal(e)}
        if fused:
            w.update(qkv=normal(e, 3 * e), bqkv=normal(3 * e))
        else:
            w.update(q=normal(e, e), k=normal(e, e), v=normal(e, e), bq=normal(e), bk=normal(e), bv=normal(e))
        blocks.append(w)
    return blocks, normal(c.vocab_size, e)


def decode_steps(c: PanguConfig, fused: bool, attend: str, cache_layout: str, out_proj: str = "2d"):
    n, d = c.num_heads, c.head_dim

    def split_heads(t):
        return t.reshape(t.shape[0], 1, n, d)

    def block(x, w, cache, positions, pos, index):
        a = layer_norm(x.astype(jnp.float32)).astype(DT)
        if fused:
            q, k, v = jnp.split(a @ w["qkv"] + w["bqkv"], 3, axis=-1)
        else:  # the library's [E, heads, head_dim] kernels
            q, k, v = (jnp.einsum("be,enk->bnk", a, w[m].reshape(-1, n, d)).reshape(a.shape[0], -1) + w["b" + m]
                       for m in "qkv")
        q, k, v = split_heads(q * (1 / d**0.5)), split_heads(k), split_heads(v)
        keys, values = cache
        if cache_layout == "bnsd":
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            slot_axis, scores_eq, mix_eq = 2, "btnk,bnsk->bnts", "bnts,bnsk->btnk"
        else:
            slot_axis, scores_eq, mix_eq = 1, "btnk,bsnk->bnts", "bnts,bsnk->btnk"
        visible = (positions >= 0) & (positions <= pos)
        if attend == "write_first":
            keys = lax.dynamic_update_slice_in_dim(keys, k, index, slot_axis)
            values = lax.dynamic_update_slice_in_dim(values, v, index, slot_axis)
            s = jnp.einsum(scores_eq, q, keys, preferred_element_type=jnp.float32)
            p = jax.nn.softmax(jnp.where(visible[:, None, None, :], s, -1e9), axis=-1)
            out = jnp.einsum(mix_eq, p.astype(DT), values)
        else:
            s_old = jnp.einsum(scores_eq, q, keys, preferred_element_type=jnp.float32)
            s_old = jnp.where(visible[:, None, None, :], s_old, -1e9)
            kk = k if cache_layout == "bsnd" else k.transpose(0, 2, 1, 3)
            vv = v if cache_layout == "bsnd" else v.transpose(0, 2, 1, 3)
            s_new = jnp.einsum("btnk,bsnk->bnts", q, kk, preferred_element_type=jnp.float32)
            p = jax.nn.softmax(jnp.concatenate([s_old, s_new], -1), axis=-1)
            out = (jnp.einsum(mix_eq, p[..., :-1].astype(DT), values)
                   + jnp.einsum("bnts,bsnk->btnk", p[..., -1:].astype(DT), vv))
            keys = lax.dynamic_update_slice_in_dim(keys, k, index, slot_axis)
            values = lax.dynamic_update_slice_in_dim(values, v, index, slot_axis)
        flat = out.reshape(x.shape[0], -1)
        if out_proj == "2d":
            y = flat @ w["o"]
        elif out_proj == "3d":
            y = jnp.einsum("bnk,nke->be", out.reshape(x.shape[0], n, d), w["o"].reshape(n, d, -1))
        elif out_proj == "transposed":  # stored [out, in]: the contraction runs along contiguous rows
            y = jnp.einsum("bi,oi->bo", flat, w["o_t"])
        else:  # "f32": accumulate and return float32
            y = jnp.dot(flat, w["o"], preferred_element_type=jnp.float32)
        x = x + (y + w["bo"]).astype(jnp.float32)
        h = layer_norm(x).astype(DT)
        h = jax.nn.gelu((h @ w["up"]).astype(jnp.float32) + w["bup"], approximate=True).astype(DT)
        return x + (h @ w["down"] + w["bdown"]).astype(jnp.float32), (keys, values)

    @jax.jit
    def run(blocks, head, state):
        def step(_, st):
            token, caches, positions, index = st
            pos = index  # every row at the same position: enough for timing
            positions = lax.dynamic_update_slice_in_dim(positions, jnp.full((positions.shape[0], 1), pos), index, 1)
            x = head[token].astype(jnp.float32)
            new = []
            for w, cache in zip(blocks, caches):
                x, cache = block(x, w, cache, positions, pos, index)
                new.append(cache)
            logits = jnp.einsum("be,ve->bv", layer_norm(x).astype(DT), head, preferred_element_type=jnp.float32)
            return jnp.argmax(logits, -1).astype(jnp.int32), tuple(new), positions, index + 1
        return lax.fori_loop(0, STEPS, step, state)

    return run


def init_state(c: PanguConfig, batch: int, slots: int, cache_layout: str):
    shape = ((batch, slots, c.num_heads, c.head_dim) if cache_layout == "bsnd"
             else (batch, c.num_heads, slots, c.head_dim))
    caches = tuple((jnp.zeros(shape, DT), jnp.zeros(shape, DT)) for _ in range(c.num_layers - 1))
    positions = jnp.full((batch, slots), -1, jnp.int32).at[:, :16].set(jnp.arange(16))
    return jnp.zeros((batch,), jnp.int32), caches, positions, jnp.int32(16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--cache", default="144,1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="also count kernels per step (GPU only)")
    p.add_argument("--json")
    args = p.parse_args()
    c = PanguConfig.preset(args.model)
    card = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
    bandwidth = measure_copy_bandwidth()
    rows = []
    weights = {fused: make_weights(c, jax.random.key(0), fused) for fused in (False, True)}
    variants = [  # name: (fused qkv, attend, cache layout, output projection)
        ("library", (False, "write_first", "bsnd", "2d")),
        ("out_3d", (False, "write_first", "bsnd", "3d")),
        ("out_transposed", (False, "write_first", "bsnd", "transposed")),
        ("out_f32", (False, "write_first", "bsnd", "f32")),
        ("attend_apart", (False, "apart", "bsnd", "2d")),
        ("cache_bnsd", (False, "write_first", "bnsd", "2d")),
        ("fused_qkv", (True, "write_first", "bsnd", "2d")),
        ("fused_qkv_transposed_bnsd", (True, "write_first", "bnsd", "transposed")),
    ]
    for slots, (name, (fused, attend, layout, out_proj)) in itertools.product(map(int, args.cache.split(",")),
                                                                              variants):
        blocks, head = weights[fused]
        run = decode_steps(c, fused, attend, layout, out_proj)
        state = init_state(c, args.batch, slots, layout)
        state = jax.block_until_ready(run(blocks, head, state))
        times = []
        for _ in range(7):
            start = time.perf_counter()
            state = jax.block_until_ready(run(blocks, head, state))
            times.append((time.perf_counter() - start) / STEPS)
        nbytes = sum(x.nbytes for x in jax.tree.leaves((blocks, head, state[1])))
        nbytes -= sum(w["o_t"].nbytes for w in blocks)  # one output projection is read per variant
        row = {"variant": name, "batch": args.batch, "cache_slots": slots, "qkv": "fused" if fused else "separate",
               "attend": attend, "cache": layout, "out_proj": out_proj,
               "ms_per_step": statistics.median(times) * 1e3, "limit_ms": nbytes / bandwidth * 1e3}
        row["ratio_to_limit"] = row["limit_ms"] / row["ms_per_step"]
        if args.profile:
            found = profile_kernels(lambda: run(blocks, head, state), STEPS, top=12)
            row.update(found)
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps([{"date": time.strftime("%Y-%m-%d"), "card": card,
                                                 "command": "python benchmarks/decode_layer_micro.py " +
                                                 " ".join(sys.argv[1:]), "rows": rows}], indent=1))


if __name__ == "__main__":
    main()
