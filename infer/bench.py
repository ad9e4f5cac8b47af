"""Inference benchmark: one command per table, random weights, medians.

    python infer/bench.py decode   --model 2.6B --dtypes float16,bfloat16 [--prompt 896]
    python infer/bench.py baselines --model 2.6B
    python infer/bench.py throughput --model 2.6B --batches 8,32,64
    python infer/bench.py prefill  --model 2.6B
    python infer/bench.py ttft     --model 2.6B
    python infer/bench.py tensor-parallel --model 13B --tensor 1,2,4
    python infer/bench.py profile  --model 2.6B --batches 1 [--mesh tensor=4]

Each case runs in its own process so that peak GPU memory
(`memory_stats()['peak_bytes_in_use']`) belongs to that case alone. Every
table states the card, the physical limit measured in the same run (memory
bandwidth, the best of JAX's elementwise pass, XLA's copy, a read-only
reduction and PyTorch's device copy; bf16 matmul rate) and the ratio to it. `--json PATH`
writes the rows for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def _stream_bytes() -> int:
    """Bandwidth test size: 2 GiB, many times a GPU's L2; small on a CPU, where the numbers mean nothing."""
    import jax

    return 1 << 31 if jax.default_backend() == "gpu" else 1 << 26


def measure_copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device elementwise pass."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((_stream_bytes() // 2,), jnp.bfloat16)
    scale = jax.jit(lambda v: v * 2)
    seconds = _median_time(lambda: scale(x).block_until_ready(), 20)
    return 2 * x.nbytes / seconds


