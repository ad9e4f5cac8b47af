"""Fine-tuning benchmark: tokens/s, model FLOPs utilisation and peak memory of the train step, beside the peer.

    python train/bench.py finetune --model 2.6B --micro-batches 4,8 --remats full,dots_with_no_batch_dims
    python train/bench.py finetune --model 13B --micro-batches 4 --lora-rank 16 --param-dtype bfloat16 --peer-batches ''
    python train/bench.py profile --model 2.6B --micro-batches 8 --remats dots_with_no_batch_dims
    python train/bench.py attention --model 2.6B --micro-batches 8
    python train/bench.py run --model 2.6B --steps 300 --micro-batch 8     # a whole run on the People's Daily

`finetune`: our compiled train step (random weights of a preset, random
tokens; speed does not depend on either) for each micro-batch and remat
policy, each case in its own process, and in the same run the PyTorch peer
a user would pick instead: HuggingFace transformers' GPT-2 of identical
dimensions with bf16 autocast, fused AdamW, SDPA attention and
torch.compile. Model FLOPs per token follow MaxText's convention
(`pangu_jax.train.metrics.flops_per_token`: 6 x matmul parameters +
attention + logits; with LoRA the base matrices count 4, no weight
gradient); MFU is given against the card's dense bf16 peak (989 TFLOP/s
for H100 and H200) and against the bf16 matmul rate measured in the same
process. `profile`: the GPU kernels of our step. `attention`: one block's
attention kernels, forward and backward, beside the peer's. `run`:
`train/finetune.py` itself with the given overrides, for a loss curve and
the loop's own timing.
"""

from __future__ import annotations

import argparse
import time

from pangu_jax.benchmarking import (BenchTool, Table, measure_matmul_rate, median_time, peak_device_bytes,
                                    print_table)

TOOL = BenchTool(__file__, __doc__)


@TOOL.case
def case_step(model: str, micro_batch: int, remat: str, seq_len: int, steps: int, dtype: str = "bfloat16",
              param_dtype: str = "float32", lora_rank: int = 0, moments: str = "float32",
              attention: str = "auto", packing: str = "reset", accumulation: int = 1, profile: bool = False) -> dict:
    """Our train step on one device: seconds per step (median of `steps` after two to compile), MFU, peak memory.

    A step sums the gradients of `accumulation` micro-batches of `micro_batch`
    rows. `packing` is the data's: a `concat` batch masks attention by the
    row order alone (`Trainer.causal_rows`).

    With `profile`, also the GPU kernels of two more steps (`profile_kernels`).
    """
    import jax
    import numpy as np

    from pangu_jax.benchmarking import profile_kernels, random_device_model
    from pangu_jax.sharding import TRAIN_RULES, make_mesh, param_shardings
    from pangu_jax.train.config import OptimizerConfig
    from pangu_jax.train.distributed import claim_device_memory
    from pangu_jax.train.lora import init_adapters, join
    from pangu_jax.train.metrics import flops_per_token, peak_flops
    from pangu_jax.train.optimizer import make_optimizer
    from pangu_jax.train.step import Trainer

    claim_device_memory()
    config, params = random_device_model(model, param_dtype, layout="stacked")
    config = config.replace(dtype=dtype, lora_rank=lora_rank, attention=attention)
    mesh = make_mesh("fsdp=1")
    if lora_rank:
        params = join(init_adapters(config, jax.random.key(1), param_shardings(config, mesh, rules=TRAIN_RULES)),
                      params)
    optimizer = make_optimizer(OptimizerConfig(warmup_steps=10, moments_dtype=moments), 1000)
    trainer = Trainer(config.resolved(), optimizer, mesh, accumulation=accumulation, remat=remat,
                      causal_rows=packing == "concat")
    state = trainer.new_state(params)
    del params
    rng = np.random.default_rng(0)
    rows = micro_batch * accumulation
    tokens = rng.integers(10, config.vocab_size, (rows, seq_len + 1)).astype(np.int32)
    batch = trainer.place_batch({
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "loss_weights": np.ones((rows, seq_len), np.float32)})
    metrics = {}

    def one_step():
        nonlocal state, metrics
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - start
    seconds = median_time(one_step, steps)
    tokens_per_s = rows * seq_len / seconds
    flops = flops_per_token(config, seq_len, adapters_only=bool(lora_rank))
    found = {}
    if profile:
        found = profile_kernels(lambda: [one_step() for _ in range(2)], 2)
    matmul = measure_matmul_rate()
    peak = peak_flops()
    return {**found, "case": "ours", "model": model, "lora_rank": lora_rank, "micro_batch": micro_batch,
            "accumulation": accumulation, "remat": remat, "attention": config.resolved().attention, "packing": packing,
            "dtype": dtype, "param_dtype": param_dtype, "moments": moments, "seq_len": seq_len,
            "step_s": seconds, "tokens_per_s": tokens_per_s, "compile_s": compile_s, "flops_per_token": flops,
            "tflops": flops * tokens_per_s / 1e12, "mfu": flops * tokens_per_s / peak if peak else None,
            "matmul_tflops": matmul / 1e12, "ratio_to_matmul": flops * tokens_per_s / matmul,
            "loss": float(metrics["loss"]), "peak_MiB": peak_device_bytes() / 2**20}


