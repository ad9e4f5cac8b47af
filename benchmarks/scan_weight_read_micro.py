"""Does reading stacked layer weights through a scan cost extra bytes at batch 1?

    python benchmarks/scan_weight_read_micro.py

32 layers of x + gelu(x @ W1) @ W2 (H=2560, F=10240, bfloat16, batch 1),
20 steps inside a fori_loop as a decode loop would run them; weights are jit
arguments. Prints ms per step and the effective weight-read bandwidth.
"""

import statistics
import time

import jax
import jax.numpy as jnp

L, H, F, STEPS = 32, 2560, 10240, 20


def layer(x, w1, w2):
    return x + jax.nn.gelu(x @ w1) @ w2


@jax.jit
def scanned(x, up, down):
    def step(_, x):
        return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (up, down))[0]
    return jax.lax.fori_loop(0, STEPS, step, x)


@jax.jit
def looped(x, ups, downs):
    def step(_, x):
        for a, b in zip(ups, downs):
            x = layer(x, a, b)
        return x
    return jax.lax.fori_loop(0, STEPS, step, x)


def main():
    k = jax.random.split(jax.random.key(0), 3)
    up = jax.random.normal(k[0], (L, H, F), jnp.bfloat16) * 0.01
    down = jax.random.normal(k[1], (L, F, H), jnp.bfloat16) * 0.01
    ups, downs = [up[i] for i in range(L)], [down[i] for i in range(L)]
    x = jax.random.normal(k[2], (1, H), jnp.bfloat16)
    weight_bytes = 2 * up.nbytes
    print(jax.devices()[0].device_kind, jax.__version__)
    for name, fn, args in [("scan over stacked weights", scanned, (up, down)),
                           ("python loop over per-layer arrays", looped, (ups, downs))]:
        fn(x, *args).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(x, *args).block_until_ready()
            times.append((time.perf_counter() - start) / STEPS)
        ms = statistics.median(times) * 1e3
        print(f"{name:36s} {ms:.3f} ms/step  {weight_bytes / (ms / 1e3) / 1e9:.0f} GB/s effective")


if __name__ == "__main__":
    main()
