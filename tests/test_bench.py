"""The inference benchmark's plumbing, on CPU with the tiny model (its numbers only mean something on a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from infer import bench


def test_decode_table_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["decode", "--model", "tiny", "--dtypes", "float32", "--prompt", "40", "--new-tokens", "4",
                "--repeats", "1", "--json", str(out)])
    assert "| decode | tiny | float32 |" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    decode, memory = record["rows"]
    assert "error" not in decode and "error" not in memory, record["rows"]
    assert decode["ms_per_token"] > 0 and decode["stream_ms_per_token"] > 0 and decode["vocab"] == "replicated"
    assert decode["chunks_ms_per_token"] > 0 and decode["call_ms"] > 0 and decode["stream_call_ms"] > 0
    assert decode["stream_equals_generate"] is True
    # The limit comes from the best of the bandwidths measured in the run.
    best = max(decode[f"{k}_bandwidth_GBps"] for k in ("copy", "xla_copy", "read")) * 1e9
    assert decode["best_bandwidth_GBps"] * 1e9 == pytest.approx(best)
    assert decode["limit_ms"] == pytest.approx((decode["weight_bytes"] + decode["cache_bytes"]) / best * 1e3)
    assert decode["prompt"] == 40
    assert memory["weights_MiB"] > 0 and memory["prefill_temp_MiB"] > 0 and "decode_temp_MiB" in memory


def test_ttft_table_times_generate_and_stream_cold_then_cached(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["ttft", "--model", "tiny", "--dtypes", "float32", "--new-tokens", "20", "--json", str(out)])
    assert "| ttft | stream | tiny | float32 |" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["via"], r["compilation_cache"]) for r in rows] == [
        (via, cache) for via in ("generate", "stream") for cache in ("empty (cold)", "filled by the first run")]
    assert all(r["first_token_s"] > 0 for r in rows), rows
    assert all(r["last_token_s"] >= r["first_token_s"] and r["new"] == 20 for r in rows[2:]), rows


def test_ttft_table_names_an_unknown_via():
    with pytest.raises(SystemExit, match="--via: 'generate,strem'; give generate and/or stream"):
        bench.main(["ttft", "--model", "tiny", "--via", "generate,strem"])


def test_profile_kernels_counts_per_step_and_reads_the_trace():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    found = bench.profile_kernels(lambda: f(x), steps=4)
    assert found["wall_us_per_step"] > 0
    assert found["kernels_per_step"] == 0 and found["top"] == [] and found["families"] == []  # no GPU here


def test_idle_before_sums_the_waits_by_the_kernel_that_ends_them():
    events = [(0, 10, "fusion_1"), (8, 20, "fusion_2"),  # overlapping: no wait
              (25, 30, "all_reduce_3_0_fusion_1"), (30, 31, "fusion_4"),  # 5 ns before the all-reduce
              (40, 45, "all_reduce_7_0_fusion_1")]  # 9 more
    times, counts = bench.idle_before(list(reversed(events)))
    assert dict(times) == {"all_reduce_fusion": 14} and dict(counts) == {"all_reduce_fusion": 2}
    assert bench.idle_before([]) == ({}, {})


def test_profile_table_prints_kernels_families_and_idle(tmp_path, capsys):
    out = tmp_path / "profile.json"
    bench.main(["profile", "--model", "tiny", "--dtypes", "float32", "--batches", "1", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    (row,) = record["rows"]
    assert "error" not in row and row["wall_us_per_step"] > 0
    assert row["idle_us_per_step"] == 0 and row["idle_before"] == []  # no GPU here
    printed = capsys.readouterr().out
    for title in ("top kernels per token", "kernel families per token", "GPU idle per token"):
        assert f"## {title}" in printed


def test_kernel_families_drop_xla_numbering_only():
    assert bench.kernel_family("all_reduce_43_0_fusion_1") == "all_reduce_fusion"
    assert bench.kernel_family("all_reduce_80_fusion") == "all_reduce_fusion"
    assert bench.kernel_family("gemm_fusion_dot.484") == "gemm_fusion_dot"
    assert bench.kernel_family("pangu_decode_attention") == "pangu_decode_attention"
    # Numbers inside a library kernel's name (tile shapes) stay.
    assert bench.kernel_family("sm90_xmma_gemm_bf16_128x64_nt_1") == "sm90_xmma_gemm_bf16_128x64_nt"
