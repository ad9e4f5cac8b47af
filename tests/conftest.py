"""Shared test fixtures: the reference data in tests/fixtures and small models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def load_script(relative: str):
    """Import a runnable script of the repository (e.g. "infer/generate.py") as a module."""
    path = FIXTURES.parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interpreted_kernels() -> dict:
    """`model`'s GPU decode kernel forced on and run by Pallas's interpreter (CPU), as {attribute: value}."""
    import functools

    from pangu_jax.decode_attention import decode_attention

    return {"_decode_kernel": lambda config: True,
            "decode_attention": functools.partial(decode_attention, interpret=True)}


def load_json(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def sequences() -> list[list[int]]:
    return load_json("inputs.json")["sequences"]


@pytest.fixture(scope="session")
def fixture_weights() -> dict[str, np.ndarray]:
    """The fixture model's float32 tensors under their MindSpore names."""
    return {p.stem: np.load(p) for p in sorted((FIXTURES / "npy").glob("*.npy"))}


@pytest.fixture(scope="session")
def tiny_fp32():
    from pangu_jax import load_checkpoint

    return load_checkpoint(FIXTURES / "tiny_fp32.ckpt")


@pytest.fixture(scope="session")
def vocab_path():
    """The real vocabulary (env var, cache or one-time download); skip with the reason if unavailable."""
    from pangu_jax.vocab import VocabNotFoundError, find_vocab

    try:
        return find_vocab()
    except VocabNotFoundError as e:
        pytest.skip(f"real vocabulary unavailable: {e}")


def max_logit_error(path, sequences, expected="expected_logits_gelu_tanh", **kwargs) -> float:
    """Largest |logit - reference| of the checkpoint at `path` over the fixture sequences."""
    import jax.numpy as jnp

    from pangu_jax import forward, load_checkpoint

    config, params = load_checkpoint(path, **kwargs)
    want = np.load(FIXTURES / f"{expected}.npy")
    errors = []
    for row, seq in enumerate(sequences):
        logits = np.asarray(forward(config, params, jnp.asarray([seq]))[0][0])
        errors.append(np.abs(logits[:, : want.shape[-1]] - want[row, : len(seq)]).max())
    return float(max(errors))
