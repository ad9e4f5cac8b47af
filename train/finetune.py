"""Fine-tune PanGu-alpha: continued pre-training on plain text, or supervised on prompt/response pairs.

    python train/finetune.py                                   # the CPU demo (train/configs/demo-cpu.yaml)
    python train/finetune.py --config train/configs/2.6B-full.yaml model.checkpoint=PanguAlpha_2.6B_fp16.ckpt
    python train/finetune.py --config my.yaml run.steps=2000 optimizer.learning_rate=5e-5

A config is YAML with the sections model, data, optimizer, lora and run
(`pangu_jax.train.config`); `key.path=value` arguments override it. A run
lives in run.output_dir: metrics.jsonl, its checkpoints (started again with
the same command, it resumes from the last), and at the end model/, our
orbax store, which infer/generate.py and checkpoints/convert.py read.
Ctrl-C or SIGTERM saves the state and stops after the step in hand.
Several hosts: start one process per host with the usual launcher (SLURM,
or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set); each
reads its own share of every batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pangu_jax.cli import add_vocab_option, script_parser

CONFIGS = Path(__file__).parent / "configs"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--config", default=str(CONFIGS / "demo-cpu.yaml"),
                   help="YAML config (default: train/configs/demo-cpu.yaml, the CPU demo)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides, e.g. run.steps=200")
    add_vocab_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pangu_jax.train.config import load_train_config

    config = load_train_config(args.config, args.overrides)  # checked before anything is loaded or compiled
    from pangu_jax.cli import stop_requests
    from pangu_jax.train.distributed import claim_device_memory, initialize_if_launched
    from pangu_jax.train.loop import finetune

    claim_device_memory()
    initialize_if_launched()
    with stop_requests("stopping: the state is saved after the step in hand") as stop:
        result = finetune(config, vocab_path=args.vocab, cancel=stop, progress=not args.quiet)
    if result.cancelled:
        print(f"stopped at step {result.steps}; the state is saved in {config.run.output_dir}/checkpoints: "
              "run the same command to go on", file=sys.stderr)
        return 128 + stop.signal
    evaluation = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f}"
    print(f"done: {result.steps} steps ({result.skipped} skipped), last loss {result.last_loss:.4f}{evaluation}; "
          f"model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    from pangu_jax.cli import run

    sys.exit(run(main))
