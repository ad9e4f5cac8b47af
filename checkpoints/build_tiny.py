"""Write the tiny random model embedded in the package (pangu_jax/assets/tiny-40k.ckpt).

    python checkpoints/build_tiny.py --out PATH     # anywhere
    python checkpoints/build_tiny.py --overwrite    # rewrite the embedded file

The preset `tiny-40k` (hidden 32, 3 layers, 4 heads, the real 40000-token
vocabulary, 1024 positions) with weights drawn by the fixtures' recipe and
stored as the released fp16 files are: float16, LayerNorm float32, tensors
in the order MindSpore writes them. The same weights give the same bytes, so
the embedded file is this script's output exactly (a test checks it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_jax.assets import EMBEDDED_CHECKPOINT
from pangu_jax.checkpoints.mindspore_format import write_mindspore
from pangu_jax.checkpoints.synthetic import random_mindspore_tensors
from pangu_jax.config import PanguConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the model here")
    where.add_argument("--overwrite", action="store_true", help=f"rewrite the embedded {EMBEDDED_CHECKPOINT}")
    args = parser.parse_args(argv)
    out = EMBEDDED_CHECKPOINT if args.overwrite else args.out
    write_mindspore(out, random_mindspore_tensors(PanguConfig.preset("tiny-40k")))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
