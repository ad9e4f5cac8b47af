"""Conversion cost: a synthetic MindSpore file (written by our writer) converted to orbax.

    python benchmarks/convert_bench.py --model 2.6B --workdir /tmp/convert-bench [--json PATH]

Writes the synthetic float16 file (random weights, the fixtures' recipe),
then runs `checkpoints/convert.py SRC DST --to orbax` in a child process and
reports its wall time and peak memory beside the model's size in the
target dtype (the issue's bound: 1.3x): anonymous memory (RssAnon of the
child, sampled every 50 ms: what the conversion allocates) and the peak
resident set (ru_maxrss), which also counts the pages of the memory-mapped
source file, clean and reclaimable by the kernel.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from pangu_jax import PanguConfig  # noqa: E402
from pangu_jax.checkpoints.mindspore_format import write_mindspore  # noqa: E402
from pangu_jax.checkpoints.synthetic import random_mindspore_tensors  # noqa: E402


def _rss_anon(pid: int) -> int:
    """Anonymous resident bytes of a process: what it allocated, not the file pages it has mapped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--workdir", default="/tmp/convert-bench")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = PanguConfig.preset(args.model)
    source, target = work / f"synthetic_{args.model}_fp16.ckpt", work / f"{args.model}.orbax"
    if not source.exists():
        start = time.perf_counter()
        write_mindspore(source, random_mindspore_tensors(config, dtype="float16"))
        print(f"wrote {source} ({source.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f}s")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / "checkpoints/convert.py"), str(source), str(target),
                              "--to", "orbax", "--quiet"])
    anon = 0
    while child.poll() is None:
        anon = max(anon, _rss_anon(child.pid))
        time.sleep(0.05)
    if child.returncode:
        raise SystemExit(f"conversion failed with exit code {child.returncode}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    model_bytes = source.stat().st_size
    row = {"case": "convert mindspore->orbax", "model": args.model, "dtype": "float16", "seconds": seconds,
           "peak_anonymous_GiB": anon / 2**30, "peak_rss_GiB": peak / 2**30, "model_GiB": model_bytes / 2**30,
           "anonymous_ratio_to_model": anon / model_bytes}
    print(json.dumps(row))
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "card": "CPU host (2 cores, 24 GB)",
                  "command": f"python benchmarks/convert_bench.py --model {args.model}", "rows": [row]}
        Path(args.json).write_text(json.dumps([record], indent=1))


if __name__ == "__main__":
    main()
