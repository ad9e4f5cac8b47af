"""What a run reports: metrics as JSONL (and TensorBoard), where the time goes, and the model FLOPs utilisation."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax

from ..config import PanguConfig

__all__ = ["PEAK_BF16_FLOPS", "MetricsWriter", "Timers", "flops_per_token", "peak_flops"]

# Dense bf16 peak of one card, by the start of its device_kind, for MFU.
PEAK_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops() -> float:
    """The dense bf16 peak of one of this process's devices, or 0 where no peak is known (a CPU)."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if kind.startswith(name)), 0.0)


def flops_per_token(config: PanguConfig, seq_len: int, *, adapters_only: bool = False) -> float:
    """Training FLOPs per token, MaxText's convention: 6 x matmul parameters + attention + logits.

    Matmul parameters are every block's four projections and two FFN
    matrices; the logits add the tied head's (vocab x hidden); attention's
    scores and weighted sum add 12 x layers x seq_len x hidden (forward and
    backward, the causal half not subtracted). With `adapters_only` (LoRA:
    the base's weight gradients are never computed), the base matrices
    count 4 (forward, and the gradient of their input) and the adapters 6.
    """
    h, f, layers = config.hidden_size, config.ffn_size, config.num_layers
    matmul = layers * (4 * h * h + 2 * h * f) + config.vocab_size * h
    attention = 12 * layers * seq_len * h
    if not adapters_only or config.lora_rank == 0:
        return 6 * matmul + attention
    r = config.lora_rank
    sizes = {"query": (h, h), "key": (h, h), "value": (h, h), "output": (h, h), "up": (h, f), "down": (f, h)}
    adapters = layers * sum(r * (fan_in + fan_out) for name, (fan_in, fan_out) in sizes.items()
                            if name in config.lora_targets)
    return 4 * matmul + 6 * adapters + attention


class Timers:
    """Seconds spent per kind of work (compile, data, step, eval, checkpoint), summed; `last` the latest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.last = 0.0

    @contextlib.contextmanager
    def __call__(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last = time.perf_counter() - start
            self.seconds[kind] += self.last

    def totals(self) -> dict[str, float]:
        return {f"{kind}_s": round(seconds, 3) for kind, seconds in self.seconds.items()}


class MetricsWriter:
    """One JSON object a line in `<directory>/metrics.jsonl` (process 0 only), and TensorBoard if asked."""

    def __init__(self, directory: Path, tensorboard: bool = False) -> None:
        self.active = jax.process_index() == 0
        self.file = open(Path(directory) / "metrics.jsonl", "a", encoding="utf-8") if self.active else None
        self.board = None
        if tensorboard and self.active:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ValueError("run.tensorboard needs tensorboardX: pip install 'pangu-jax[tensorboard]'") from None
            self.board = SummaryWriter(str(Path(directory) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
