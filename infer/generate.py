"""Generate text with PanGu-alpha: the original demo, on CPU or GPU.

    python infer/generate.py --model 2.6B --checkpoint PanguAlpha_2.6B_fp16.ckpt --prompt "四川的省会是?"

With no --checkpoint it runs the tiny random model shipped in the package
(its text is gibberish; it shows the pipeline works). With neither --prompt
nor --interactive it runs the seven demonstration prompts of the original;
--interactive reads prompts from standard input until EOF, printing each
answer as it is generated (a line that cannot be answered gets an error and
the next is read). `--mesh tensor=4` spreads the model over four GPUs
(tensor parallel); `--mesh data=2,tensor=2` also splits the batch.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator

from pangu_jax.cli import add_vocab_option, script_parser
from pangu_jax.config import DTYPES, PRESETS

DEMO_PROMPTS = [
    "上联：瑞风播福泽，事业具昌盛千家乐",
    "四川的省会是?",
    "上联：春雨润人间，社会和谐万象新",
    "书生：羌笛何须怨杨柳，春风不度玉门关。\n"
    "飞云：（这诗怎么这么耳熟？且过去跟他聊聊如何。）\n"
    "书生：小兄弟，要不要一起喝一杯？\n"
    "飞云：你请我呀？你若是请我，我便和你喝一杯；你若不请我，我便一个人去喝。\n"
    "书生：小兄弟，看你年纪轻轻，不至于这么势利吧？\n"
    "飞云：",
    "张无忌拿出屠龙宝刀，手起刀落，周芷若掉了一颗门牙，身旁的赵敏喜极而泣，",
    "人工智能是引领新一轮科技革命和产业变革的战略性技术，正在深刻改变人们的生产、生活和学习方式。"
    "世界主要国家纷纷把发展人工智能作为提升国家竞争力、维护国家安全的重大战略，加紧出台规划和政策，"
    "围绕核心技术、顶尖人才、标准规范等强化部署，力图在新一轮国际科技竞争中掌握主导权。"
    "我国在人工智能领域拥有海量数据、丰富应用场景和广阔市场，具备良好的发展基础。当前，",
    "中国和美国和日本和法国和加拿大和澳大利亚的首都分别是哪里？",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", help="a MindSpore .ckpt, HuggingFace GPTPangu folder, Megatron partitions, "
                                        ".npy folder or orbax store (default: the embedded tiny random model)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--model", choices=sorted(PRESETS), help="preset; inferred from the tensor shapes when omitted")
    sizes.add_argument("--config", help="the model's config: our config.json or a HuggingFace one (for a size no "
                                        "preset has)")
    p.add_argument("--dtype", choices=DTYPES, help="compute and storage dtype (default: the checkpoint's)")
    p.add_argument("--int8", action="store_true", help="weight-only int8 matrices (13B fits a 24 GB card)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: the 7 demo prompts)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    p.add_argument("--max-new-tokens", type=int, default=50,
                   help="new tokens per prompt at most (default 50; prompt plus new tokens fit the 1024 positions)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=5, help="0 switches it off (the original samples from the top 5)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the best tokens whose probabilities sum to this (1 switches it off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 switches it off")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (every prompt's draws depend on it)")
    p.add_argument("--stream", action="store_true", help="print each answer while it is generated, one prompt at a time")
    p.add_argument("--mesh", help="device mesh, e.g. 'tensor=4' or 'data=2,tensor=2' (default: one device)")
    p.add_argument("--compilation-cache", help="folder of the persistent compilation cache (default: the user cache)")
    p.add_argument("--no-compilation-cache", action="store_true", help="compile every program anew, keep none")
    add_vocab_option(p)
    p.add_argument("--special-tokens", action="store_true", help="map literal <eot>, <sep>, ... in prompts to their ids")
    return p.parse_args(argv)


def parameter_count(n: int) -> str:
    """1380000 -> "1.38M", 2625000000 -> "2.63B"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def lines(stream) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) for each line of a binary stream, read as UTF-8 one line at a time."""
    for number, raw in enumerate(stream, 1):
        try:
            yield number, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as e:
            yield number, None, f"line {number} is not UTF-8 ({e.reason} at byte {e.start}); set the terminal to UTF-8"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pangu_jax import Tokenizer, generate, load_checkpoint, stream
    from pangu_jax.assets import EMBEDDED_CHECKPOINT, EMBEDDED_DESCRIPTION
    from pangu_jax.checkpoints.loading import read_config
    from pangu_jax.compilation_cache import enable_compilation_cache
    from pangu_jax.layouts import per_layer
    from pangu_jax.sharding import make_mesh

    path = args.checkpoint or EMBEDDED_CHECKPOINT
    if args.checkpoint is None:
        print(f"No --checkpoint given: using {EMBEDDED_DESCRIPTION}\n", file=sys.stderr)
    tokenizer = Tokenizer(args.vocab, special_tokens=args.special_tokens)
    if not args.no_compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    mesh = make_mesh(args.mesh) if args.mesh else None
    start = time.perf_counter()
    model = read_config(args.config) if args.config else args.model
    config, params = load_checkpoint(path, model, dtype=args.dtype, mesh=mesh, int8=args.int8)
    params = per_layer(params, free_stacked=True)  # the layout decoding reads fastest, the model held once
    placed = f" on a {dict(mesh.shape)} mesh" if mesh is not None else ""
    weights = ", int8 weights" if args.int8 else ""
    print(f"Loaded {path} ({parameter_count(config.num_params())} parameters, {config.dtype}{weights}){placed} "
          f"in {time.perf_counter() - start:.1f}s; {config.resolved().kernels()}", file=sys.stderr)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed,
                   stop_ids=(tokenizer.eot_id, tokenizer.eod_id))

    def run(prompts: list[str]) -> None:
        outputs = generate(config, params, tokenizer.encode_batch(prompts), args.max_new_tokens, **options)
        for prompt, new in zip(prompts, outputs):
            print(f"Input is: {prompt}\nOutput is: {prompt}{tokenizer.decode(new)}\n", flush=True)

    def run_streaming(prompt: str) -> None:
        chunks = stream(config, params, [tokenizer.encode(prompt)], args.max_new_tokens, **options)
        first = next(chunks)  # a prompt that is refused raises here, before anything is printed
        print(f"Input is: {prompt}\nOutput is: {prompt}", end="", flush=True)
        new: list[int] = []
        shown = ""
        for (chunk,) in itertools.chain([first], chunks):
            new += chunk
            text = tokenizer.decode(new)
            print(text[len(shown):] if text.startswith(shown) else text, end="", flush=True)
            shown = text
        print("\n", flush=True)

    prompts = args.prompt or ([] if args.interactive else DEMO_PROMPTS)
    if prompts:
        if args.stream:
            for prompt in prompts:
                run_streaming(prompt)
        else:
            run(prompts)
    if args.interactive:
        for number, line, error in lines(sys.stdin.buffer):
            try:
                if error is None and line.strip():
                    run_streaming(line)
            except ValueError as e:
                error = f"line {number}: {e}"
            if error:
                print(f"error: {error}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    from pangu_jax.cli import run

    sys.exit(run(main))