@TOOL.case
def case_peer(model: str, batch: int, seq_len: int, steps: int, accumulation: int = 1, compile: bool = True) -> dict:
    """HuggingFace GPT-2 of the same dimensions, bf16 autocast, fused AdamW, SDPA, torch.compile: one step's time.

    A step sums the gradients of `accumulation` batches of `batch` rows.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pangu_jax import PanguConfig
    from pangu_jax.train.metrics import flops_per_token, peak_flops

    c = PanguConfig.preset(model)
    cfg = GPT2Config(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads, n_positions=c.max_positions,
                     vocab_size=c.vocab_size, n_inner=c.ffn_size, attn_implementation="sdpa",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("cuda"):
        net = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(10, c.vocab_size, (batch, seq_len), device="cuda")

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(input_ids=ids, labels=ids).loss / accumulation
        loss.backward()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    if compile:
        forward_backward, update = torch.compile(forward_backward), torch.compile(update)

    def run():
        for _ in range(accumulation):
            forward_backward()
        update()
        torch.cuda.synchronize()

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    seconds = median_time(run, steps)
    tokens_per_s = batch * accumulation * seq_len / seconds
    flops = flops_per_token(c, seq_len)
    peak = peak_flops()
    return {"case": "peer (torch.compile)" if compile else "peer (eager)", "model": model, "micro_batch": batch,
            "accumulation": accumulation, "seq_len": seq_len, "step_s": seconds, "tokens_per_s": tokens_per_s,
            "compile_s": compile_s, "flops_per_token": flops, "tflops": flops * tokens_per_s / 1e12,
            "mfu": flops * tokens_per_s / peak if peak else None,
            "peak_MiB": torch.cuda.max_memory_allocated() / 2**20, "torch": torch.__version__}


@TOOL.table("finetune")
def table_finetune(args: argparse.Namespace) -> Table:
    rows = _step_rows(args)
    peers = [TOOL.run_case("peer", model=args.model, batch=b, seq_len=args.seq_len, steps=args.steps, accumulation=a)
             for b in _ints(args.peer_batches) for a in _ints(args.accumulations)]
    best_peer = max((row.get("tokens_per_s", 0) for row in peers), default=0)
    for row in rows:
        if best_peer and "tokens_per_s" in row:
            row["ratio_to_peer"] = row["tokens_per_s"] / best_peer
    return Table(rows + peers, ["case", "model", "lora_rank", "micro_batch", "accumulation", "remat", "attention",
                                "packing", "moments", "step_s",
                                "tokens_per_s", "tflops", "mfu", "ratio_to_matmul", "matmul_tflops",
                                "ratio_to_peer", "peak_MiB", "compile_s", "error"])


@TOOL.table("profile")
def table_profile(args: argparse.Namespace) -> Table:
    """Where our step spends its time: each case's top kernels, kernel families and idle time, then the steps."""
    rows = _step_rows(args, profile=True)
    for row in rows:
        for key, title in (("top", "top kernels per step"), ("families", "kernel families per step"),
                           ("idle_before", "GPU idle per step, by the kernel that ended the wait")):
            print_table(f"{title}: {row.get('model')} micro-batch {row.get('micro_batch')} remat {row.get('remat')}",
                        row.get(key, []), ["kernel", "calls_per_step", "us_per_step"])
    return Table(rows, ["case", "model", "micro_batch", "accumulation", "remat", "attention", "packing", "step_s",
                        "tokens_per_s", "mfu", "wall_us_per_step", "gpu_span_us_per_step", "kernel_us_per_step",
                        "idle_us_per_step", "kernels_per_step", "error"])


ATTENTION_MASKS = ("causal", "causal+bias", "bias", "torch")


@TOOL.case
def case_attention(model: str, batch: int, seq_len: int, mask: str, steps: int) -> dict:
    """One block's attention, forward and backward, at the training shape in bfloat16.

    `mask`: "causal" (cuDNN's causal mask alone, as `concat` rows run),
    "causal+bias" (and the document mask as a bias, as `reset` rows run),
    "bias" (the bias alone), or "torch" (the peer's SDPA, causal). TFLOP/s
    count the causal half: 2 x batch x length^2 x hidden forward, 2.5 times
    that backward.
    """
    from pangu_jax import PanguConfig
    from pangu_jax.train.metrics import peak_flops

    c = PanguConfig.preset(model)
    shape = (batch, seq_len, c.num_heads, c.head_dim)
    scale = c.head_dim ** -0.5
    if mask == "torch":
        import torch
        import torch.nn.functional as F

        q, k, v = (torch.randn(batch, c.num_heads, seq_len, c.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)

        def run():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).backward(grad)
            torch.cuda.synchronize()
    else:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from pangu_jax.kernels.cudnn_attention import cudnn_attention
        from pangu_jax.layers import visible

        q, k, v, grad = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4))
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        segments = jnp.asarray(np.ones((batch, seq_len), np.int32))

        def attend(q, k, v):
            if mask == "causal":
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
            return cudnn_attention(q, k, v, visible(positions, positions, segments, segments, mask != "bias"),
                                   scale=scale, causal=mask != "bias")

        backward = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](grad))

        def run():
            jax.block_until_ready(backward(q, k, v))

    run()
    seconds = median_time(run, steps)
    flops = 3.5 * 2 * batch * seq_len**2 * c.hidden_size
    peak = peak_flops()
    return {"case": "attention", "model": model, "mask": mask, "batch": batch, "seq_len": seq_len,
            "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
            "ratio_to_peak": flops / seconds / peak if peak else None}


