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


def test_fused_matvec_experiment_computes_what_the_model_does():
    """The experiment's kernel (interpreted), in each of its forms, against the model's code for the four products."""
    import numpy as np

    from benchmarks import fused_matvec_experiment as experiment
    from pangu_jax import PanguConfig

    config = PanguConfig.preset("tiny", dtype="float32")
    layer = experiment.make_layers(config)[0]
    rng = np.random.default_rng(0)
    forms = (experiment.Tiles(8, 32, unroll=False), experiment.Tiles(4, 16, fold_norm=True, step_sum=True,
                                                                      evict_first=True))
    for tiles in forms:
        kernels = experiment.kernel_ops(config, dict.fromkeys(experiment.OPS, tiles), interpret=True)
        for name, xla in experiment.xla_ops(config).items():
            x, residual = experiment._op_input(config, name, rng)
            for want, got in zip(xla(x, residual, layer), kernels[name](x, residual, layer), strict=True):
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"{name}, {tiles}")


def test_compile_options_sweep_times_each_variant_from_the_same_state(tmp_path, capsys):
    from benchmarks import compile_options_sweep as sweep

    out = tmp_path / "sweep.json"
    sweep.main(["--model", "tiny", "--dtype", "float32", "--batches", "2", "--variants", "default,fusion_autotuner",
                "--new-tokens", "4", "--rounds", "1", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    default, other = record["rows"]
    assert default["variant"] == "default" and default["options"] == {} and default["ratio_to_first"] == 1
    assert other["options"] == {"xla_gpu_experimental_enable_fusion_autotuner": True}
    # The options change nothing a CPU computes: the same greedy tokens from the same prefilled state.
    assert other["same_tokens_as_first"] and other["ms_per_step"] > 0 and other["compile_s"] > 0
    assert "| fusion_autotuner | tiny |" in capsys.readouterr().out


def test_compile_options_sweep_names_an_unknown_variant():
    from benchmarks import compile_options_sweep as sweep

    with pytest.raises(SystemExit, match="unknown variant 'fastest'"):
        sweep.main(["--variants", "default,fastest"])


def test_decode_attention_micro_reports_every_case(tmp_path):
    from benchmarks import decode_attention_micro as micro

    out = tmp_path / "micro.json"
    micro.main(["--model", "tiny", "--batches", "1,2", "--positions", "3", "--slots", "20", "--repeats", "1",
                "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert [(r["batch"], r["position"]) for r in record["rows"]] == [(1, 3), (2, 3)]
    assert all(r["gpu_us_per_layer"] > 0 and r["read_GBps"] > 0 for r in record["rows"])


def test_compile_options_sweep_runs_exhaustive_tiling_alone():
    from benchmarks import compile_options_sweep as sweep

    with pytest.raises(SystemExit, match="exhaustive_tiling must run alone"):
        sweep.main(["--variants", "default,exhaustive_tiling"])


def test_mlp_layout_micro_layouts_compute_the_same_and_every_pair_is_timed(tmp_path):
    from benchmarks import mlp_layout_micro as micro
    from pangu_jax import PanguConfig

    c = PanguConfig.preset("tiny")
    weights = micro.make_weights(c, jnp.float32, "in_out", "in_out", jax.random.key(0))
    turned = [{**w, "up": w["up"].T, "down": w["down"].T} for w in weights]
    x = jax.random.normal(jax.random.key(1), (2, c.hidden_size))
    expected = micro.ffn_steps(c, jnp.float32, "in_out", "in_out")(weights, x)
    got = micro.ffn_steps(c, jnp.float32, "out_in", "out_in")(turned, x)
    assert jnp.allclose(got, expected, atol=1e-5)

    out = tmp_path / "micro.json"
    micro.main(["--model", "tiny", "--dtype", "float32", "--batches", "1", "--repeats", "1", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert {(r["up"], r["down"]) for r in record["rows"]} == {(u, d) for u in micro.EQUATIONS for d in micro.EQUATIONS}
    assert all(r["ms_per_step"] > 0 and r["weight_GBps"] > 0 for r in record["rows"])


def test_bandwidth_check_reports_every_measure_per_round(tmp_path):
    from benchmarks import bandwidth_check

    out = tmp_path / "bandwidth.json"
    bandwidth_check.main(["--rounds", "2", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert [r["round"] for r in record["rows"]] == [0, 1]
    for row in record["rows"]:
        assert all(row[k] > 0 for k in ("copy", "xla_copy", "read", "matvec"))
        assert row["best"] == max(v for k, v in row.items() if k not in ("round", "best", "matvec"))


def test_token_count_recompile_reports_one_row_per_call(tmp_path):
    from benchmarks import token_count_recompile

    out = tmp_path / "recompile.json"
    token_count_recompile.main(["--model", "tiny", "--counts", "3,20", "--repeats", "2", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert [(r["max_new_tokens"], r["new_tokens"], r["steps"]) for r in record["rows"]] == [(3, 3, 3), (20, 20, 20)]
    assert all(r["seconds"] > 0 and r["warm_seconds"] > 0 and r["decode_programs"] >= 1 for r in record["rows"])


def test_layernorm_fold_micro_forms_compute_the_model_layernorm_and_product(tmp_path):
    from benchmarks import layernorm_fold_micro as micro
    from pangu_jax import PanguConfig
    from pangu_jax.model import LayerNorm

    c = PanguConfig.preset("tiny")
    (scale, bias, w, product_bias, folded), = micro.make_layers(1, 3 * c.hidden_size, c.hidden_size, jnp.float32,
                                                               jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, c.hidden_size)) + 0.5
    normed = LayerNorm(c.layer_norm_epsilon).apply({"params": {"scale": scale, "bias": bias}}, x)
    expected = normed @ w.T + product_bias
    for form in ("ln_f32", "centered", "sigma"):
        got = micro.layer(form, x, scale, bias, w, product_bias, folded, c.layer_norm_epsilon, jnp.float32)
        assert jnp.allclose(got, expected, atol=1e-5), form
    with pytest.raises(SystemExit, match="--forms: unknown form 'folded'"):
        micro.main(["--model", "tiny", "--forms", "folded", "--repeats", "1"])

    out = tmp_path / "fold.json"
    micro.main(["--model", "tiny", "--dtype", "float32", "--repeats", "1", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert [r["form"] for r in record["rows"]] == list(micro.FORMS)
    assert all(r["us_per_layer"] > 0 and r["max_abs_diff_vs_ln_f32"] < 1e-4 for r in record["rows"])
