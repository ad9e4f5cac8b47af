"""The persistent compilation cache: a second process finds the first one's programs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r"""
import sys
from pangu_jax import PanguConfig, generate, init_params
from pangu_jax.compilation_cache import enable_compilation_cache
import jax
enable_compilation_cache(sys.argv[1])
# The tiny model's programs compile in about the half second below which
# programs are left out: keep every one, so that no run is left to chance.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
config = PanguConfig.preset("tiny")
print(generate(config, init_params(config, 0), [[5, 6, 7]], 4, temperature=0, stop_ids=()))
"""


@pytest.mark.slow
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
    # Every program was found, not compiled anew.
    assert {n: after[n] for n in modified} == modified


def test_the_cache_keeps_programs_worth_a_disk_entry_only(tmp_path):
    import jax

    from pangu_jax.compilation_cache import enable_compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in names}
    try:
        assert enable_compilation_cache(tmp_path / "xla") == tmp_path / "xla" and (tmp_path / "xla").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


_COMPILED = r"""
import logging, re
import jax
from pangu_jax import PanguConfig, generate, init_params, stream
from pangu_jax.layouts import per_layer
config = PanguConfig.preset("tiny")
params = jax.block_until_ready(per_layer(init_params(config, 0)))  # as infer/generate.py lays them out
names = []

class Compiled(logging.Handler):
    def emit(self, record):
        found = re.search(r"Finished XLA compilation of (\S+)", record.getMessage())
        if found:
            names.append(found.group(1))

logging.getLogger("jax").addHandler(Compiled())
jax.config.update("jax_log_compiles", True)
chunks = stream(config, params, [[5, 6, 7], [8, 9]], 40, temperature=0.7, seed=[1, 2], stop_ids=())
next(chunks)
print(sorted(set(names)))  # when the first token is in the caller's hands
list(chunks)
generate(config, params, [[5, 6, 7], [8, 9]], 20, temperature=0.7, seed=[1, 2], stop_ids=())
print(sorted(set(names)))
"""


@pytest.mark.slow
def test_a_fresh_process_compiles_only_the_prefill_and_decode_programs():
    """No small program of its own for the host's inputs or a stream's reads: each would be compiled again
    in every process, being too quick to compile for the persistent cache to keep. A stream hands out its
    first token before the decode program is compiled."""
    done = subprocess.run([sys.executable, "-c", _COMPILED], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    # The stream's chunk program, then generate's.
    assert done.stdout.split("\n")[:2] == ["['jit(_prefill)']",
                                           "['jit(_decode)', 'jit(_decode_until_done)', 'jit(_prefill)']"]
