"""Restore a 13B float16 orbax store onto 1, 2 or 4 GPUs: seconds and per-GPU peak memory.

    python benchmarks/orbax_restore.py write STORE --model 13B
    python benchmarks/orbax_restore.py restore STORE --tensor 4

`write` saves random weights (made on the device) as a store; `restore` times
`load_checkpoint(STORE, mesh=tensor=N)` in a fresh process and reports the
largest per-device peak, which shows that no device held the whole model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["write", "restore"])
    p.add_argument("store")
    p.add_argument("--model", default="13B")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tensor", type=int, default=1)
    args = p.parse_args()
    import jax

    if args.action == "write":
        from bench import _device_model

        from pangu_jax.checkpoints.orbax_store import save_orbax

        config, params = _device_model(args.model, args.dtype, layout="stacked")
        start = time.perf_counter()
        save_orbax(args.store, config, params)
        print(json.dumps({"case": "orbax_write", "model": args.model, "dtype": args.dtype,
                          "seconds": time.perf_counter() - start}))
        return
    from pangu_jax import load_checkpoint
    from pangu_jax.sharding import make_mesh

    mesh = make_mesh(f"tensor={args.tensor}")
    start = time.perf_counter()
    _, params = load_checkpoint(args.store, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20 for d in mesh.devices.flat]
    total = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    print(json.dumps({"case": "orbax_restore", "model": args.model, "dtype": args.dtype, "tensor": args.tensor,
                      "seconds": seconds, "model_MiB": total, "peak_MiB_per_device": peaks,
                      "card": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
