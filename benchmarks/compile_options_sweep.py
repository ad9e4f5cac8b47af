"""The decode chunk compiled with different XLA options, timed side by side in one process.

    python benchmarks/compile_options_sweep.py --model 2.6B --dtype bfloat16 --batches 1,32 \
        [--variants default,warp_specialization,...] [--mesh tensor=4] [--profile] [--json PATH]

XLA options (`DebugOptions` fields) can be given to one compilation instead
of the whole process (`XLA_FLAGS`), so one model on the device and one
prefilled batch serve every variant: each variant compiles the same decode
chunk with its options, and the timing rounds alternate between the
variants, each call starting from a copy of the same prefilled state (the
same cache positions, so the same work). The first variant is the
baseline; every row states its time and ratio to it, how long it took to
compile, and whether its greedy tokens equal the baseline's. With
`--profile`, also each variant's GPU kernels per step (`infer/bench.py`'s
`profile_kernels`). An option this XLA does not know is reported as that
variant's error. XLA keeps its matmul autotuning results for the whole
process, so `exhaustive_tiling` (which changes only that search) must run
alone in its process, against `default` in another.

Measured on an H100 (2026-11-28, 2.6B bf16, first decode chunk after a
16-token prompt; `benchmarks/results/2026-11-28-h100-decode-split-attention-xla-options.json`):
no option beat the default by more than run-to-run noise; exhaustive tiling
3.14 against 3.19-3.23 ms a step at batch 32 (compiling 128 s against 4.6).
On an H200 (2026-12-01, 2.6B bf16, batch 1;
`benchmarks/results/2026-12-01-h200-down-parts-added.json`): programmatic
dependent launch is on by default (`no_pdl` 2.11 against 2.07 ms a step),
and CUDA graphs for every kernel run, loops unrolled or not, 2.07-2.08.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

_ALL_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# name -> the XLA options of that compilation; "{cache}" stands for --autotune-cache.
VARIANTS = {
    "default": {},
    "exhaustive_tiling": {"xla_gpu_exhaustive_tiling_search": True,
                          "xla_gpu_per_fusion_autotune_cache_dir": "{cache}"},
    "warp_specialization": {"xla_gpu_experimental_enable_triton_warp_specialization": True},
    "fusion_autotuner": {"xla_gpu_experimental_enable_fusion_autotuner": True},
    "all_fusions_triton": {"xla_gpu_experimental_all_fusions_with_triton": True},
    "triton_multi_output": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
    "heroless_priority_fusion": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    "block_level_rewriter": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
    "tiling_propagation": {"xla_gpu_experimental_enable_tiling_propagation": True},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "command_buffers_while": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE"},
    "collectives_early": {"xla_gpu_experimental_collective_start_as_early_as_possible": True},
    "nccl_symmetric_buffers": {"xla_gpu_experimental_enable_nccl_symmetric_buffers": True},
    # Programmatic dependent launch (Hopper): a kernel starts while the one
    # before it drains, and waits for its results in the kernel.
    "pdl": {"xla_gpu_enable_pdl": True},
    "no_pdl": {"xla_gpu_enable_pdl": False},
    # Every run of kernels a CUDA graph, loops included: as graph nodes, or
    # unrolled into the graph (a chunk's 16 steps one graph).
    # No CUDA graphs at all: every kernel launched by the host as it goes.
    "no_graphs": {"xla_gpu_enable_command_buffer": ""},
    # The default graphs, and loops as graph nodes whose condition the device reads.
    "graphs_loops": {"xla_gpu_enable_command_buffer": _ALL_COMMANDS},
    "graphs_everywhere": {"xla_gpu_enable_command_buffer": _ALL_COMMANDS, "xla_gpu_graph_min_graph_size": 1},
    "graphs_unrolled": {"xla_gpu_enable_command_buffer": _ALL_COMMANDS, "xla_gpu_graph_min_graph_size": 1,
                        "xla_gpu_command_buffer_unroll_loops": True},
    "graphs_unrolled_pdl": {"xla_gpu_enable_command_buffer": _ALL_COMMANDS, "xla_gpu_graph_min_graph_size": 1,
                            "xla_gpu_command_buffer_unroll_loops": True, "xla_gpu_enable_pdl": True},
}


def _options(name: str, cache: str) -> dict:
    if name not in VARIANTS:
        raise SystemExit(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return {k: (v.replace("{cache}", cache) if isinstance(v, str) else v) for k, v in VARIANTS[name].items()}


def sweep(config, params, batch: int, variants: list[str], *, prompt: int, new: int, rounds: int,
          cache: str, profile: bool) -> list[dict]:
    """One row per variant: the decode chunk compiled with its options and timed from the same state."""
    import jax
    import numpy as np

    from infer.bench import profile_kernels
    from pangu_jax.generate import _decode, start

    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (batch, prompt)).tolist()
    run = start(config, params, prompts, new + 1, temperature=0, stop_ids=())
    prefilled = run.state
    lowered = _decode.lower(config, params, prefilled, sampler=run.sampler, stop_ids=run.stop_ids,
                            chunk=run.chunk, to_end=False)

    def fresh():
        return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), prefilled))

    rows, compiled = [], {}
    for name in variants:
        row = {"variant": name, "options": _options(name, cache), "batch": batch, "chunk": run.chunk}
        rows.append(row)
        try:
            began = time.perf_counter()
            compiled[name] = lowered.compile(compiler_options=row["options"])
            row["compile_s"] = time.perf_counter() - began
            state, _ = jax.block_until_ready(compiled[name](params, fresh()))
            row["tokens"] = np.asarray(state["out"]).tolist()
        except Exception as error:  # an option this XLA lacks, or a failed compile: that row's result
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            compiled.pop(name, None)
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, fn in compiled.items():
            state = fresh()
            began = time.perf_counter()
            jax.block_until_ready(fn(params, state))
            times[name].append(time.perf_counter() - began)
    base = None
    for row in rows:
        name = row["variant"]
        if name not in compiled:
            continue
        per_step = statistics.median(times[name]) / run.chunk
        base = base or (per_step, row["tokens"])
        row.update(ms_per_step=per_step * 1e3, tokens_per_s=batch / per_step, ratio_to_first=base[0] / per_step,
                   same_tokens_as_first=row.pop("tokens") == base[1])
        if profile:
            found = profile_kernels(lambda fn=compiled[name]: fn(params, fresh()), run.chunk)
            row.update({k: found[k] for k in ("wall_us_per_step", "kernel_us_per_step", "kernels_per_step")},
                       top=found["top"][:12])
    return rows


def main(argv: list[str] | None = None) -> None:
    from infer.bench import _card, _device_model, _print_table, append_record

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--mesh", help="e.g. tensor=4")
    p.add_argument("--variants", default="default,warp_specialization,fusion_autotuner,triton_multi_output",
                   help=f"comma-separated, the first is the baseline; from: {', '.join(VARIANTS)}")
    p.add_argument("--autotune-cache", default="/tmp/pangu-autotune", help="folder for XLA's per-fusion autotune cache")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", help="append the rows to this JSON file")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    for name in variants:
        _options(name, args.autotune_cache)
    if "exhaustive_tiling" in variants and len(variants) > 1:
        raise SystemExit("--variants: exhaustive_tiling must run alone (XLA reuses the process's autotuning "
                         "results, so beside another variant it would not search); compare it with a run of default")
    config, params = _device_model(args.model, args.dtype, mesh=args.mesh)
    rows = [dict(model=args.model, dtype=args.dtype, mesh=args.mesh or "", **row)
            for b in map(int, args.batches.split(","))
            for row in sweep(config, params, b, variants, prompt=args.prompt, new=args.new_tokens,
                             rounds=args.rounds, cache=args.autotune_cache, profile=args.profile)]
    card = _card()
    _print_table(f"decode chunk per XLA options on {card}, {time.strftime('%Y-%m-%d')}", rows,
                 ["variant", "model", "dtype", "mesh", "batch", "compile_s", "ms_per_step", "tokens_per_s",
                  "ratio_to_first", "same_tokens_as_first", "kernels_per_step", "kernel_us_per_step", "error"])
    if args.json:
        command = "python benchmarks/compile_options_sweep.py " + " ".join(argv or sys.argv[1:])
        append_record(args.json, command, card, rows)


if __name__ == "__main__":
    main()