def measure_torch_copy_bandwidth() -> float | None:
    """Bytes read plus written per second by PyTorch's device-to-device copy (a cudaMemcpy), if it sees a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(_stream_bytes(), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)

    def copy():
        b.copy_(a)
        torch.cuda.synchronize()

    return 2 * a.numel() / _median_time(copy, 20)


def measure_bandwidths() -> dict:
    """Memory bandwidth (bytes/s) several ways, and the best, which sets the decode limit.

    `copy`: an elementwise pass through JAX (bytes read plus written; the
    measure of earlier results); `xla_copy`: XLA's plain copy of a buffer;
    `read`: row sums of a large matrix, a read-only stream like decoding's
    matrix-vector products; `torch_copy`, where PyTorch sees a GPU: its
    device-to-device copy. On an H200 these gave 2.6-2.8, 3.1-3.2, 2.8-3.1
    and 4.1-4.2 TB/s (`benchmarks/bandwidth_check.py`), and 13B decoded at
    3.6 TB/s: only the best is a physical limit.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((_stream_bytes() // 4 >> 13, 1 << 13), jnp.float32)
    copy = jax.jit(jnp.copy)
    row_sums = jax.jit(lambda v: v.sum(-1))
    found = {
        "copy": measure_copy_bandwidth(),
        "xla_copy": 2 * x.nbytes / _median_time(lambda: copy(x).block_until_ready(), 20),
        "read": x.nbytes / _median_time(lambda: row_sums(x).block_until_ready(), 20),
    }
    torch_copy = measure_torch_copy_bandwidth()
    if torch_copy:
        found["torch_copy"] = torch_copy
    return {**found, "best": max(found.values())}


def measure_matmul_rate() -> float:
    import jax
    import jax.numpy as jnp

    n = 8192
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / _median_time(lambda: mm(a, b).block_until_ready(), 10)


def kernel_family(name: str) -> str:
    """A kernel's name without XLA's numbering: "all_reduce_43_0_fusion_1" -> "all_reduce_fusion"."""
    return re.sub(r"[_.]\d+(?=[_.]|$)", "", name)


def idle_before(events: list[tuple[float, float, str]]) -> tuple[dict, dict]:
    """The time no kernel ran, by the family of the kernel that ended each wait: ({family: ns}, {family: waits}).

    `events` are (start, end, name) in ns; kernels that overlap (launched
    early, programmatic dependent launch) leave no wait between them.
    """
    from collections import defaultdict

    times, counts = defaultdict(float), defaultdict(int)
    running_until = None
    for start, end, name in sorted(events):
        if running_until is not None and start > running_until:
            times[kernel_family(name)] += start - running_until
            counts[kernel_family(name)] += 1
        running_until = end if running_until is None else max(running_until, end)
    return times, counts


def profile_kernels(fn, steps: int, top: int = 25) -> dict:
    """Trace one call of `fn` (already compiled) and sum the GPU kernels it ran, per step.

    Returns the wall time per step, the summed kernel time per step (their
    difference is the GPU waiting between kernels, less the overlap of
    kernels launched early), the kernel count per step, the `top` kernels by
    time, every kernel family (`kernel_family`: the 80 differently numbered
    all-reduces of a step are one family) by time, and the time no kernel ran,
    in all and by the family of the kernel that ended each wait
    (`idle_before`).
    Reads the trace with `jax.profiler.ProfileData`.
    """
    import glob
    import tempfile
    from collections import defaultdict

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            wall = time.perf_counter() - start
        data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    totals, counts = defaultdict(float), defaultdict(int)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
                events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    busy = sum(totals.values())
    first, last = (min(events)[0], max(end for _, end, _ in events)) if events else (0.0, 0.0)
    idle_times, idle_counts = idle_before(events)
    family_totals, family_counts = defaultdict(float), defaultdict(int)
    for name in totals:
        family = kernel_family(name)
        family_totals[family] += totals[name]
        family_counts[family] += counts[name]

    def ranking(times, calls, limit=None):
        return [{"kernel": name[:120], "calls_per_step": calls[name] / steps, "us_per_step": times[name] / steps / 1e3}
                for name in sorted(times, key=times.get, reverse=True)[:limit]]

    return {
        "wall_us_per_step": wall / steps * 1e6, "gpu_span_us_per_step": max(last - first, 0) / steps / 1e3,
        "kernel_us_per_step": busy / steps / 1e3, "kernels_per_step": sum(counts.values()) / steps,
        "top": ranking(totals, counts, top), "families": ranking(family_totals, family_counts),
        "idle_us_per_step": sum(idle_times.values()) / steps / 1e3,
        "idle_before": ranking(idle_times, idle_counts, 10),
    }


def _device_model(model: str, dtype: str, layout: str = "per_layer", mesh: str | None = None,
                  weights: str = "float", vocab: str = "replicated", attention: str = "auto"):
    """Random parameters made on the device(s) leaf by leaf, in the given layout, on a mesh if asked.

    One small random program per distinct leaf shape: quick to compile, and
    the peak memory is the model itself.
    """
    import functools

    import jax
    import jax.numpy as jnp

    from pangu_jax import PanguConfig
    from pangu_jax.layouts import per_layer
    from pangu_jax.model import abstract_params
    from pangu_jax.sharding import RULES, RULES_SPLIT_VOCAB, make_mesh, shardings_like

    config = PanguConfig.preset(model, param_dtype=dtype, dtype=dtype, weights=weights, attention=attention,
                                decode_attention=attention)
    rules = {"split": RULES_SPLIT_VOCAB, "replicated": RULES}[vocab]
    shapes = abstract_params(config)
    if layout == "per_layer":
        shapes = jax.eval_shape(per_layer, shapes)
    shardings = (jax.tree.map(lambda _: None, shapes) if mesh is None
                 else shardings_like(config, make_mesh(mesh), shapes, rules))

    @functools.cache
    def maker(shape, dtype, sharding):
        def make(key):
            if jnp.issubdtype(dtype, jnp.integer):
                return jax.random.randint(key, shape, -127, 128, dtype)
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return jax.jit(make, out_shardings=sharding)

    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda a, s: maker(a.shape, a.dtype, s)(next(keys)), shapes, shardings,
                          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    jax.block_until_ready(params)
    return config, params


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _peak_bytes() -> int:
    """The largest peak over the devices in use."""
    import jax

    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())


def case_decode(model: str, dtype: str, batch: int, prompt: int, new: int, repeats: int,
                layout: str = "per_layer", mesh: str | None = None, weights: str = "float",
                vocab: str = "replicated", attention: str = "auto") -> dict:
    """ms per new token of `generate`'s decode: the whole decode loop on the device, timed apart from the prefill.

    Also, as `stream_ms_per_token`, the same through `stream`, which hands
    the tokens to the host after each compiled chunk: from its first token
    (the prefill's) in the caller's hands to its last; and between the two,
    as `chunks_ms_per_token`, the stream's chunk programs run back to back
    with no reads between them. The prefill (first token) is timed apart,
    as the median of whole prefill calls. `call_ms` and `stream_call_ms`
    are whole `generate` and `stream` calls, prefill to last token: what a
    caller waits for (for a count that is no whole number of chunks after
    the prefill's token, a stream whose last chunk ran whole shows it there);
    `stream_equals_generate` whether their tokens are the same.
    """
    import jax
    import numpy as np

    from pangu_jax.cache import init_cache
    from pangu_jax.decoding import generate, stream
    from pangu_jax.decoding import start as start_generation
    from pangu_jax.sharding import make_mesh

    config, params = _device_model(model, dtype, layout, mesh, weights, vocab, attention)
    bandwidth = measure_bandwidths()
    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (batch, prompt)).tolist()
    options = dict(temperature=0, stop_ids=())

    def start():
        return start_generation(config, params, prompts, new + 1, **options)

    def on_device(to_end: bool):
        """generate's decode program (`to_end`), or the stream's chunk programs back to back with no reads."""
        run = start()
        jax.block_until_ready(run.state)
        begin, steps_before = time.perf_counter(), int(run.state.step)
        for _ in range(1 if to_end else -(-new // run.chunk)):
            run.decode(to_end=to_end)
        steps = int(jax.block_until_ready(run.state).step) - steps_before  # before the clock is read
        return time.perf_counter() - begin, steps

    def streamed():  # from the first token in the caller's hands (the prefill's) to the last
        handed_out = stream(config, params, prompts, new + 1, **options)
        next(handed_out)
        begin = time.perf_counter()
        steps = sum(len(chunk[0]) for chunk in handed_out)
        return time.perf_counter() - begin, steps

    first = _median_time(lambda: jax.block_until_ready(start().state), repeats)
    call = _median_time(lambda: generate(config, params, prompts, new + 1, **options), repeats)
    stream_call = _median_time(lambda: list(stream(config, params, prompts, new + 1, **options)), repeats)
    chunks = list(stream(config, params, prompts, new + 1, **options))
    streamed_tokens = [sum((chunk[row] for chunk in chunks), []) for row in range(batch)]
    per_token, chunks_per_token, stream_per_token = (
        statistics.median(seconds / steps for seconds, steps in [timed() for _ in range(repeats + 1)][1:])
        for timed in (lambda: on_device(True), lambda: on_device(False), streamed))  # the first run of each compiles
    devices = 1 if mesh is None else make_mesh(mesh).size
    weight_bytes = _tree_bytes(params)
    cache_bytes = _tree_bytes(jax.eval_shape(lambda: init_cache(config, batch, prompt + new, params=params)))
    limit = (weight_bytes + cache_bytes) / devices / bandwidth["best"]
    return {
        "case": "decode", "model": model, "dtype": dtype, "weights": weights, "batch": batch, "prompt": prompt,
        "layout": layout, "mesh": mesh or "", "vocab": vocab, "attention": attention,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token,
        "chunks_ms_per_token": chunks_per_token * 1e3, "stream_ms_per_token": stream_per_token * 1e3,
        "limit_ms": limit * 1e3,
        "ratio_to_limit": limit / per_token, "first_token_ms": first * 1e3, "call_ms": call * 1e3,
        "stream_call_ms": stream_call * 1e3,
        "stream_equals_generate": streamed_tokens == generate(config, params, prompts, new + 1, **options),
        "weight_bytes": weight_bytes,
        "cache_bytes": cache_bytes, **{f"{k}_bandwidth_GBps": v / 1e9 for k, v in bandwidth.items()},
        "peak_MiB": _peak_bytes() / 2**20,
    }


def case_profile(model: str, dtype: str, batch: int, prompt: int, new: int, layout: str = "per_layer",
                 mesh: str | None = None, weights: str = "float", hlo_dir: str | None = None,
                 vocab: str = "replicated", attention: str = "auto") -> dict:
    """Where one compiled decode chunk spends its time: GPU kernels per token (see `profile_kernels`).

    With `hlo_dir`, also writes the compiled decode chunk's HLO there.
    """
    import jax
    import numpy as np

    from pangu_jax.decoding import start as start_generation

    config, params = _device_model(model, dtype, layout, mesh, weights, vocab, attention)
    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (batch, prompt)).tolist()
    run = start_generation(config, params, prompts, new + 1, temperature=0, stop_ids=())
    run.decode(to_end=False)  # compile
    jax.block_until_ready(run.state)
    if hlo_dir:
        lowered = run.lower_decode(to_end=False)
        name = f"decode-{model}-{dtype}-{weights}-b{batch}{'-' + mesh if mesh else ''}.hlo.txt"
        with open(os.path.join(hlo_dir, name), "w") as f:
            f.write(lowered.compile().as_text())
    found = profile_kernels(lambda: (run.decode(to_end=False), run.state)[1], run.chunk)
    return {"case": "profile", "model": model, "dtype": dtype, "weights": weights, "batch": batch,
            "layout": layout, "mesh": mesh or "", "vocab": vocab, "attention": attention,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), **found}


