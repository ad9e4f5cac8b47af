"""How steady is the memory bandwidth the decode limit is computed from? Each way of measuring, several times.

    python benchmarks/bandwidth_check.py [--rounds 5] [--json PATH]

Rounds of `infer/bench.py`'s `measure_bandwidths` (an elementwise copy, XLA's
copy, row sums and, where PyTorch sees a GPU, its device-to-device copy)
and a weight stream shaped like decoding (matrix-vector products over 5 GiB
of bfloat16 matrices of 2.6B's FFN size, one vector each). Prints GB/s per
round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _card, _median_time, append_record, measure_bandwidths  # noqa: E402


def matvec_stream() -> float:
    """Bytes per second of 96 products [1, 2560] x [2560, 10240] in bfloat16 (5 GiB of matrices)."""
    count = 96 if jax.default_backend() == "gpu" else 2
    mats = [jnp.full((2560, 10240), 0.01, jnp.bfloat16) for _ in range(count)]
    x = jnp.ones((1, 2560), jnp.bfloat16)
    run = jax.jit(lambda x, mats: [x @ m for m in mats])
    return sum(m.nbytes for m in mats) / _median_time(lambda: jax.block_until_ready(run(x, mats)), 10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for i in range(args.rounds):
        row = {"round": i, **{k: v / 1e9 for k, v in measure_bandwidths().items()}, "matvec": matvec_stream() / 1e9}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        append_record(args.json, "python benchmarks/bandwidth_check.py " + " ".join(argv or sys.argv[1:]), _card(),
                      rows, unit="GB/s")


if __name__ == "__main__":
    main()
