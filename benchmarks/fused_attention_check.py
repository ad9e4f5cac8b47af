"""On a GPU: do the fused attention kernels (cuDNN, Pallas decode) compute what the explicit one does?

    python benchmarks/fused_attention_check.py [--model 2.6B] [--attention auto|cudnn] [--mesh tensor=4] [--prompts 1|2]
        [--json PATH]

Random weights in bfloat16; two prompts (1000 tokens, and 341 behind 683
of left padding, for 1024 positions; with `--prompts 1` the first alone, so
that decoding runs at one row and its products as row reductions) prefilled
with the fused attention (`--attention`) and with the explicit einsum/softmax
path (`PanguConfig.attention="explicit"`), then 16 greedy tokens each way
(decoded with the same attention as the prefill); with `--mesh`, the fused
run also on that mesh. Prints the largest logit difference at the last
prompt position, whether the argmax agrees and whether the greedy
continuations are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))

from infer.bench import _device_model  # noqa: E402
from pangu_jax import generate, model  # noqa: E402
from pangu_jax.generate import _left_pad  # noqa: E402
from pangu_jax.sharding import make_mesh, shard_params  # noqa: E402


def run(config, params, prompts):
    tokens, positions = _left_pad(prompts, config.max_positions)
    logits, _ = model.prefill(config, params, tokens, positions, config.max_positions)
    return np.asarray(logits[:, -1], np.float32), generate(config, params, prompts, 16, temperature=0, stop_ids=())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2.6B")
    p.add_argument("--mesh")
    p.add_argument("--attention", default="auto", help="the fused configuration (PanguConfig.attention)")
    p.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    p.add_argument("--json")
    args = p.parse_args()
    config, params = _device_model(args.model, "bfloat16", attention=args.attention)
    rng = np.random.default_rng(0)
    lengths = (config.max_positions - 24, config.max_positions // 3)[:args.prompts]
    prompts = [rng.integers(10, config.vocab_size, n).tolist() for n in lengths]
    assert model._fused_attention(config), "no fused attention here (needs a GPU and 16-bit compute)"
    fused_logits, fused_tokens = run(config, params, prompts)
    plain_logits, plain_tokens = run(config.replace(attention="explicit"), params, prompts)
    row = {"model": args.model, "dtype": "bfloat16", "attention": args.attention, "card": jax.devices()[0].device_kind,
           "max_abs_logit_diff": float(np.abs(fused_logits - plain_logits).max()),
           "logit_scale": float(np.abs(plain_logits).max()),
           "argmax_equal": bool((fused_logits.argmax(-1) == plain_logits.argmax(-1)).all()),
           "greedy_equal": fused_tokens == plain_tokens}
    if args.mesh:
        placed = shard_params(config, params, make_mesh(args.mesh))
        mesh_logits, mesh_tokens = run(config, placed, prompts)
        row.update(mesh=args.mesh, mesh_max_abs_logit_diff=float(np.abs(mesh_logits - fused_logits).max()),
                   mesh_greedy_equal=mesh_tokens == fused_tokens)
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps([{"date": time.strftime("%Y-%m-%d"), "command":
                                               "python benchmarks/fused_attention_check.py " + " ".join(sys.argv[1:]),
                                               "rows": [row]}], indent=1))


if __name__ == "__main__":
    main()