def case_ttft(model: str, dtype: str, prompt: int, cache_dir: str, via: str = "generate", new: int = 64) -> dict:
    """Seconds from calling generate() or stream() in a fresh process to its first token, compile included.

    `generate` is asked for one token (the prefill's). `stream` is asked for
    `new` and timed to its first chunk, then run to its end, so that the
    compilation cache gets every program it uses (`last_token_s`).
    """
    import numpy as np

    from pangu_jax import generate, stream
    from pangu_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    config, params = _device_model(model, dtype)
    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (1, prompt)).tolist()
    options = dict(temperature=0, stop_ids=())
    row = {"case": "ttft", "via": via, "model": model, "dtype": dtype, "prompt": prompt}
    start = time.perf_counter()
    if via == "generate":
        generate(config, params, prompts, 1, **options)
        return {**row, "first_token_s": time.perf_counter() - start}
    chunks = stream(config, params, prompts, new, **options)
    next(chunks)
    first = time.perf_counter() - start
    for _ in chunks:
        pass
    return {**row, "new": new, "first_token_s": first, "last_token_s": time.perf_counter() - start}


def case_memory(model: str, dtype: str, layout: str = "per_layer", weights: str = "float") -> dict:
    """Peak GPU memory of a batch-1 generation that fills all 1024 positions.

    Also the peak once the weights are made and after the prefill, and the
    temporary buffers XLA's memory analysis gives the compiled prefill and
    decode programs: where a peak comes from. (Loading the programs from the
    persistent compilation cache instead of compiling them here, which
    autotunes on the device, measured the same peak.)
    """
    import jax
    import numpy as np

    from pangu_jax.decoding import start as start_generation
    from pangu_jax.model import prefill

    config, params = _device_model(model, dtype, layout, weights=weights)
    peak_weights = _peak_bytes()
    new = 24
    prompt = np.random.default_rng(0).integers(10, config.vocab_size, (1, config.max_positions - new)).tolist()
    run = start_generation(config, params, prompt, new, temperature=0, stop_ids=())
    jax.block_until_ready(run.state)
    peak_prefill = _peak_bytes()
    run.decode(to_end=True)
    jax.block_until_ready(run.state)
    peak = _peak_bytes()
    tokens = np.zeros((1, config.max_positions), np.int32)
    analysis = prefill.lower(config, params, tokens, tokens, config.max_positions + 64).compile().memory_analysis()
    decode_analysis = run.lower_decode(to_end=True).compile().memory_analysis()
    original = ORIGINAL_MIB.get(f"{model}/{dtype}")
    return {"case": "memory", "model": model, "dtype": dtype, "weights": weights, "layout": layout,
            "context": config.max_positions,
            "peak_MiB": peak / 2**20, "weights_MiB": _tree_bytes(params) / 2**20,
            "peak_making_weights_MiB": peak_weights / 2**20, "peak_after_prefill_MiB": peak_prefill / 2**20,
            "prefill_temp_MiB": getattr(analysis, "temp_size_in_bytes", 0) / 2**20,
            "decode_temp_MiB": getattr(decode_analysis, "temp_size_in_bytes", 0) / 2**20, "original_MiB": original}


