"""Checkpoint benchmark: what converting and restoring a model costs, one command per table.

    python checkpoints/bench.py convert --model 2.6B [--workdir DIR]
    python checkpoints/bench.py orbax-restore --model 13B --tensor 1,2,4 [--workdir DIR]

`convert` writes a synthetic MindSpore file of the preset (random weights,
the fixtures' recipe; kept in --workdir for the next run), converts it to
orbax with `checkpoints/convert.py` in a child process and reports its wall
time and peak host memory beside the model's size: anonymous memory (what
the conversion allocates) and the peak resident set, which also counts
clean, reclaimable pages of the memory-mapped source.

`orbax-restore` saves random weights made on the device as a store, then
restores it onto a mesh of each `--tensor` size in a fresh process, with
each device's peak memory: no device should ever hold more than its shard.

Stores and converted copies are written under --workdir and removed after
the run. `--json PATH` appends the rows to a result file for
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pangu_jax.benchmarking import (BenchTool, Table, device_peaks, host_name, random_device_model,
                                    run_measuring_host_memory, tree_bytes)

TOOL = BenchTool(__file__, __doc__)
CONVERT_SCRIPT = Path(__file__).resolve().with_name("convert.py")


@TOOL.case
def case_orbax_write(model: str, dtype: str, store: str) -> dict:
    """Seconds to save random weights of preset `model` (made on the device, stacked) as an orbax store."""
    from pangu_jax.checkpoints.orbax_store import save_orbax

    config, params = random_device_model(model, dtype, layout="stacked")
    start = time.perf_counter()
    save_orbax(store, config, params)
    return {"case": "orbax_write", "model": model, "dtype": dtype, "seconds": time.perf_counter() - start,
            "model_MiB": tree_bytes(params) / 2**20}


@TOOL.case
def case_orbax_restore(model: str, dtype: str, store: str, tensor: int) -> dict:
    """Seconds to restore `store` straight into its shards on a mesh of `tensor` devices, and each device's peak."""
    import jax

    from pangu_jax import load_checkpoint
    from pangu_jax.sharding import make_mesh

    mesh = make_mesh(f"tensor={tensor}")
    start = time.perf_counter()
    _, params = load_checkpoint(store, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peaks = [peak / 2**20 for peak in device_peaks(list(mesh.devices.flat))]
    return {"case": "orbax_restore", "model": model, "dtype": dtype, "tensor": tensor, "seconds": seconds,
            "model_MiB": tree_bytes(params) / 2**20, "peak_MiB": max(peaks), "peak_MiB_per_device": peaks}


@TOOL.table("convert", card=host_name)
def convert_table(args: argparse.Namespace) -> Table:
    """A synthetic MindSpore file of the preset converted to orbax: seconds and peak host memory."""
    from pangu_jax import PanguConfig
    from pangu_jax.checkpoints.mindspore_format import write_mindspore
    from pangu_jax.checkpoints.synthetic import random_mindspore_tensors

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"synthetic_{args.model}_{args.dtype}.ckpt"
    row = {"case": "convert mindspore->orbax", "model": args.model, "dtype": args.dtype}
    if not source.exists():
        start = time.perf_counter()
        write_mindspore(source, random_mindspore_tensors(PanguConfig.preset(args.model), dtype=args.dtype))
        row["source_written_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=work) as folder:
        run = run_measuring_host_memory([sys.executable, str(CONVERT_SCRIPT), str(source), str(Path(folder, "store")),
                                         "--to", "orbax", "--quiet"])
    model_bytes = source.stat().st_size
    row.update(seconds=run.seconds, model_GiB=model_bytes / 2**30, peak_anonymous_GiB=run.peak_anonymous_bytes / 2**30,
               anonymous_ratio_to_model=run.peak_anonymous_bytes / model_bytes, peak_rss_GiB=run.peak_rss_bytes / 2**30)
    if run.returncode:
        row["error"] = f"{CONVERT_SCRIPT.name} exited with status {run.returncode}"
    return Table([row], ["case", "model", "dtype", "seconds", "model_GiB", "peak_anonymous_GiB",
                         "anonymous_ratio_to_model", "peak_rss_GiB", "error"])


@TOOL.table("orbax-restore")
def orbax_restore_table(args: argparse.Namespace) -> Table:
    """An orbax store written once, then restored onto each mesh size in a fresh process."""
    sizes = [int(n) for n in args.tensor.split(",") if n]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        store = str(Path(folder, "store"))
        rows = [TOOL.run_case("orbax_write", model=args.model, dtype=args.dtype, store=store)]
        if "error" not in rows[0]:
            rows += [TOOL.run_case("orbax_restore", model=args.model, dtype=args.dtype, store=store, tensor=n)
                     for n in sizes]
    return Table(rows, ["case", "model", "dtype", "tensor", "seconds", "model_MiB", "peak_MiB", "error"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = TOOL.parser()
    p.add_argument("--model", default="2.6B", help="the preset (random weights)")
    p.add_argument("--dtype", default="float16", help="the weights' dtype")
    p.add_argument("--tensor", default="1", help="orbax-restore table: mesh sizes, comma-separated")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir(), "pangu-checkpoint-bench")),
                   help="where the synthetic source is kept and stores are written (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    TOOL.main(argv, parse_args)


if __name__ == "__main__":
    main()
