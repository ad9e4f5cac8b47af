"""The benchmark tools' own helpers and tables, on CPU with tiny models (their numbers only mean something on a GPU)."""

from __future__ import annotations

import json
import re
import shlex
import sys

import jax
import jax.numpy as jnp
import pytest

from infer import bench
from pangu_jax import benchmarking
from tests.conftest import FIXTURES, load_script

checkpoint_bench = load_script("checkpoints/bench.py")
train_bench = load_script("train/bench.py")


@pytest.mark.parametrize("tool", [bench, checkpoint_bench, train_bench], ids=["infer", "checkpoints", "train"])
def test_every_registered_table_is_a_command_of_its_tool(tool):
    assert tool.TOOL.tables
    for name in tool.TOOL.tables:
        assert tool.parse_args([name]).table == name
    with pytest.raises(SystemExit):
        tool.parse_args(["no-such-table"])


def test_the_tools_keep_the_tables_the_results_cite():
    assert set(bench.TOOL.tables) >= {"decode", "profile", "baselines", "throughput", "prefill", "ttft",
                                      "tensor-parallel", "int8-quality", "evaluate"}
    assert set(checkpoint_bench.TOOL.tables) >= {"convert", "orbax-restore"}


def test_the_commands_of_the_current_results_are_commands_of_the_tools():
    page = (FIXTURES.parents[1] / "benchmarks" / "README.md").read_text(encoding="utf-8")
    current = page[page.index("## Current numbers"):page.index("## Log")]
    tools = {"infer/bench.py": bench, "checkpoints/bench.py": checkpoint_bench, "train/bench.py": train_bench}
    parsed = 0
    for line in current.splitlines():
        if not line.startswith("| ") or line.startswith("| what "):
            continue
        command_cell = line.split(" | ")[6]
        tool = None
        for span in re.findall(r"`([^`]+)`", command_cell):
            words = shlex.split(span)
            if words[0] == "python" and words[1] in tools:
                tool, words = tools[words[1]], words[2:]
            elif words[0].startswith("benchmarks/"):  # the script a number was measured with, at a commit
                continue
            assert tool is not None, line
            assert tool.parse_args(words).table == words[0]
            parsed += 1
    assert parsed >= 13


@pytest.mark.slow
def test_decode_table_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["decode", "--model", "tiny", "--dtypes", "float32", "--prompt", "40", "--new-tokens", "4",
                "--repeats", "1", "--json", str(out)])
    assert "| decode | tiny | float32 |" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    assert record["table"] == "decode" and record["command"].startswith("python infer/bench.py decode --model tiny")
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_int8_quality_table_compares_int8_and_float32_with_bfloat16(tmp_path, capsys):
    out = tmp_path / "quality.json"
    bench.main(["int8-quality", "--quality-models", "fixture", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["model"], r["against bfloat16"]) for r in rows] == [
        ("fixture tiny (MindSpore weights)", "int8 weights"), ("fixture tiny (MindSpore weights)", "float32")], rows
    for row in rows:
        assert row["positions"] == 19 and 0 <= row["mean_kl"] <= row["max_kl"] < 0.01
        assert 0.5 <= row["argmax_agreement"] <= 1
    assert "| fixture tiny (MindSpore weights) | int8 weights | 19 |" in capsys.readouterr().out


def test_int8_quality_table_names_an_unknown_model():
    with pytest.raises(SystemExit, match="--quality-models: 'fixture,tiny'; give fixture, embedded, random"):
        bench.main(["int8-quality", "--quality-models", "fixture,tiny"])


