"""Inference benchmark: one command per table, random weights, medians.

    python infer/bench.py decode   --model 2.6B --dtypes float16,bfloat16
    python infer/bench.py baselines --model 2.6B
    python infer/bench.py throughput --model 2.6B --batches 8,32,64
    python infer/bench.py prefill  --model 2.6B

Each case runs in its own process so that peak GPU memory
(`memory_stats()['peak_bytes_in_use']`) belongs to that case alone. Every
table states the card, the physical limit measured in the same run (copy
bandwidth through JAX, bf16 matmul rate) and the ratio to it. `--json PATH`
writes the rows for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ORIGINAL_MIB = {"2.6B/float16": 6728, "2.6B/float32": 17214, "13B/float16": 26430}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up: compile and first touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device pass."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    scale = jax.jit(lambda v: v * 2)
    seconds = _median_time(lambda: scale(x).block_until_ready(), 10)
    return 2 * x.nbytes / seconds


def measure_matmul_rate() -> float:
    import jax
    import jax.numpy as jnp

    n = 8192
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / _median_time(lambda: mm(a, b).block_until_ready(), 10)


def _device_model(model: str, dtype: str):
    import jax

    from pangu_jax import PanguConfig, init_params

    config = PanguConfig.preset(model, param_dtype=dtype, dtype=dtype)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    jax.block_until_ready(params)
    return config, params


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _peak_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0)


def case_decode(model: str, dtype: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """ms per new token from generate(), as the slope between two lengths."""
    import jax
    import numpy as np

    from pangu_jax import generate
    from pangu_jax.model import init_cache

    config, params = _device_model(model, dtype)
    bandwidth = measure_copy_bandwidth()
    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (batch, prompt)).tolist()

    def run(n):
        return lambda: generate(config, params, prompts, n, temperature=0, stop_ids=())

    short = _median_time(run(1), repeats)
    long = _median_time(run(new + 1), repeats)
    per_token = (long - short) / new
    weight_bytes = _tree_bytes(params)
    cache_bytes = _tree_bytes(jax.eval_shape(lambda: init_cache(config, batch, prompt + new)))
    limit = (weight_bytes + cache_bytes) / bandwidth
    return {
        "case": "decode", "model": model, "dtype": dtype, "batch": batch, "prompt": prompt, "new_tokens": new,
        "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token,
        "limit_ms": limit * 1e3, "ratio_to_limit": limit / per_token,
        "first_token_ms": short * 1e3, "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
        "copy_bandwidth_GBps": bandwidth / 1e9, "peak_MiB": _peak_bytes() / 2**20,
    }


def case_memory(model: str, dtype: str) -> dict:
    """Peak GPU memory of a batch-1 generation that fills all 1024 positions."""
    import numpy as np

    from pangu_jax import generate

    config, params = _device_model(model, dtype)
    prompt = np.random.default_rng(0).integers(10, config.vocab_size, (1, config.max_positions - 24)).tolist()
    generate(config, params, prompt, 24, temperature=0, stop_ids=())
    original = ORIGINAL_MIB.get(f"{model}/{dtype}")
    return {"case": "memory", "model": model, "dtype": dtype, "context": config.max_positions,
            "peak_MiB": _peak_bytes() / 2**20, "original_MiB": original}


def case_recompute(model: str, dtype: str, repeats: int) -> dict:
    """The original algorithm: a full padded 1024-position forward for every new token."""
    import jax.numpy as jnp

    from pangu_jax import forward

    config, params = _device_model(model, dtype)
    tokens = jnp.ones((1, config.max_positions), jnp.int32)
    seconds = _median_time(lambda: forward(config, params, tokens)[0].block_until_ready(), repeats)
    return {"case": "recompute", "model": model, "dtype": dtype, "ms_per_token": seconds * 1e3}


def case_prefill(model: str, dtype: str, repeats: int) -> dict:
    import jax.numpy as jnp

    from pangu_jax import forward
    from pangu_jax.model import init_cache

    config, params = _device_model(model, dtype)
    rate = measure_matmul_rate()
    t = config.max_positions
    tokens = jnp.ones((1, t), jnp.int32)
    cache = init_cache(config, 1, t)

    def run():
        forward(config, params, tokens, cache=cache, last_only=True)[0].block_until_ready()

    seconds = _median_time(run, repeats)
    h, layers = config.hidden_size, config.num_layers
    matmul_params = layers * (4 * h * h + 2 * h * config.ffn_size)
    flops = 2 * matmul_params * t + 4 * layers * t * t * h + 2 * h * config.vocab_size
    return {"case": "prefill", "model": model, "dtype": dtype, "tokens": t, "ms": seconds * 1e3,
            "tflops": flops / seconds / 1e12, "matmul_tflops": rate / 1e12, "mfu": flops / seconds / rate}


def case_hf(model: str, batch: int, new: int, repeats: int) -> dict:
    """What a user would pick instead: transformers' GPT-2 of PanGu's dimensions, float16, with its cache."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pangu_jax import PanguConfig

    c = PanguConfig.preset(model)
    cfg = GPT2Config(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads, n_positions=c.max_positions,
                     vocab_size=c.vocab_size, n_inner=c.ffn_size)
    with torch.device("cuda"):
        net = GPT2LMHeadModel(cfg).half().eval()
    ids = torch.randint(10, c.vocab_size, (batch, 16), device="cuda")

    def run(n):
        def go():
            with torch.no_grad():
                net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        return go

    short = _median_time(run(1), repeats)
    long = _median_time(run(new + 1), repeats)
    per_token = (long - short) / new
    return {"case": "hf", "model": model, "dtype": "float16", "batch": batch, "new_tokens": new,
            "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token, "torch": torch.__version__}


CASES = {"decode": case_decode, "memory": case_memory, "recompute": case_recompute,
         "prefill": case_prefill, "hf": case_hf}


def _run_case(name: str, **kwargs) -> dict:
    """One case in a fresh process, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "_case", name, json.dumps(kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode:
        return {"case": name, **kwargs, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _card() -> str:
    import jax

    d = jax.devices()[0]
    return f"{getattr(d, 'device_kind', d.platform)} x{jax.device_count()} (jax {jax.__version__})"


def _print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_case":
        print(json.dumps(CASES[argv[1]](**json.loads(argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["decode", "baselines", "throughput", "prefill"])
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="append the rows to this JSON file")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    card = _card()
    if args.table == "decode":
        rows = [_run_case("decode", model=args.model, dtype=d, batch=1, prompt=16, new=args.new_tokens,
                          repeats=args.repeats) for d in dtypes]
        rows += [_run_case("memory", model=args.model, dtype=d) for d in dtypes]
        cols = ["case", "model", "dtype", "batch", "ms_per_token", "tokens_per_s", "limit_ms", "ratio_to_limit",
                "copy_bandwidth_GBps", "peak_MiB", "original_MiB", "error"]
    elif args.table == "baselines":
        rows = [_run_case("recompute", model=args.model, dtype="float16", repeats=args.repeats),
                _run_case("hf", model=args.model, batch=1, new=args.new_tokens, repeats=3)]
        cols = ["case", "model", "dtype", "batch", "ms_per_token", "tokens_per_s", "error"]
    elif args.table == "throughput":
        rows = [_run_case("decode", model=args.model, dtype=dtypes[0], batch=b, prompt=16, new=args.new_tokens,
                          repeats=args.repeats) for b in map(int, args.batches.split(","))]
        rows += [_run_case("hf", model=args.model, batch=b, new=args.new_tokens, repeats=3)
                 for b in map(int, args.batches.split(","))]
        cols = ["case", "model", "dtype", "batch", "ms_per_token", "tokens_per_s", "ratio_to_limit", "peak_MiB",
                "error"]
    else:
        rows = [_run_case("prefill", model=args.model, dtype=d, repeats=args.repeats) for d in dtypes]
        cols = ["case", "model", "dtype", "tokens", "ms", "tflops", "matmul_tflops", "mfu", "error"]
    _print_table(f"{args.table} on {card}, {time.strftime('%Y-%m-%d')}", rows, cols)
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "card": card, "table": args.table,
                  "command": "python infer/bench.py " + " ".join(argv), "rows": rows}
        existing = json.load(open(args.json)) if os.path.exists(args.json) else []
        with open(args.json, "w") as f:
            json.dump(existing + [record], f, indent=1)


if __name__ == "__main__":
    main()
