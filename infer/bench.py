"""Inference benchmark: one command per table, random weights, medians.

    python infer/bench.py decode   --model 2.6B --dtypes float16,bfloat16 [--prompt 896]
    python infer/bench.py baselines --model 2.6B
    python infer/bench.py throughput --model 2.6B --batches 8,32,64
    python infer/bench.py prefill  --model 2.6B
    python infer/bench.py ttft     --model 2.6B
    python infer/bench.py tensor-parallel --model 13B --tensor 1,2,4
    python infer/bench.py profile  --model 2.6B --batches 1 [--mesh tensor=4]
    python infer/bench.py int8-quality --model 2.6B
    python infer/bench.py evaluate --model 2.6B --dtypes bfloat16 --batches 8,32

Each case runs in its own process, so that its peak GPU memory is its own.
Every speed table states the card, the physical limit measured in the same
run (memory bandwidth: the best of several measures, `pangu_jax.benchmarking`;
the bf16 matmul rate) and the ratio to it. `--json PATH` appends the rows
to a result file for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pangu_jax.benchmarking import (BenchTool, Table, measure_bandwidths, measure_matmul_rate, median_time,
                                    peak_device_bytes, print_table, profile_kernels, random_device_model, tree_bytes)

TOOL = BenchTool(__file__, __doc__)

# The peer of the memory table: the original's peak GPU memory generating to 1024 positions.
ORIGINAL_MIB = {"2.6B/float16": 6728, "2.6B/float32": 17214, "13B/float16": 26430}
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
QUALITY_MODELS = ("fixture", "embedded", "random")


# --- cases: one measurement each, in a fresh process --------------------------------------------------------


def _random_prompts(config, batch: int, length: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(10, config.vocab_size, (batch, length)).tolist()


@TOOL.case
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
    caller waits for; `stream_equals_generate` whether their tokens are the
    same. The limit is the weight and cache bytes (per device on a mesh)
    over the best bandwidth measured in this process.
    """
    import jax

    from pangu_jax.cache import init_cache
    from pangu_jax.decoding import generate, stream
    from pangu_jax.decoding import start as start_generation
    from pangu_jax.sharding import make_mesh

    config, params = random_device_model(model, dtype, layout, mesh, weights, vocab, attention)
    bandwidth = measure_bandwidths()
    prompts = _random_prompts(config, batch, prompt)
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

    first = median_time(lambda: jax.block_until_ready(start().state), repeats)
    call = median_time(lambda: generate(config, params, prompts, new + 1, **options), repeats)
    stream_call = median_time(lambda: list(stream(config, params, prompts, new + 1, **options)), repeats)
    chunks = list(stream(config, params, prompts, new + 1, **options))
    streamed_tokens = [sum((chunk[row] for chunk in chunks), []) for row in range(batch)]
    per_token, chunks_per_token, stream_per_token = (
        statistics.median(seconds / steps for seconds, steps in [timed() for _ in range(repeats + 1)][1:])
        for timed in (lambda: on_device(True), lambda: on_device(False), streamed))  # the first run of each compiles
    devices = 1 if mesh is None else make_mesh(mesh).size
    weight_bytes = tree_bytes(params)
    cache_bytes = tree_bytes(jax.eval_shape(lambda: init_cache(config, batch, prompt + new, params=params)))
    limit = (weight_bytes + cache_bytes) / devices / bandwidth["best"]
    return {
        "case": "decode", "model": model, "dtype": dtype, "weights": weights, "batch": batch, "prompt": prompt,
        "layout": layout, "mesh": mesh or "", "vocab": vocab, "attention": attention,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "ms_per_token": per_token * 1e3,
        "tokens_per_s": batch / per_token,
        "chunks_ms_per_token": chunks_per_token * 1e3, "stream_ms_per_token": stream_per_token * 1e3,
        "limit_ms": limit * 1e3, "ratio_to_limit": limit / per_token, "first_token_ms": first * 1e3,
        "call_ms": call * 1e3, "stream_call_ms": stream_call * 1e3,
        "stream_equals_generate": streamed_tokens == generate(config, params, prompts, new + 1, **options),
        "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
        **{f"{k}_bandwidth_GBps": v / 1e9 for k, v in bandwidth.items()},
        "peak_MiB": peak_device_bytes() / 2**20,
    }


