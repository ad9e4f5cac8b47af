"""The persistent compilation cache: a second process finds the first one's programs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import sys
from pangu_jax import PanguConfig, generate, init_params
from pangu_jax.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
config = PanguConfig.preset("tiny")
print(generate(config, init_params(config, 0), [[5, 6, 7]], 4, temperature=0, stop_ids=()))
"""


def test_a_second_process_reuses_the_compiled_programs(tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache)], env=env, capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = run()
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    modified = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert run() == first
    assert sorted(p.name for p in cache.iterdir()) == entries  # every program was found, none compiled anew
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == modified
