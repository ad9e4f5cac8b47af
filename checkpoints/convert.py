"""Convert a PanGu-alpha checkpoint between formats.

    python checkpoints/convert.py PanguAlpha_2.6B_fp16.ckpt pangu-2.6b --verify-md5 --check
    python checkpoints/convert.py pangu-2.6b pangu-2.6b-hf --to hf --dtype float16

SRC may be a MindSpore .ckpt, a HuggingFace GPTPangu directory, a directory
of .npy files or one of our orbax stores; the format is detected. DST is
written atomically (an existing DST is replaced only on success). --dtype
casts every float tensor but LayerNorm, which stays float32.
"""

from __future__ import annotations

import argparse
import sys

from pangu_jax.checkpoints import CheckpointFormatError, CheckpointMismatchError
from pangu_jax.checkpoints.convert import FORMATS, compare_logits, convert, detect_format, verify_md5
from pangu_jax.config import DTYPES, PRESETS

# --check: an uncast conversion runs the same numbers in the same dtype; allow only float noise.
CHECK_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source checkpoint (file or directory)")
    p.add_argument("dst", help="destination (a .ckpt file for --to mindspore, else a directory)")
    p.add_argument("--to", choices=FORMATS, default="orbax", help="target format (default: orbax)")
    p.add_argument("--model", choices=sorted(PRESETS), help="preset; default: recorded in SRC or inferred from shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="target dtype (default: each tensor's own)")
    p.add_argument("--check", action="store_true", help="reload DST and compare its logits with SRC's")
    p.add_argument("--verify-md5", action="store_true", help="check a released MindSpore SRC against its MD5 first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify_md5:
            if detect_format(args.src) != "mindspore":
                raise CheckpointFormatError(f"{args.src}: --verify-md5 applies to released MindSpore .ckpt files only")
            print(verify_md5(args.src))
        summary = convert(args.src, args.dst, to=args.to, model=args.model, dtype=args.dtype, progress=not args.quiet)
        _print_summary(args, summary)
        if args.check:
            return _check(args, summary)
    except (CheckpointFormatError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _print_summary(args: argparse.Namespace, summary) -> None:
    c = summary.config
    print(f"{summary.source_format} {args.src} -> {summary.target_format} {args.dst}")
    print(f"  config: hidden {c.hidden_size}, layers {c.num_layers}, heads {c.num_heads}, ffn {c.ffn_size}, "
          f"vocab {c.vocab_size}, positions {c.max_positions}, {c.activation}, {c.param_dtype}")
    print(f"  {summary.tensors} tensors, {summary.bytes_written:,} bytes written in {summary.seconds:.1f} s")


def _check(args: argparse.Namespace, summary) -> int:
    diff = compare_logits(args.src, args.dst, summary.config)
    print(f"  check: max abs logit difference {diff:.3g}")
    if args.dtype not in (None, summary.source_dtype):
        return 0  # a cast changes the logits by design; the difference is for information
    if diff > CHECK_TOLERANCE:
        print(f"error: difference {diff:.3g} exceeds {CHECK_TOLERANCE} for an uncast conversion", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