@TOOL.case
def case_profile(model: str, dtype: str, batch: int, prompt: int, new: int, layout: str = "per_layer",
                 mesh: str | None = None, weights: str = "float", hlo_dir: str | None = None,
                 vocab: str = "replicated", attention: str = "auto") -> dict:
    """Where one compiled decode chunk spends its time: GPU kernels per token (`profile_kernels`).

    With `hlo_dir`, also writes the compiled decode chunk's HLO there.
    """
    import jax

    from pangu_jax.decoding import start as start_generation

    config, params = random_device_model(model, dtype, layout, mesh, weights, vocab, attention)
    run = start_generation(config, params, _random_prompts(config, batch, prompt), new + 1, temperature=0,
                           stop_ids=())
    run.decode(to_end=False)  # compile
    jax.block_until_ready(run.state)
    if hlo_dir:
        name = f"decode-{model}-{dtype}-{weights}-b{batch}{'-' + mesh if mesh else ''}.hlo.txt"
        Path(hlo_dir, name).write_text(run.lower_decode(to_end=False).compile().as_text())
    found = profile_kernels(lambda: (run.decode(to_end=False), run.state)[1], run.chunk)
    return {"case": "profile", "model": model, "dtype": dtype, "weights": weights, "batch": batch,
            "layout": layout, "mesh": mesh or "", "vocab": vocab, "attention": attention,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), **found}


@TOOL.case
def case_ttft(model: str, dtype: str, prompt: int, cache_dir: str, via: str = "generate", new: int = 64) -> dict:
    """Seconds from calling generate() or stream() in a fresh process to its first token, compile included.

    `generate` is asked for one token (the prefill's). `stream` is asked for
    `new` and timed to its first chunk, then run to its end, so that the
    compilation cache gets every program it uses (`last_token_s`).
    """
    from pangu_jax import generate, stream
    from pangu_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    config, params = random_device_model(model, dtype)
    prompts = _random_prompts(config, 1, prompt)
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


@TOOL.case
def case_memory(model: str, dtype: str, layout: str = "per_layer", weights: str = "float") -> dict:
    """Peak GPU memory of a batch-1 generation that fills every position.

    Also the peak once the weights are made and after the prefill, and the
    temporary buffers XLA's memory analysis gives the compiled prefill and
    decode programs: where a peak comes from.
    """
    import jax
    import numpy as np

    from pangu_jax.decoding import start as start_generation
    from pangu_jax.model import prefill

    config, params = random_device_model(model, dtype, layout, weights=weights)
    peak_weights = peak_device_bytes()
    new = 24
    run = start_generation(config, params, _random_prompts(config, 1, config.max_positions - new), new,
                           temperature=0, stop_ids=())
    jax.block_until_ready(run.state)
    peak_prefill = peak_device_bytes()
    run.decode(to_end=True)
    jax.block_until_ready(run.state)
    peak = peak_device_bytes()
    tokens = np.zeros((1, config.max_positions), np.int32)
    analysis = prefill.lower(config, params, tokens, tokens, config.max_positions + 64).compile().memory_analysis()
    decode_analysis = run.lower_decode(to_end=True).compile().memory_analysis()
    return {"case": "memory", "model": model, "dtype": dtype, "weights": weights, "layout": layout,
            "context": config.max_positions,
            "peak_MiB": peak / 2**20, "weights_MiB": tree_bytes(params) / 2**20,
            "peak_making_weights_MiB": peak_weights / 2**20, "peak_after_prefill_MiB": peak_prefill / 2**20,
            "prefill_temp_MiB": getattr(analysis, "temp_size_in_bytes", 0) / 2**20,
            "decode_temp_MiB": getattr(decode_analysis, "temp_size_in_bytes", 0) / 2**20,
            "original_MiB": ORIGINAL_MIB.get(f"{model}/{dtype}")}


@TOOL.case
def case_recompute(model: str, dtype: str, repeats: int) -> dict:
    """The original algorithm: a full padded forward over every position for every new token."""
    import jax.numpy as jnp

    from pangu_jax import forward

    config, params = random_device_model(model, dtype)
    tokens = jnp.ones((1, config.max_positions), jnp.int32)
    seconds = median_time(lambda: forward(config, params, tokens)[0].block_until_ready(), repeats)
    return {"case": "recompute", "model": model, "dtype": dtype, "ms_per_token": seconds * 1e3}


