"""Does reading stacked layer weights through scan/slices cost extra bytes at batch 1?"""
import time, statistics, jax, jax.numpy as jnp
L, H, F = 32, 2560, 10240
k = jax.random.split(jax.random.key(0), 3)
up = jax.random.normal(k[0], (L, H, F), jnp.bfloat16) * 0.01
down = jax.random.normal(k[1], (L, F, H), jnp.bfloat16) * 0.01
ups = [up[i] for i in range(L)]; downs = [down[i] for i in range(L)]
x0 = jax.random.normal(k[2], (1, H), jnp.bfloat16)
bytes_ = 2 * up.nbytes
def layer(x, w1, w2):
    return x + jax.nn.gelu(x @ w1) @ w2
@jax.jit
def scanned(x, up, down):
    return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (up, down))[0]
@jax.jit
def looped(x, ups, downs):
    for a, b in zip(ups, downs): x = layer(x, a, b)
    return x
@jax.jit
def sliced(x, up, down):
    for i in range(L): x = layer(x, up[i], down[i])
    return x
def steps(f, *w):
    @jax.jit
    def run(x):
        return jax.lax.fori_loop(0, 20, lambda i, x: f(x, *w), x)
    return run
for name, fn, w in [("scan", scanned, (up, down)), ("python-loop separate arrays", looped, (ups, downs)),
                    ("python-loop static slices", sliced, (up, down))]:
    run = steps(fn, *w); run(x0).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); run(x0).block_until_ready(); ts.append((time.perf_counter() - t) / 20)
    ms = statistics.median(ts) * 1e3
    print(f"{name:32s} {ms:.3f} ms/step  {bytes_ / (ms / 1e3) / 1e9:.0f} GB/s effective")
