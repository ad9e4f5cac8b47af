"""Random PanGu-alpha weights in the MindSpore layout, for demos, tests and benchmarks.

Drawn as the reference fixtures were (tests/fixtures/README.md): embeddings
N(0, 0.1), matrices N(0, 0.02*sqrt(2560/hidden)), biases N(0, 0.05),
LayerNorm gamma U(0.5, 1.5) and beta N(0, 0.1), in checkpoint order, so that
activations stay O(1) at any width and mapping mistakes change the output.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..config import PanguConfig
from .layout import mindspore_slots


def random_mindspore_tensors(
    config: PanguConfig, seed: int = 20210426, dtype: str = "float16", mixed: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs in file order; with `mixed`, LayerNorm stays float32."""
    rng = np.random.default_rng(seed)
    matrix_std = 0.02 * math.sqrt(2560 / config.hidden_size)
    for name, slot in mindspore_slots(config).items():
        if name.endswith(".gamma"):
            value = rng.uniform(0.5, 1.5, slot.stored_shape)
        elif name.endswith(".beta"):
            value = rng.normal(0, 0.1, slot.stored_shape)
        elif name.endswith("embedding_table"):
            value = rng.normal(0, 0.1, slot.stored_shape)
        elif name.endswith(".bias"):
            value = rng.normal(0, 0.05, slot.stored_shape)
        else:
            value = rng.normal(0, matrix_std, slot.stored_shape)
        layernorm = name.endswith((".gamma", ".beta"))
        yield name, value.astype(np.float32 if mixed and layernorm else dtype)
