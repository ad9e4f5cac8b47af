"""How long the host takes to hand the device each decode program, and what the device waits.

    python benchmarks/decode_dispatch.py --model 2.6B --dtype bfloat16 \
        [--variants default,no_graphs,graphs_everywhere] [--rounds 5] [--json PATH]

For each variant of XLA options (`compile_options_sweep.VARIANTS`) the
decode programs are compiled with those options and run from copies of one
prefilled batch (batch 1), the device idle before each timing:

- `stream_chunks`: a stream's chunks on one device (`_decode_until_done`,
  always compiled with loops as CUDA graph nodes, the variant's options
  added), back to back, no reads between;
- `chunks`: the same with fixed 16-step chunks (`_decode`, as on a mesh);
- `to_end`: generate's program (chunks, then single steps to the limit);
- `single_steps`: the same program with one-step chunks: a loop of single
  steps whose condition is read on the device or by the host.

Each program runs 32 and 64 steps; a row gives the host time until the
first call returned and the longest of the later calls, the time until the
device was done, per step, the difference per step between the two runs
(`marginal_ms_per_step`) and what that leaves (`fixed_ms`: dispatch and
the device's waits), and whether the tokens equal the first variant's
`to_end`. A call that returns only when its program is done has its loop
conditions read by the host.

Measured on an H200 (2026-12-01, 2.6B bf16;
`benchmarks/results/2026-12-01-h200-stream-until-done.json`): by default
generate's program 1.83 ms a step marginal and 5.5 ms fixed, fixed chunks
1.96 marginal, host-read single steps 1.98; with loops as graph nodes,
single steps 1.92-1.93 and the call returns before it is done; with no
CUDA graphs the host launches kernels slower than the GPU runs them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.compile_options_sweep import VARIANTS, _options  # noqa: E402

PROGRAMS = ("stream_chunks", "chunks", "to_end", "single_steps")


def measure(config, params, variants: list[str], *, prompt: int, new: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pangu_jax.generate import _GRAPHS_WITH_LOOPS, _decode, _decode_until_done, start

    prompts = np.random.default_rng(0).integers(10, config.vocab_size, (1, prompt)).tolist()
    run = start(config, params, prompts, new + 1, temperature=0, stop_ids=())
    prefilled = jax.block_until_ready(run.state)
    if new % (2 * run.chunk):
        raise SystemExit(f"--new-tokens: {new} is not a multiple of twice the chunk ({2 * run.chunk})")
    lengths = {"short": new // 2, "long": new}

    def compiled(options: dict, chunk: int, to_end: bool | None):
        """`_decode`, or with `to_end=None` `_decode_until_done`, compiled with `options`."""
        if to_end is None:
            return _decode_until_done.lower(config, params, prefilled, sampler=run.sampler, stop_ids=run.stop_ids,
                                            chunk=chunk).compile(compiler_options={**_GRAPHS_WITH_LOOPS, **options})
        return _decode.lower(config, params, prefilled, sampler=run.sampler, stop_ids=run.stop_ids,
                             chunk=chunk, to_end=to_end).compile(compiler_options=options)

    def fresh(steps: int):
        """A copy of the prefilled state whose row is done after `steps` more tokens."""
        state = jax.tree.map(lambda x: x.copy(), prefilled)
        state["limits"] = jnp.full_like(prefilled["limits"], int(prefilled["lengths"][0]) + steps)
        return jax.block_until_ready(state)

    def timed(fns, steps: int):
        state, dispatches = fresh(steps), []
        began = time.perf_counter()
        for fn in fns:
            state, _ = fn(params, state)
            dispatches.append(time.perf_counter() - began - sum(dispatches))
        jax.block_until_ready(state)
        return time.perf_counter() - began, dispatches, state

    programs, rows = {}, []
    for name in variants:
        options = _options(name, "")
        try:
            began = time.perf_counter()
            until_done, chunk, to_end, single = (
                compiled(options, run.chunk, None), compiled(options, run.chunk, False),
                compiled(options, run.chunk, True), compiled(options, 1, True))
            compile_s = time.perf_counter() - began
        except Exception as error:  # an option this XLA lacks: that variant's row says so
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        programs[name] = {"stream_chunks": lambda steps, fn=until_done: [fn] * (steps // run.chunk),
                          "chunks": lambda steps, fn=chunk: [fn] * (steps // run.chunk),
                          "to_end": lambda steps, fn=to_end: [fn], "single_steps": lambda steps, fn=single: [fn]}
        for fn in (until_done, chunk, to_end, single):  # the first run of each loads it
            timed([fn], run.chunk)
        rows += [{"variant": name, "program": p, "options": options, "compile_s": compile_s,
                  **{f"{k}_times": [] for k in lengths}, "dispatches": []} for p in PROGRAMS]
    for _ in range(rounds):
        for row in rows:
            if "error" in row:
                continue
            for length, steps in lengths.items():
                seconds, dispatches, state = timed(programs[row["variant"]][row["program"]](steps), steps)
                row[f"{length}_times"].append(seconds)
                row[f"{length}_steps"] = int(state["step"]) - int(prefilled["step"])
            row["dispatches"].append(dispatches)
            row["tokens"] = np.asarray(state["out"])[0, : int(state["lengths"][0])].tolist()
    reference = next((row["tokens"] for row in rows if row.get("program") == "to_end"), None)
    for row in rows:
        if "error" in row:
            continue
        tokens, dispatches = row.pop("tokens"), row.pop("dispatches")
        short, long = (statistics.median(row.pop(f"{k}_times")) for k in lengths)
        steps = row.pop("long_steps")
        per_step = (long - short) / (steps - row.pop("short_steps"))
        row.update(same_tokens=tokens == reference, steps=steps, total_ms=long * 1e3,
                   ms_per_step=long / steps * 1e3, marginal_ms_per_step=per_step * 1e3,
                   fixed_ms=(long - per_step * steps) * 1e3,
                   first_dispatch_ms=statistics.median(d[0] for d in dispatches) * 1e3,
                   next_dispatch_ms=statistics.median(max(d[1:], default=0) for d in dispatches) * 1e3,
                   returned_before_done=statistics.median(d[0] for d in dispatches) < 0.5 * long)
    return rows


def main(argv: list[str] | None = None) -> None:
    from infer.bench import _card, _device_model, _print_table, append_record

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default="default,no_graphs,graphs_everywhere",
                   help=f"comma-separated; from: {', '.join(VARIANTS)}")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="append the rows to this JSON file")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    for name in variants:
        _options(name, "")
    config, params = _device_model(args.model, args.dtype)
    rows = [dict(model=args.model, dtype=args.dtype, **row)
            for row in measure(config, params, variants, prompt=args.prompt, new=args.new_tokens, rounds=args.rounds)]
    card = _card()
    _print_table(f"decode programs' dispatch on {card}, {time.strftime('%Y-%m-%d')}", rows,
                 ["variant", "program", "model", "dtype", "steps", "first_dispatch_ms", "next_dispatch_ms", "total_ms",
                  "ms_per_step", "marginal_ms_per_step", "fixed_ms", "returned_before_done", "same_tokens",
                  "compile_s", "error"])
    if args.json:
        command = "python benchmarks/decode_dispatch.py " + " ".join(argv or sys.argv[1:])
        append_record(args.json, command, card, rows)


if __name__ == "__main__":
    main()
