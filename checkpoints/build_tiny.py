"""Write the tiny random model embedded in the package (pangu_jax/assets/tiny-40k.ckpt).

    python checkpoints/build_tiny.py [--out PATH]

The preset `tiny-40k` (hidden 32, 3 layers, 4 heads, the real 40000-token
vocabulary, 1024 positions) with weights drawn by the fixtures' recipe and
stored as the released fp16 files are: float16, LayerNorm float32.
"""

from __future__ import annotations

import argparse

from pangu_jax.assets import EMBEDDED_CHECKPOINT
from pangu_jax.checkpoints.mindspore_format import write_mindspore
from pangu_jax.checkpoints.synthetic import random_mindspore_tensors
from pangu_jax.config import PanguConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(EMBEDDED_CHECKPOINT))
    args = parser.parse_args()
    write_mindspore(args.out, random_mindspore_tensors(PanguConfig.preset("tiny-40k")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
