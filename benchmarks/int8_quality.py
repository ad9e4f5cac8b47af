"""What weight-only int8 costs in quality: KL divergence of next-token distributions against bfloat16.

    python benchmarks/int8_quality.py [--json PATH] [--skip-2.6B]

Three models, each run in bfloat16 and in int8 (bfloat16 compute):
  * the fixture model (tests/fixtures/tiny_fp32.ckpt, written by MindSpore) on the fixture sequences;
  * the embedded tiny-40k model on real text (the seven demo prompts, real tokenizer);
  * random 2.6B weights (normal 0.02) on the demo prompts' tokens.
For scale, the same numbers for float32 against bfloat16 are given beside
them. KL(bf16 || other) in nats, mean and max over all positions, and the
share of positions whose argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from infer.generate import DEMO_PROMPTS  # noqa: E402
from pangu_jax import PanguConfig, Tokenizer, forward, init_params, load_checkpoint  # noqa: E402
from pangu_jax.assets import EMBEDDED_CHECKPOINT  # noqa: E402
from pangu_jax.quantize import quantize_params  # noqa: E402


def _as(config: PanguConfig, params, dtype: str):
    cast = jax.tree.map(lambda a: a if a.dtype == jnp.float32 and a.ndim == 1 else a.astype(dtype), params)
    return config.replace(param_dtype=dtype, dtype=dtype), cast


def _log_probs(model, sequences) -> list[jax.Array]:
    return [jax.nn.log_softmax(forward(*model, jnp.asarray([seq]))[0][0]) for seq in sequences]


def _compare(reference: list[jax.Array], other: list[jax.Array]) -> dict:
    kl = np.concatenate([np.asarray((jnp.exp(p) * (p - q)).sum(-1)) for p, q in zip(reference, other)])
    agree = np.concatenate([np.asarray(p.argmax(-1) == q.argmax(-1)) for p, q in zip(reference, other)])
    return {"positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "argmax_agreement": float(agree.mean())}


def evaluate(name: str, config: PanguConfig, params, sequences) -> list[dict]:
    """int8 is quantized from the bfloat16 weights, float32 cast from the stored ones; one at a time in memory."""
    bf16 = _as(config, params, "bfloat16")
    reference = _log_probs(bf16, sequences)
    rows = []
    for label, make in (("int8 weights", lambda: quantize_params(*bf16)),
                        ("float32", lambda: _as(config, params, "float32"))):
        start = time.perf_counter()
        other = _log_probs(make(), sequences)
        rows.append({"model": name, "against bfloat16": label, **_compare(reference, other),
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--skip-2.6B", dest="skip_big", action="store_true", help="leave out the random 2.6B model")
    args = p.parse_args()
    fixture_sequences = json.loads((ROOT / "tests/fixtures/inputs.json").read_text())["sequences"]
    real_text = Tokenizer().encode_batch(DEMO_PROMPTS)
    rows = evaluate("fixture tiny (MindSpore weights)", *load_checkpoint(ROOT / "tests/fixtures/tiny_fp32.ckpt"),
                    fixture_sequences)
    rows += evaluate("embedded tiny-40k, real text", *load_checkpoint(EMBEDDED_CHECKPOINT), real_text)
    if not args.skip_big:
        config = PanguConfig.preset("2.6B", param_dtype="bfloat16", dtype="bfloat16")
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        rows += evaluate("random 2.6B, demo-prompt tokens", config, params, real_text[:3])
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "card": f"{jax.devices()[0].platform} (jax {jax.__version__})",
                  "command": "python benchmarks/int8_quality.py", "rows": rows}
        Path(args.json).write_text(json.dumps([record], indent=1))


if __name__ == "__main__":
    main()