@TOOL.case
def case_prefill(model: str, dtype: str, repeats: int, layout: str = "per_layer") -> dict:
    """A prefill of every position: its model FLOP/s against the bf16 matmul rate measured in the process."""
    import jax.numpy as jnp

    from pangu_jax.model import prefill

    config, params = random_device_model(model, dtype, layout)
    rate = measure_matmul_rate()
    t = config.max_positions
    tokens = jnp.ones((1, t), jnp.int32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    seconds = median_time(lambda: prefill(config, params, tokens, positions, t)[0].block_until_ready(), repeats)
    h, layers = config.hidden_size, config.num_layers
    matmul_params = layers * (4 * h * h + 2 * h * config.ffn_size)
    flops = 2 * matmul_params * t + 4 * layers * t * t * h + 2 * h * config.vocab_size
    return {"case": "prefill", "model": model, "dtype": dtype, "layout": layout, "tokens": t, "ms": seconds * 1e3,
            "tflops": flops / seconds / 1e12, "matmul_tflops": rate / 1e12, "mfu": flops / seconds / rate}


@TOOL.case
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

    short = median_time(run(1), repeats)
    per_token = (median_time(run(new + 1), repeats) - short) / new
    return {"case": "hf", "model": model, "dtype": "float16", "batch": batch, "new_tokens": new,
            "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token, "torch": torch.__version__}


@TOOL.case
def case_int8_quality(source: str, model: str, compared: str) -> dict:
    """What weight-only int8 (or, for scale, float32) changes against bfloat16: KL of next-token distributions.

    `source`: "fixture" (tests/fixtures/tiny_fp32.ckpt, written by MindSpore,
    on the fixture sequences), "embedded" (tiny-40k on the demo prompts,
    real text) or "random" (random weights of preset `model` on the first
    three demo prompts' tokens). `compared`: "int8 weights", quantized from
    the bfloat16 weights, or "float32", cast from the stored ones. KL(bf16 ||
    other) in nats, mean and max over all positions, and the share of
    positions whose argmax agrees.
    """
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from generate import DEMO_PROMPTS  # a case runs as `python infer/bench.py`, infer/ first on the path

    from pangu_jax import PanguConfig, Tokenizer, forward, init_params, load_checkpoint
    from pangu_jax.assets import EMBEDDED_CHECKPOINT
    from pangu_jax.quantize import quantize_params

    if source == "fixture":
        config, params = load_checkpoint(FIXTURES / "tiny_fp32.ckpt")
        sequences = json.loads((FIXTURES / "inputs.json").read_text())["sequences"]
        name = "fixture tiny (MindSpore weights)"
    elif source == "embedded":
        config, params = load_checkpoint(EMBEDDED_CHECKPOINT)
        sequences, name = Tokenizer().encode_batch(DEMO_PROMPTS), "embedded tiny-40k, real text"
    else:
        config = PanguConfig.preset(model, param_dtype="bfloat16", dtype="bfloat16")
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        sequences, name = Tokenizer().encode_batch(DEMO_PROMPTS[:3]), f"random {model}, demo-prompt tokens"

    def cast(dtype: str):  # LayerNorm stays float32 where it is stored so
        tree = jax.tree.map(lambda a: a if a.dtype == jnp.float32 and a.ndim == 1 else a.astype(dtype), params)
        return config.replace(param_dtype=dtype, dtype=dtype), tree

    def log_probs(model_and_params) -> list[jax.Array]:
        return [jax.nn.log_softmax(forward(*model_and_params, jnp.asarray([seq]))[0][0]) for seq in sequences]

    reference = log_probs(cast("bfloat16"))
    start = time.perf_counter()
    other = log_probs(quantize_params(*cast("bfloat16")) if compared == "int8 weights" else cast("float32"))
    kl = np.concatenate([np.asarray((jnp.exp(p) * (p - q)).sum(-1)) for p, q in zip(reference, other)])
    agree = np.concatenate([np.asarray(p.argmax(-1) == q.argmax(-1)) for p, q in zip(reference, other)])
    return {"case": "int8-quality", "model": name, "against bfloat16": compared, "positions": int(kl.size),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "argmax_agreement": float(agree.mean()),
            "seconds": time.perf_counter() - start}


# --- tables: rows built from cases --------------------------------------------------------------------------


def _list(text: str, kind=str) -> list:
    """A comma-separated option as a list ('' is the empty list)."""
    return [kind(part) for part in text.split(",") if part]


@TOOL.case
def case_evaluate(model: str, dtype: str, examples: int, batch_size: int) -> dict:
    """The zero-shot harness on the offline shopping-sentiment task: examples scored a second (random weights)."""
    from pangu_jax import Tokenizer
    from pangu_jax.evaluate import evaluate_task, shopping_sentiment

    config, params = random_device_model(model, dtype, layout="stacked")
    tokenizer = Tokenizer()
    task = shopping_sentiment(size=examples)
    evaluate_task(config, params, tokenizer, task[:batch_size], batch_size=batch_size)  # compile
    start = time.perf_counter()
    result = evaluate_task(config, params, tokenizer, task, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"case": "evaluate", "model": model, "dtype": dtype, "task": "shopping-sentiment", "examples": examples,
            "batch_size": batch_size, "seconds": seconds, "examples_per_s": examples / seconds,
            "accuracy": result.accuracy, "majority": result.majority_accuracy, "peak_MiB": peak_device_bytes() / 2**20}


@TOOL.table("evaluate")
def evaluate_table(args: argparse.Namespace) -> Table:
    rows = [TOOL.run_case("evaluate", model=args.model, dtype=d, examples=args.examples, batch_size=b)
            for d in args.dtypes.split(",") for b in map(int, args.batches.split(","))]
    return Table(rows, ["case", "model", "dtype", "examples", "batch_size", "seconds", "examples_per_s", "accuracy",
                        "majority", "peak_MiB", "error"])


@TOOL.table("decode")
def decode_table(args: argparse.Namespace) -> Table:
    """Batch-1 decode speed against the bandwidth limit, and peak memory."""
    rows = [TOOL.run_case("decode", args.xla_flags, model=args.model, dtype=d, batch=1, prompt=args.prompt,
                          new=args.new_tokens, repeats=args.repeats, layout=lay, weights=w, attention=a)
            for w in _list(args.weights) for lay in _list(args.layouts) for d in _list(args.dtypes)
            for a in _list(args.attention)]
    memory_dtypes = _list(args.dtypes if args.memory_dtypes is None else args.memory_dtypes)
    rows += [TOOL.run_case("memory", args.xla_flags, model=args.model, dtype=d, weights=w)
             for w in _list(args.weights) for d in memory_dtypes]
    return Table(rows, [
        "case", "model", "dtype", "weights", "layout", "attention", "batch", "prompt", "ms_per_token",
        "chunks_ms_per_token", "stream_ms_per_token", "first_token_ms", "call_ms", "stream_call_ms",
        "stream_equals_generate", "tokens_per_s", "limit_ms", "ratio_to_limit", "copy_bandwidth_GBps",
        "xla_copy_bandwidth_GBps", "read_bandwidth_GBps", "torch_copy_bandwidth_GBps", "peak_MiB",
        "peak_after_prefill_MiB", "prefill_temp_MiB", "decode_temp_MiB", "original_MiB", "error"])


@TOOL.table("profile")
def profile_table(args: argparse.Namespace) -> Table:
    """GPU kernels of one decode chunk; prints the top kernels, families and idle time of each case first."""
    rows = [TOOL.run_case("profile", args.xla_flags, model=args.model, dtype=_list(args.dtypes)[0], batch=b,
                          prompt=16, new=args.new_tokens, weights=w, mesh=args.mesh, hlo_dir=args.dump_hlo,
                          vocab=args.vocab, attention=a)
            for w in _list(args.weights) for b in _list(args.batches, int) for a in _list(args.attention)]
    for row in rows:
        for key, title in (("top", "top kernels per token"), ("families", "kernel families per token"),
                           ("idle_before", "GPU idle per token, by the kernel that ended the wait")):
            print_table(f"{title}: {row.get('model')} {row.get('weights')} batch {row.get('batch')} "
                        f"attention {row.get('attention')}", row.get(key, []),
                        ["kernel", "calls_per_step", "us_per_step"])
    return Table(rows, ["case", "model", "dtype", "weights", "attention", "batch", "mesh", "wall_us_per_step",
                        "gpu_span_us_per_step", "kernel_us_per_step", "idle_us_per_step", "kernels_per_step",
                        "error"])


@TOOL.table("baselines")
def baselines_table(args: argparse.Namespace) -> Table:
    """The peers at batch 1: the original's recompute of every position per token, and HuggingFace's generate()."""
    rows = [TOOL.run_case("recompute", args.xla_flags, model=args.model, dtype="float16", repeats=args.repeats),
            TOOL.run_case("hf", model=args.model, batch=1, new=args.new_tokens, repeats=3)]
    return Table(rows, ["case", "model", "dtype", "batch", "ms_per_token", "tokens_per_s", "error"])


@TOOL.table("throughput")
def throughput_table(args: argparse.Namespace) -> Table:
    """Tokens per second at larger batches, with HuggingFace's beside them."""
    rows = [TOOL.run_case("decode", args.xla_flags, model=args.model, dtype=_list(args.dtypes)[0], batch=b,
                          prompt=args.prompt, new=args.new_tokens, repeats=args.repeats, attention=a)
            for b in _list(args.batches, int) for a in _list(args.attention)]
    hf_batches = _list(args.batches if args.hf_batches is None else args.hf_batches, int)
    rows += [TOOL.run_case("hf", model=args.model, batch=b, new=args.new_tokens, repeats=3) for b in hf_batches]
    return Table(rows, ["case", "model", "dtype", "attention", "batch", "prompt", "ms_per_token",
                        "stream_ms_per_token", "tokens_per_s", "ratio_to_limit", "peak_MiB", "error"])


@TOOL.table("ttft")
def ttft_table(args: argparse.Namespace) -> Table:
    """Time to the first token in a fresh process: with an empty compilation cache, then with the cache filled."""
    vias = _list(args.via)
    if not vias or set(vias) - {"generate", "stream"}:
        raise SystemExit(f"--via: {args.via!r}; give generate and/or stream, comma-separated")
    rows = []
    for via in vias:
        with tempfile.TemporaryDirectory() as cache:
            runs = [TOOL.run_case("ttft", args.xla_flags, model=args.model, dtype=_list(args.dtypes)[0], prompt=16,
                                  cache_dir=cache, via=via, new=args.new_tokens) for _ in range(2)]
        runs[0]["compilation_cache"], runs[1]["compilation_cache"] = "empty (cold)", "filled by the first run"
        rows += runs
    return Table(rows, ["case", "via", "model", "dtype", "prompt", "compilation_cache", "first_token_s",
                        "last_token_s", "error"])


@TOOL.table("tensor-parallel")
def tensor_parallel_table(args: argparse.Namespace) -> Table:
    """Batch-1 decode on meshes of `--tensor` devices, with the scaling efficiency against the first size."""
    sizes = _list(args.tensor, int)
    rows = [TOOL.run_case("decode", args.xla_flags, model=args.model, dtype=_list(args.dtypes)[0], batch=1,
                          prompt=16, new=args.new_tokens, repeats=args.repeats, mesh=f"tensor={n}",
                          vocab=args.vocab, attention=_list(args.attention)[0])
            for n in sizes]
    base = rows[0].get("ms_per_token")
    for n, row in zip(sizes, rows):
        if base and "ms_per_token" in row:
            row["scaling_efficiency"] = base / (n * row["ms_per_token"])
    return Table(rows, ["case", "model", "dtype", "mesh", "vocab", "attention", "xla_flags", "ms_per_token",
                        "limit_ms", "ratio_to_limit", "scaling_efficiency", "peak_MiB", "error"])


@TOOL.table("prefill")
def prefill_table(args: argparse.Namespace) -> Table:
    """A full-context prefill's model-FLOP utilisation."""
    rows = [TOOL.run_case("prefill", args.xla_flags, model=args.model, dtype=d, repeats=args.repeats)
            for d in _list(args.dtypes)]
    return Table(rows, ["case", "model", "dtype", "tokens", "ms", "tflops", "matmul_tflops", "mfu", "error"])


@TOOL.table("int8-quality")
def int8_quality_table(args: argparse.Namespace) -> Table:
    """What int8 weights cost in quality, with float32 against bfloat16 beside it for scale."""
    sources = _list(args.quality_models)
    if not sources or set(sources) - set(QUALITY_MODELS):
        raise SystemExit(f"--quality-models: {args.quality_models!r}; "
                         f"give {', '.join(QUALITY_MODELS)}, comma-separated")
    rows = [TOOL.run_case("int8_quality", args.xla_flags, source=s, model=args.model, compared=c)
            for s in sources for c in ("int8 weights", "float32")]
    return Table(rows, ["model", "against bfloat16", "positions", "mean_kl", "max_kl", "argmax_agreement",
                        "seconds", "error"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = TOOL.parser()
    p.add_argument("--model", default="2.6B", help="the preset (random weights)")
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
    p.add_argument("--weights", default="float", help="decode and profile tables: float and/or int8")
    p.add_argument("--attention", default="auto",
                   help="decode, profile, throughput and tensor-parallel tables: auto, cudnn and/or explicit "
                        "(PanguConfig.attention)")
    p.add_argument("--memory-dtypes", help="decode table: dtypes of the peak-memory cases (default --dtypes; '' none)")
    p.add_argument("--prompt", type=int, default=16,
                   help="decode and throughput tables: prompt length (the decode is timed after it)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--via", default="generate,stream", help="ttft table: time generate() and/or stream()")
    p.add_argument("--quality-models", default=",".join(QUALITY_MODELS),
                   help="int8-quality table: fixture (the MindSpore-written test model), embedded (tiny-40k on "
                        "real text) and/or random (random --model weights)")
    p.add_argument("--examples", type=int, default=256, help="evaluate table: shopping-sentiment examples scored")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    TOOL.main(argv, parse_args)


if __name__ == "__main__":
    main()