@TOOL.table("attention")
def table_attention(args: argparse.Namespace) -> Table:
    rows = [TOOL.run_case("attention", model=args.model, batch=b, seq_len=args.seq_len, mask=m, steps=args.steps)
            for b in _ints(args.micro_batches) for m in ATTENTION_MASKS]
    return Table(rows, ["case", "model", "mask", "batch", "seq_len", "ms", "tflops", "ratio_to_peak", "error"])


@TOOL.case
def case_run(overrides: list[str]) -> dict:
    """train/finetune.py's loop with `overrides` over the 2.6B-full config: its last record and the loss curve."""
    import json
    from pathlib import Path

    from pangu_jax.train.config import load_train_config
    from pangu_jax.train.distributed import claim_device_memory
    from pangu_jax.train.loop import finetune

    claim_device_memory()
    config = load_train_config(Path(__file__).parent / "configs" / "2.6B-full.yaml", overrides)
    result = finetune(config, progress=False)
    records = [json.loads(line) for line in (Path(config.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["loss"]) for r in records if "loss" in r]
    speeds = [r for r in records if "tokens_per_s" in r]
    return {"case": "run", "overrides": " ".join(overrides), "steps": result.steps, "first_loss": curve[0][1],
            "last_loss": result.last_loss, "eval_loss": result.eval_loss,
            "tokens_per_s": speeds[-1]["tokens_per_s"] if speeds else None,
            "mfu": speeds[-1].get("mfu") if speeds else None, "peak_MiB": peak_device_bytes() / 2**20,
            "curve": curve, "evaluations": [r for r in records if "eval_loss" in r]}


@TOOL.table("run")
def table_run(args: argparse.Namespace) -> Table:
    overrides = [f"model.preset={args.model}", "model.random_init=true", f"run.steps={args.steps}",
                 f"run.micro_batch={args.micro_batch}", f"data.batch_size={args.micro_batch}",
                 f"run.output_dir={args.output_dir}", "run.save=false", *args.overrides]
    return Table([TOOL.run_case("run", overrides=overrides)],
                 ["case", "steps", "first_loss", "last_loss", "eval_loss", "tokens_per_s", "mfu", "peak_MiB",
                  "error"])


def _step_rows(args: argparse.Namespace, profile: bool = False) -> list[dict]:
    """Our step for each micro-batch, remat policy and packing asked, each in its own process."""
    return [TOOL.run_case("step", model=args.model, micro_batch=b, remat=r, seq_len=args.seq_len, steps=args.steps,
                          dtype=args.dtype, param_dtype=args.param_dtype, lora_rank=args.lora_rank,
                          moments=args.moments, attention=args.attention, packing=packing, accumulation=a,
                          profile=profile)
            for b in _ints(args.micro_batches) for a in _ints(args.accumulations) for r in args.remats.split(",")
            for packing in args.packings.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = TOOL.parser()
    p.add_argument("--model", default="2.6B")
    p.add_argument("--micro-batches", default="4,8", help="finetune: rows a micro-batch")
    p.add_argument("--remats", default="full,dots_with_no_batch_dims", help="finetune: remat policies")
    p.add_argument("--packings", default="reset", help="finetune: the data's packings (reset, concat)")
    p.add_argument("--peer-batches", default="4", help="finetune: the peer's batches ('' for none)")
    p.add_argument("--accumulations", default="1", help="finetune: micro-batches a step, ours and the peer's")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="finetune: timed steps; run: the run's steps")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="the stored (master) weights' dtype")
    p.add_argument("--moments", default="float32", help="finetune: Adam's moments' dtype")
    p.add_argument("--lora-rank", type=int, default=0, help="finetune: adapters on query and value (0: none)")
    p.add_argument("--attention", default="auto", help="finetune: PanguConfig.attention (auto, cudnn, explicit)")
    p.add_argument("--micro-batch", type=int, default=8, help="run: rows a step")
    p.add_argument("--output-dir", default="runs/bench", help="run: the run's folder")
    p.add_argument("overrides", nargs="*", help="run: more train/finetune.py overrides")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    TOOL.main(argv, parse_args)


if __name__ == "__main__":
    main()
