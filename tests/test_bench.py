"""The inference benchmark's plumbing, on CPU with the tiny model (its numbers only mean something on a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from infer import bench


def test_decode_table_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["decode", "--model", "tiny", "--dtypes", "float32", "--new-tokens", "4", "--repeats", "1",
                "--json", str(out)])
    assert "| decode | tiny | float32 |" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    decode, memory = record["rows"]
    assert "error" not in decode and "error" not in memory, record["rows"]
    assert decode["ms_per_token"] > 0 and decode["limit_ms"] > 0 and decode["vocab"] == "replicated"
    assert memory["weights_MiB"] > 0 and memory["prefill_temp_MiB"] > 0 and "decode_temp_MiB" in memory


def test_profile_kernels_counts_per_step_and_reads_the_trace():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    found = bench.profile_kernels(lambda: f(x), steps=4)
    assert found["wall_us_per_step"] > 0
    assert found["kernels_per_step"] == 0 and found["top"] == [] and found["families"] == []  # no GPU here


def test_kernel_families_drop_xla_numbering_only():
    assert bench.kernel_family("all_reduce_43_0_fusion_1") == "all_reduce_fusion"
    assert bench.kernel_family("all_reduce_80_fusion") == "all_reduce_fusion"
    assert bench.kernel_family("gemm_fusion_dot.484") == "gemm_fusion_dot"
    assert bench.kernel_family("pangu_decode_attention") == "pangu_decode_attention"
    # Numbers inside a library kernel's name (tile shapes) stay.
    assert bench.kernel_family("sm90_xmma_gemm_bf16_128x64_nt_1") == "sm90_xmma_gemm_bf16_128x64_nt"