@pytest.mark.slow
def test_convert_table_measures_a_conversion_of_a_synthetic_file(tmp_path):
    out = tmp_path / "convert.json"
    checkpoint_bench.main(["convert", "--model", "tiny", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert record["card"].startswith("CPU host (")
    (row,) = record["rows"]
    assert "error" not in row, row
    assert row["seconds"] > 0 and row["model_GiB"] > 0 and row["source_written_s"] > 0
    assert 0 < row["peak_anonymous_GiB"] <= row["peak_rss_GiB"]
    assert row["anonymous_ratio_to_model"] == pytest.approx(row["peak_anonymous_GiB"] / row["model_GiB"])
    # The source is kept for the next run; the converted store is gone.
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["synthetic_tiny_float16.ckpt"]


@pytest.mark.slow
def test_orbax_restore_table_writes_once_and_restores_onto_each_mesh(tmp_path, capsys):
    out = tmp_path / "restore.json"
    checkpoint_bench.main(["orbax-restore", "--model", "tiny", "--tensor", "1,2", "--workdir", str(tmp_path),
                           "--json", str(out)])
    (record,) = json.loads(out.read_text())
    write, *restores = record["rows"]
    assert write["case"] == "orbax_write" and "error" not in write and write["seconds"] > 0, write
    assert [(r["case"], r["tensor"]) for r in restores] == [("orbax_restore", 1), ("orbax_restore", 2)], restores
    assert all(r["model_MiB"] == pytest.approx(write["model_MiB"]) for r in restores)
    assert all(len(r["peak_MiB_per_device"]) == r["tensor"] for r in restores)
    assert [p.name for p in tmp_path.iterdir()] == ["restore.json"]  # the store is removed
    assert "| orbax_restore | tiny | float16 | 2 |" in capsys.readouterr().out


def test_a_case_that_fails_is_a_row_with_its_error_and_an_unknown_case_is_named():
    row = checkpoint_bench.TOOL.run_case("orbax_restore", model="tiny", dtype="float16", store="/nonexistent",
                                         tensor=1)
    assert row["case"] == "orbax_restore" and row["store"] == "/nonexistent" and "/nonexistent" in row["error"]
    with pytest.raises(ValueError, match="no case 'decoding'; cases: decode, profile"):
        bench.TOOL.run_case("decoding")


def test_print_table_and_append_record(tmp_path, capsys):
    benchmarking.print_table("t", [{"a": 1.23456, "b": "x"}, {"a": 2}], ["a", "b"])
    assert capsys.readouterr().out == "\n## t\n| a | b |\n|---|---|\n| 1.23 | x |\n| 2 |  |\n"
    path = tmp_path / "r.json"
    benchmarking.append_record(path, "python x.py t", "card", [{"a": 1}], table="t")
    benchmarking.append_record(path, "python x.py u", "card", [], table="u")
    first, second = json.loads(path.read_text())
    assert first["command"] == "python x.py t" and first["rows"] == [{"a": 1}] and first["table"] == "t"
    assert second["table"] == "u" and first["date"] == second["date"]


def test_median_time_warms_up_then_takes_the_median():
    calls = []
    assert benchmarking.median_time(lambda: calls.append(1), 3) >= 0
    assert len(calls) == 4


def test_host_memory_of_a_child_is_its_own():
    """The child's 200 MiB, not this test process's (over a GiB with JAX loaded). The child holds them for
    two seconds, so that a sample falls inside even on a loaded host."""
    run = benchmarking.run_measuring_host_memory(
        [sys.executable, "-c", "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); "
         "time.sleep(2)"])
    assert run.returncode == 0 and run.seconds >= 2
    assert 200 << 20 <= run.peak_anonymous_bytes <= run.peak_rss_bytes < 640 << 20


@pytest.mark.slow
def test_random_device_model_makes_the_preset_in_the_layout_asked():
    config, params = benchmarking.random_device_model("tiny", "bfloat16", layout="stacked")
    from pangu_jax.model import abstract_params

    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                               abstract_params(config))
    assert benchmarking.tree_bytes(params) == benchmarking.tree_bytes(abstract_params(config))


def test_profile_kernels_counts_per_step_and_reads_the_trace():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    found = benchmarking.profile_kernels(lambda: f(x), steps=4)
    assert found["wall_us_per_step"] > 0
    assert found["kernels_per_step"] == 0 and found["top"] == [] and found["families"] == []  # no GPU here


def test_idle_before_sums_the_waits_by_the_kernel_that_ends_them():
    events = [(0, 10, "fusion_1"), (8, 20, "fusion_2"),  # overlapping: no wait
              (25, 30, "all_reduce_3_0_fusion_1"), (30, 31, "fusion_4"),  # 5 ns before the all-reduce
              (40, 45, "all_reduce_7_0_fusion_1")]  # 9 more
    times, counts = benchmarking.idle_before(list(reversed(events)))
    assert dict(times) == {"all_reduce_fusion": 14} and dict(counts) == {"all_reduce_fusion": 2}
    assert benchmarking.idle_before([]) == ({}, {})


def test_kernel_families_drop_xla_numbering_only():
    assert benchmarking.kernel_family("all_reduce_43_0_fusion_1") == "all_reduce_fusion"
    assert benchmarking.kernel_family("all_reduce_80_fusion") == "all_reduce_fusion"
    assert benchmarking.kernel_family("gemm_fusion_dot.484") == "gemm_fusion_dot"
    assert benchmarking.kernel_family("pangu_decode_attention") == "pangu_decode_attention"
    # Numbers inside a library kernel's name (tile shapes) stay.
    assert benchmarking.kernel_family("sm90_xmma_gemm_bf16_128x64_nt_1") == "sm90_xmma_gemm_bf16_128x64_nt"


@pytest.mark.slow
def test_the_train_step_table_measures_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    train_bench.main(["finetune", "--model", "tiny", "--micro-batches", "2", "--accumulations", "1,2", "--remats",
                      "full", "--packings", "reset,concat", "--seq-len", "16", "--steps", "2", "--peer-batches", "",
                      "--json", str(out)])
    (record,) = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["micro_batch"], r["accumulation"], r["packing"]) for r in rows] == [
        (2, 1, "reset"), (2, 1, "concat"), (2, 2, "reset"), (2, 2, "concat")]
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["flops_per_token"] > 0 and row["mfu"] is None  # no peak on a CPU
        assert row["ratio_to_matmul"] > 0 and row["compile_s"] > 0
        tokens = row["micro_batch"] * row["accumulation"] * row["seq_len"]
        assert row["tokens_per_s"] * row["step_s"] == pytest.approx(tokens)
    # Its rows are one document each, which both packings' masks see alike.
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert rows[2]["loss"] == pytest.approx(rows[3]["loss"], rel=1e-6)
    assert "| ours | tiny |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_train_profile_table_traces_the_step(tmp_path, capsys):
    out = tmp_path / "rows.json"
    train_bench.main(["profile", "--model", "tiny", "--micro-batches", "2", "--remats", "full", "--seq-len", "16",
                      "--steps", "2", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    (row,) = record["rows"]
    assert "error" not in row and row["wall_us_per_step"] > 0 and row["tokens_per_s"] > 0, row
    assert "kernel families per step: tiny micro-batch 2 remat full" in capsys.readouterr().out


@pytest.mark.slow
def test_the_attention_table_without_a_gpu_names_what_is_missing(tmp_path):
    out = tmp_path / "rows.json"
    train_bench.main(["attention", "--model", "tiny", "--micro-batches", "2", "--seq-len", "16", "--steps", "1",
                      "--json", str(out)])
    (record,) = json.loads(out.read_text())
    rows = {row["mask"]: row for row in record["rows"]}
    assert list(rows) == list(train_bench.ATTENTION_MASKS)
    for mask in ("causal", "causal+bias", "bias"):
        assert rows[mask]["error"] == "RuntimeError: cuDNN is not detected.", rows[mask]


def test_a_failed_case_reports_its_exception_line_not_what_follows_it():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: cuDNN is not detected.\n"
              "--------------------\nFor simplicity, JAX has removed its internal frames.\n")
    assert benchmarking.failure(stderr) == "RuntimeError: cuDNN is not detected."
    assert benchmarking.failure("killed\n\n") == "killed"
    assert benchmarking.failure("") == "failed"


@pytest.mark.slow
def test_the_evaluate_table_times_the_harness(tmp_path, vocab_path, shopping_reviews, monkeypatch):
    monkeypatch.setenv("PANGU_JAX_VOCAB", str(vocab_path))
    out = tmp_path / "rows.json"
    bench.main(["evaluate", "--model", "tiny-40k", "--dtypes", "float32", "--batches", "4", "--examples", "8",
                "--json", str(out)])
    (row,) = json.loads(out.read_text())[0]["rows"]
    assert "error" not in row, row
    assert row["examples_per_s"] > 0 and 0 <= row["accuracy"] <= 1 and row["examples"] == 8
