"""What a new `max_new_tokens` costs a generate() call: seconds per call, in one process.

    python benchmarks/token_count_recompile.py [--model 350M] [--dtype float32] [--counts 20,30,40,30]
        [--repeats 0] [--json PATH]

Calls generate() on one prompt (greedy, random weights, per-layer arrays)
with each count in turn; a call whose programs are compiled already costs
only its prefill and decode, one that compiles costs that too. Also gives
how many prefill and decode programs the process holds after each call,
the decode steps the device ran, and with `--repeats N` the median of N
more calls with the same count (compiled: what each call costs from then on).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, append_record  # noqa: E402
from pangu_jax import PanguConfig  # noqa: E402
from pangu_jax.generate import start  # noqa: E402
from pangu_jax.model import init_params, unstack_layers  # noqa: E402


def generate_steps(config, params, count: int) -> tuple[list[int], int]:
    """generate()'s new tokens for one prompt, and the steps its decode ran on the device."""
    run = start(config, params, [[11, 12, 13, 14, 15]], count, temperature=0, stop_ids=())
    run.finish()
    return run.tokens()[0], int(run.state["step"])


def main(argv: list[str] | None = None) -> None:
    programs = importlib.import_module("pangu_jax.generate")  # the module, not the function of that name
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="350M")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--counts", default="20,30,40,30")
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    config = PanguConfig.preset(args.model, dtype=args.dtype, param_dtype=args.dtype)
    params = unstack_layers(init_params(config, 0))
    rows = []
    for count in map(int, args.counts.split(",")):
        begin = time.perf_counter()
        tokens, steps = generate_steps(config, params, count)
        row = {"max_new_tokens": count, "seconds": time.perf_counter() - begin, "new_tokens": len(tokens),
               "steps": steps, "prefill_programs": programs._prefill._cache_size(),
               "decode_programs": programs._decode._cache_size()}
        if args.repeats:
            warm = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                generate_steps(config, params, count)
                warm.append(time.perf_counter() - begin)
            row["warm_seconds"] = statistics.median(warm)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        append_record(args.json, "python benchmarks/token_count_recompile.py " + " ".join(argv or sys.argv[1:]),
                      _card(), rows, model=args.model, dtype=args.dtype)


if __name__ == "__main__":
    main()
