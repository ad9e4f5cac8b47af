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
    modified = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    generation = sorted(n for n in modified if n.startswith(("jit__prefill", "jit__decode")))
    assert len(generation) == 2, f"the prefill and decode programs were not cached: {sorted(modified)}"
    assert run() == first
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    # The generation programs were found, not compiled anew. (Small helper programs
    # near the half-second threshold may be cached by one run and not the other.)
    assert sorted(n for n in after if n.startswith(("jit__prefill", "jit__decode"))) == generation
    assert {n: after[n] for n in modified} == modified
