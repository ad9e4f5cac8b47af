"""Convert a PanGu-alpha checkpoint between formats.

    python checkpoints/convert.py PanguAlpha_2.6B_fp16.ckpt pangu-2.6b --verify-md5 --check
    python checkpoints/convert.py pangu-2.6b pangu-2.6b-hf --to hf --dtype float16

SRC may be a MindSpore .ckpt, a HuggingFace GPTPangu folder, Megatron
partitions, a folder of .npy files or one of our orbax stores; the format is
detected. DST must not exist yet: an existing checkpoint of the target
format is replaced only with --overwrite, and nothing else ever is. DST is
written beside itself and swapped in at the end: interrupted (Ctrl-C,
SIGTERM), the conversion stops before its next tensor and leaves nothing;
killed outright, what it left is removed by the next conversion to the same
DST. --dtype casts every float tensor but LayerNorm, which stays float32.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pangu_jax.cli import script_parser
from pangu_jax.config import DTYPES, PRESETS

FORMATS = ("orbax", "hf", "mindspore", "npy")
# --check: an uncast conversion runs the same numbers in the same dtype; allow only float noise.
CHECK_TOLERANCE = 1e-4


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("src", help="source checkpoint (file or folder, any supported format)")
    p.add_argument("dst", help="destination (a .ckpt file for --to mindspore, else a new folder)")
    p.add_argument("--to", choices=FORMATS, default="orbax", help="target format (default: orbax)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--model", choices=sorted(PRESETS), help="preset; default: recorded in SRC or inferred from shapes")
    sizes.add_argument("--config", help="the model's config: our config.json or a HuggingFace one (for a size no "
                                        "preset has)")
    p.add_argument("--dtype", choices=DTYPES, help="target dtype (default: each tensor's own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST that is a checkpoint of the target format (nothing else)")
    p.add_argument("--check", action="store_true", help="reload DST and compare its logits with SRC's")
    p.add_argument("--verify-md5", action="store_true", help="check a released MindSpore SRC against its MD5 first")
    p.add_argument("--allow-unknown", action="store_true",
                   help="with --verify-md5: convert a file that is no released one, unverified")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pangu_jax.checkpoints import CheckpointFormatError
    from pangu_jax.checkpoints.convert import ConversionCancelled, convert, detect_format, verify_md5
    from pangu_jax.checkpoints.loading import read_config
    from pangu_jax.cli import stop_requests

    model = read_config(args.config) if args.config else args.model
    if args.verify_md5:
        if detect_format(args.src) != "mindspore":
            raise CheckpointFormatError(f"{args.src}: --verify-md5 applies to released MindSpore .ckpt files only")
        print(verify_md5(args.src, allow_unknown=args.allow_unknown))
    with stop_requests("stopping: the conversion ends before its next tensor and leaves nothing") as stop:
        try:
            summary = convert(args.src, args.dst, to=args.to, model=model, dtype=args.dtype,
                              progress=not args.quiet, overwrite=args.overwrite, cancel=stop)
        except ConversionCancelled as e:
            print(f"interrupted: {e}", file=sys.stderr)
            return 128 + (stop.signal or signal.SIGINT)
    for line in summary.tidied:
        print(f"note: {line}", file=sys.stderr)
    _print_summary(args, summary)
    return _check(args, summary) if args.check else 0


def _print_summary(args: argparse.Namespace, summary) -> None:
    c = summary.config
    print(f"{summary.source_format} {args.src} -> {summary.target_format} {args.dst}")
    print(f"  config: hidden {c.hidden_size}, layers {c.num_layers}, heads {c.num_heads}, ffn {c.ffn_size}, "
          f"vocab {c.vocab_size}, positions {c.max_positions}, {c.activation}, {c.param_dtype}")
    print(f"  {summary.tensors} tensors, {summary.bytes_written:,} bytes written in {summary.seconds:.1f} s")


def _check(args: argparse.Namespace, summary) -> int:
    from pangu_jax.checkpoints.convert import compare_logits

    diff = compare_logits(args.src, args.dst, summary.config)
    print(f"  check: max abs logit difference {diff:.3g}")
    if args.dtype not in (None, summary.source_dtype):
        return 0  # a cast changes the logits by design; the difference is for information
    if diff > CHECK_TOLERANCE:
        print(f"error: difference {diff:.3g} exceeds {CHECK_TOLERANCE} for an uncast conversion", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from pangu_jax.cli import run

    sys.exit(run(main))