def case_recompute(model: str, dtype: str, repeats: int) -> dict:
    """The original algorithm: a full padded 1024-position forward for every new token."""
    import jax.numpy as jnp

    from pangu_jax import forward

    config, params = _device_model(model, dtype)
    tokens = jnp.ones((1, config.max_positions), jnp.int32)
    seconds = _median_time(lambda: forward(config, params, tokens)[0].block_until_ready(), repeats)
    return {"case": "recompute", "model": model, "dtype": dtype, "ms_per_token": seconds * 1e3}


def case_prefill(model: str, dtype: str, repeats: int, layout: str = "per_layer") -> dict:
    import jax.numpy as jnp

    from pangu_jax.model import prefill

    config, params = _device_model(model, dtype, layout)
    rate = measure_matmul_rate()
    t = config.max_positions
    tokens = jnp.ones((1, t), jnp.int32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]

    def run():
        prefill(config, params, tokens, positions, t)[0].block_until_ready()

    seconds = _median_time(run, repeats)
    h, layers = config.hidden_size, config.num_layers
    matmul_params = layers * (4 * h * h + 2 * h * config.ffn_size)
    flops = 2 * matmul_params * t + 4 * layers * t * t * h + 2 * h * config.vocab_size
    return {"case": "prefill", "model": model, "dtype": dtype, "layout": layout, "tokens": t, "ms": seconds * 1e3,
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


CASES = {"decode": case_decode, "profile": case_profile, "memory": case_memory, "recompute": case_recompute,
         "prefill": case_prefill, "hf": case_hf, "ttft": case_ttft}


def _run_case(name: str, xla_flags: str | None = None, **kwargs) -> dict:
    """One case in a fresh process, so its peak memory is its own (extra XLA flags if given)."""
    cmd = [sys.executable, __file__, "_case", name, json.dumps(kwargs)]
    env = os.environ.copy()
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"case": name, **kwargs, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _card() -> str:
    import jax

    d = jax.devices()[0]
    return f"{getattr(d, 'device_kind', d.platform)} x{jax.device_count()} (jax {jax.__version__})"


def append_record(path: str, command: str, card: str, rows: list[dict], **extra) -> None:
    """Add one run (date, card, `extra`, command, rows) to the JSON list in `path` (for benchmarks/results/)."""
    record = {"date": time.strftime("%Y-%m-%d"), "card": card, **extra, "command": command, "rows": rows}
    existing = json.load(open(path)) if os.path.exists(path) else []
    with open(path, "w") as f:
        json.dump(existing + [record], f, indent=1)


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
    p.add_argument("table", choices=["decode", "profile", "baselines", "throughput", "prefill", "ttft", "tensor-parallel"])
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--hf-batches", help="throughput table: batches for the HuggingFace baseline (default: --batches)")
    p.add_argument("--layouts", default="per_layer", help="decode table: per_layer and/or stacked")
    p.add_argument("--tensor", default="1,2,4", help="tensor-parallel table: mesh sizes")
    p.add_argument("--mesh", help="profile table: a mesh such as tensor=4")
    p.add_argument("--vocab", choices=["split", "replicated"], default="replicated",
                   help="on a mesh: the embedding/head replicated (sharding.RULES) or split over `tensor`")
    p.add_argument("--dump-hlo", help="profile table: write each compiled decode chunk's HLO into this folder")
    p.add_argument("--xla-flags", help="extra XLA_FLAGS for every case")
    p.add_argument("--weights", default="float", help="decode table: float and/or int8")
    p.add_argument("--attention", default="auto",
                   help="decode, profile, throughput and tensor-parallel tables: auto, cudnn and/or explicit "
                        "(PanguConfig.attention)")
    p.add_argument("--memory-dtypes", help="decode table: dtypes of the peak-memory cases (default --dtypes; '' none)")
    p.add_argument("--prompt", type=int, default=16,
                   help="decode and throughput tables: prompt length (the decode is timed after it)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--via", default="generate,stream", help="ttft table: time generate() and/or stream()")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="append the rows to this JSON file")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    card = _card()
    flags = args.xla_flags
    batches = list(map(int, args.batches.split(",")))
    attentions = args.attention.split(",")
    if args.table == "decode":
        rows = [_run_case("decode", flags, model=args.model, dtype=d, batch=1, prompt=args.prompt,
                          new=args.new_tokens, repeats=args.repeats, layout=lay, weights=w, attention=a)
                for w in args.weights.split(",") for lay in args.layouts.split(",") for d in dtypes
                for a in attentions]
        memory_dtypes = dtypes if args.memory_dtypes is None else list(filter(None, args.memory_dtypes.split(",")))
        rows += [_run_case("memory", flags, model=args.model, dtype=d, weights=w)
                 for w in args.weights.split(",") for d in memory_dtypes]
        cols = ["case", "model", "dtype", "weights", "layout", "attention", "batch", "prompt", "ms_per_token",
                "chunks_ms_per_token", "stream_ms_per_token", "first_token_ms", "call_ms", "stream_call_ms",
                "stream_equals_generate", "tokens_per_s", "limit_ms",
                "ratio_to_limit", "copy_bandwidth_GBps",
                "xla_copy_bandwidth_GBps", "read_bandwidth_GBps", "torch_copy_bandwidth_GBps", "peak_MiB",
                "peak_after_prefill_MiB", "prefill_temp_MiB", "decode_temp_MiB", "original_MiB", "error"]
    elif args.table == "profile":
        rows = [_run_case("profile", flags, model=args.model, dtype=dtypes[0], batch=b, prompt=16, new=args.new_tokens,
                          weights=w, mesh=args.mesh, hlo_dir=args.dump_hlo, vocab=args.vocab, attention=a)
                for w in args.weights.split(",") for b in batches for a in attentions]
        for row in rows:
            for key, title in (("top", "top kernels per token"), ("families", "kernel families per token"),
                               ("idle_before", "GPU idle per token, by the kernel that ended the wait")):
                _print_table(f"{title}: {row.get('model')} {row.get('weights')} batch {row.get('batch')} "
                             f"attention {row.get('attention')}",
                             row.get(key, []), ["kernel", "calls_per_step", "us_per_step"])
        cols = ["case", "model", "dtype", "weights", "attention", "batch", "mesh", "wall_us_per_step",
                "gpu_span_us_per_step", "kernel_us_per_step", "idle_us_per_step", "kernels_per_step", "error"]
    elif args.table == "baselines":
        rows = [_run_case("recompute", flags, model=args.model, dtype="float16", repeats=args.repeats),
                _run_case("hf", model=args.model, batch=1, new=args.new_tokens, repeats=3)]
        cols = ["case", "model", "dtype", "batch", "ms_per_token", "tokens_per_s", "error"]
    elif args.table == "throughput":
        rows = [_run_case("decode", flags, model=args.model, dtype=dtypes[0], batch=b, prompt=args.prompt,
                          new=args.new_tokens, repeats=args.repeats, attention=a) for b in batches for a in attentions]
        hf_batches = batches if args.hf_batches is None else list(map(int, filter(None, args.hf_batches.split(","))))
        rows += [_run_case("hf", model=args.model, batch=b, new=args.new_tokens, repeats=3) for b in hf_batches]
        cols = ["case", "model", "dtype", "attention", "batch", "prompt", "ms_per_token", "stream_ms_per_token",
                "tokens_per_s", "ratio_to_limit", "peak_MiB", "error"]
    elif args.table == "ttft":
        import tempfile

        vias = args.via.split(",")
        if set(vias) - {"generate", "stream"}:
            raise SystemExit(f"--via: {args.via!r}; give generate and/or stream, comma-separated")
        rows = []
        for via in vias:
            with tempfile.TemporaryDirectory() as cache:
                runs = [_run_case("ttft", flags, model=args.model, dtype=dtypes[0], prompt=16, cache_dir=cache,
                                  via=via, new=args.new_tokens) for _ in range(2)]
            runs[0]["compilation_cache"], runs[1]["compilation_cache"] = "empty (cold)", "filled by the first run"
            rows += runs
        cols = ["case", "via", "model", "dtype", "prompt", "compilation_cache", "first_token_s", "last_token_s",
                "error"]
    elif args.table == "tensor-parallel":
        rows = [_run_case("decode", flags, model=args.model, dtype=dtypes[0], batch=1, prompt=16,
                          new=args.new_tokens, repeats=args.repeats, mesh=f"tensor={n}", vocab=args.vocab,
                          attention=attentions[0])
                for n in map(int, args.tensor.split(","))]
        base = rows[0].get("ms_per_token")
        for n, row in zip(map(int, args.tensor.split(",")), rows):
            if base and "ms_per_token" in row:
                row["scaling_efficiency"] = base / (n * row["ms_per_token"])
        cols = ["case", "model", "dtype", "mesh", "vocab", "attention", "xla_flags", "ms_per_token", "limit_ms", "ratio_to_limit",
                "scaling_efficiency", "peak_MiB", "error"]
    else:
        rows = [_run_case("prefill", flags, model=args.model, dtype=d, repeats=args.repeats) for d in dtypes]
        cols = ["case", "model", "dtype", "tokens", "ms", "tflops", "matmul_tflops", "mfu", "error"]
    _print_table(f"{args.table} on {card}, {time.strftime('%Y-%m-%d')}", rows, cols)
    if args.json:
        append_record(args.json, "python infer/bench.py " + " ".join(argv), card, rows, table=args.table)


if __name__ == "__main__":
    main()
