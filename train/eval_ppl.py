"""Perplexity of any checkpoint on any text: how well a fine-tuned (or released) model predicts it.

    python train/eval_ppl.py --checkpoint runs/demo-cpu/model --data held_out.txt
    python train/eval_ppl.py --checkpoint PanguAlpha_2.6B_fp16.ckpt --data corpus:peoples_daily

--checkpoint is anything load_checkpoint reads (a run's model/ folder, a
MindSpore .ckpt, HuggingFace, Megatron, .npy or orbax); --data a text file
(documents separated by blank lines), a JSONL file as fine-tuning reads it,
or corpus:peoples_daily. Each document is scored alone, a long one in
windows of the model's length (pangu_jax.evaluate.perplexity).
"""

from __future__ import annotations

import argparse
import sys

from pangu_jax.cli import add_vocab_option, script_parser
from pangu_jax.config import DTYPES


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="any checkpoint load_checkpoint reads")
    p.add_argument("--data", required=True, help="text or JSONL file, or corpus:peoples_daily")
    p.add_argument("--dtype", choices=DTYPES, help="compute and storage dtype (default: the checkpoint's)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's positions)")
    p.add_argument("--batch-size", type=int, default=8, help="windows run at once (default 8)")
    add_vocab_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pangu_jax import Tokenizer, load_checkpoint
    from pangu_jax.evaluate import perplexity, read_documents
    from pangu_jax.train.data import input_path

    documents = read_documents(input_path(args.data))
    tokenizer = Tokenizer(args.vocab)
    config, params = load_checkpoint(args.checkpoint, dtype=args.dtype)
    found = perplexity(config, params, tokenizer, documents, window=args.window, batch_size=args.batch_size,
                       progress=not args.quiet)
    print(f"{args.data}: {found.summary()}")
    return 0


if __name__ == "__main__":
    from pangu_jax.cli import run

    sys.exit(run(main))
