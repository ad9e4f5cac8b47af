"""Fine-tuning: the config, gradients, packed documents, the step on a mesh, LoRA, faults, resume and the demo."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pangu_jax import PanguConfig, forward, init_params, load_checkpoint
from pangu_jax.model import PanguAlpha, abstract_params
from pangu_jax.layouts import per_layer, stacked
from pangu_jax.sharding import make_mesh
from pangu_jax.train.config import TrainConfigError, load_train_config
from pangu_jax.train.distributed import claim_device_memory
from pangu_jax.train.lora import merge_adapters
from pangu_jax.train.loop import finetune, make_trainer, run_mesh
from pangu_jax.train.optimizer import make_optimizer
from pangu_jax.train.state_store import StateStore
from pangu_jax.train.step import Trainer, token_loss
from tests.conftest import FIXTURES, CancelAfter, ScriptRunner, assert_one_error_line

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "train" / "configs" / "demo-cpu.yaml"
WORDS = "我们 今天 天气 很好 北京 上海 人工智能 研究 发展 经济 社会 文化 学习 工作 生活 中国 世界 科技 创新 未来".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text of 120 documents (blank-line separated) in a vocabulary of twenty words."""
    rng = random.Random(0)
    docs = ["".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "。" for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def small(corpus: Path, out: Path, *overrides: str) -> list[str]:
    """Overrides that shrink the demo to seconds on the given text."""
    return [f"data.paths=[{corpus}]", "data.seq_len=32", "data.batch_size=4", "data.eval_documents=4",
            "data.workers=1", f"run.output_dir={out}", "run.steps=6", "run.log_every=1", "run.eval_every=0",
            "run.mesh=fsdp=2",
            "optimizer.warmup_steps=2", *overrides]


# --- the configuration --------------------------------------------------------------------


def test_the_config_offers_every_remat_policy_the_model_has():
    """The config names the policies itself (checking a config imports no JAX); the model's table decides."""
    from pangu_jax.model import REMAT_POLICIES
    from pangu_jax.train.config import REMAT_POLICIES as CONFIG_REMAT_POLICIES

    assert CONFIG_REMAT_POLICIES == ("none", *REMAT_POLICIES)


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=-1", r"optimizer\.learning_rate: expected a number in \(0, inf\), got -1"),
    ("run.steps=many", r"run\.steps: expected int, got 'many'"),
    ("model.remat=some", r"model\.remat: expected one of none, full, dots, dots_with_no_batch_dims, "
                         r"dots_with_no_batch_dims_and_attention, got 'some'"),
    ("run.micro_batch=3", r"run\.micro_batch: 3 does not divide data\.batch_size 8"),
    ("lora.targets=[query, keys]", r"lora\.targets: expected some of query, key, value, output, up, down"),
    ("optimizer.lr=1", r"optimizer\.lr: unknown field; optimizer has learning_rate"),
    ("data.packing=zip", r"data: DataConfig\.packing must be one of"),
    ("run.mesh=fsdp", r"run\.mesh: mesh 'fsdp': expected axis=size pairs"),
    ("run", r"override 'run': expected key\.path=value"),
    ("model.preset=2.6B", r"model\.checkpoint: this config trains PanGu-alpha 2\.6B: give its checkpoint"),
    ("model.random_init=true", r"model\.random_init: needs model\.preset"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(DEMO, [override])


def test_the_shipped_configs_load(corpus):
    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        if path.name == DEMO.name:
            config = load_train_config(path)
        else:  # a config written for a released model wants its checkpoint
            with pytest.raises(TrainConfigError, match=r"model\.checkpoint: this config trains PanGu-alpha"):
                load_train_config(path)
            config = load_train_config(path, ["model.checkpoint=PanguAlpha.ckpt"])
        assert config.data.batch_size % config.micro_batch == 0, path
        if path.stem == "13B-lora":
            assert config.lora.rank == 16 and config.lora.targets == ("query", "value") and config.accumulation == 4
        if path.stem == "13B-full-fsdp4":
            assert config.run.mesh == "fsdp=4"


def test_a_checkpoint_not_of_the_configs_preset_is_refused_by_name(tmp_path):
    config = load_train_config(DEMO, [f"model.checkpoint={FIXTURES / 'tiny_fp32.ckpt'}", "model.preset=2.6B",
                                       f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"model\.checkpoint .*tiny_fp32\.ckpt: a model of .*not PanGu-alpha 2\.6B"):
        finetune(config, progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run's folder is made


def test_a_bad_config_is_one_error_line_before_anything_runs(tmp_path):
    cli = ScriptRunner("train/finetune.py")
    done = cli.subprocess(["run.steps=0"])
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "run.steps: expected an integer >= 1, got 0")


# --- the model under training ------------------------------------------------------------


def _randomised(params, seed=0):
    """LayerNorm scales and biases moved off ones and zeros, so that a mapping mistake shows."""
    rng = np.random.default_rng(seed)

    def move(path, leaf):
        name = str(path[-1].key)
        if name in ("scale", "bias") and str(path[-2].key) in ("ln1", "ln2", "final_ln"):
            return leaf + jnp.asarray(rng.normal(0, 0.2, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(move, params)


def _packed_batch(config, rng):
    """One row holding two documents (segments 1 and 2, positions restarting) and padding."""
    lengths = (7, 5)
    tokens = np.full((1, 16), 6, np.int32)
    positions = np.zeros((1, 16), np.int32)
    segments = np.zeros((1, 16), np.int32)
    start = 0
    for segment, n in enumerate(lengths, 1):
        tokens[0, start:start + n] = rng.integers(10, config.vocab_size, n)
        positions[0, start:start + n] = np.arange(n)
        segments[0, start:start + n] = segment
        start += n
    targets = np.roll(tokens, -1, axis=1)
    weights = ((segments == np.roll(segments, -1, axis=1)) & (segments > 0)).astype(np.float32)
    return tokens, targets, positions, segments, weights, lengths


@pytest.mark.slow
@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_gradients_agree_with_finite_differences_in_float64(layout):
    with jax.enable_x64(True):
        config = PanguConfig.preset("tiny", dtype="float64", param_dtype="float64")
        params = layout(_randomised(init_params(config, 0)))
        tokens, targets, positions, segments, weights, _ = _packed_batch(config, np.random.default_rng(1))

        def loss(p):
            logits, _ = forward(config, p, tokens, positions, segment_ids=segments)
            nll, count = token_loss(logits, targets, weights)
            return nll / count

        value, grads = jax.value_and_grad(loss)(params)
        assert value.dtype == jnp.float64
        rng = np.random.default_rng(2)
        for _ in range(3):
            direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
            norm = float(jnp.sqrt(sum(jnp.vdot(d, d) for d in jax.tree.leaves(direction))))
            direction = jax.tree.map(lambda d: d / norm, direction)  # a unit step in all the parameters at once
            eps = 1e-5
            shifted = [loss(jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction)) for s in (1, -1)]
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            assert abs(numeric - analytic) <= 1e-8 * max(1.0, abs(float(analytic))), (numeric, analytic)
        if layout is per_layer:  # the same gradients as the stacked layout's, laid out per layer
            stacked_grads = jax.grad(loss)(stacked(params))
            for a, b in zip(jax.tree.leaves(stacked(grads)), jax.tree.leaves(stacked_grads)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@functools.cache
def _gradient_products(config: PanguConfig, remat: str) -> list[tuple[str, str, str, bool]]:
    """(lhs, rhs, output element types, batched) of every product in the lowered gradient of the loss."""
    import re

    from pangu_jax.model import PanguAlpha

    params = abstract_params(config.replace(dtype="float32"))
    tokens, targets, positions, segments, weights, _ = _packed_batch(config, np.random.default_rng(1))

    def loss(p):
        logits, _, _ = PanguAlpha(config.resolved("cpu"), remat=remat).apply(
            {"params": p}, tokens, positions, segment_ids=segments)
        nll, count = token_loss(logits, targets, weights)
        return nll / count

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    element = r"tensor<(?:\d+x)*(\w+)>"
    return [(*re.search(rf": \({element}, {element}\) -> {element}", line).groups(), "batching_dims" in line)
            for line in text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_with_no_batch_dims",
                                   "dots_with_no_batch_dims_and_attention"])
def test_the_backward_multiplies_in_the_compute_dtype_and_remat_keeps_the_wide_products(remat):
    """In bfloat16 every product, backward ones included, takes bfloat16 operands: a float32 cotangent times an
    upcast operand would run at a fraction of the rate. The policies that save products also save those with
    a float32 output: the backward recomputes none of them that the policy names."""
    config = PanguConfig.preset("tiny", dtype="bfloat16", attention="explicit")
    products = _gradient_products(config, remat)
    assert products and all((lhs, rhs) == ("bf16", "bf16") for lhs, rhs, _, _ in products), products
    wide = [batched for _, _, out, batched in products if out == "f32"]
    kept = [batched for _, _, out, batched in _gradient_products(config, "none") if out == "f32"]
    if remat == "dots":
        assert wide == kept
    if remat.startswith("dots_with_no_batch_dims"):  # batched products (explicit attention's) are recomputed
        assert [b for b in wide if not b] == [b for b in kept if not b] and len(wide) > len(kept)
    if remat == "full":
        assert len(wide) > len(kept)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs only on a GPU")
def test_remat_can_keep_cudnn_attention_for_the_backward_pass():
    """`dots_with_no_batch_dims_and_attention` keeps what cuDNN attention's forward returns, so the backward
    pass runs the kernel's forward no more often than with nothing recomputed; the gradients do not move."""
    import re

    config = PanguConfig.preset("2.6B", dtype="bfloat16", attention="cudnn").replace(num_layers=3)
    params = init_params(config.replace(dtype="float32"), 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(10, config.vocab_size, (2, 256)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), tokens.shape)

    def gradient(remat):
        def loss(p):
            logits, _, _ = PanguAlpha(config.resolved(), remat=remat, causal_rows=True).apply(
                {"params": p}, tokens, positions)
            return jax.nn.logsumexp(logits.astype(jnp.float32), -1).mean()
        step = jax.jit(jax.grad(loss))
        calls = re.findall(r'custom_call_target="([^"]*fmha[^"]*)"', step.lower(params).compile().as_text())
        return step(params), sum("Backward" not in call for call in calls)

    kept, forwards = gradient("dots_with_no_batch_dims_and_attention")
    recomputed, forwards_recomputed = gradient("dots_with_no_batch_dims")
    _, forwards_all_kept = gradient("none")
    assert forwards == forwards_all_kept < forwards_recomputed, (forwards, forwards_all_kept, forwards_recomputed)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(recomputed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_gradients_follow_the_float32_ones(tiny_fp32):
    config, params = tiny_fp32
    params = _randomised(params)
    tokens, targets, positions, segments, weights, _ = _packed_batch(config, np.random.default_rng(4))

    def gradients(dtype):
        def loss(p):
            logits, _ = forward(config.replace(dtype=dtype), p, tokens, positions, segment_ids=segments)
            nll, count = token_loss(logits, targets, weights)
            return nll / count
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))])

    exact, low = gradients("float32"), gradients("bfloat16")
    cosine = float(jnp.vdot(exact, low) / (jnp.linalg.norm(exact) * jnp.linalg.norm(low)))
    assert cosine > 0.999, cosine
    assert float(jnp.linalg.norm(low - exact) / jnp.linalg.norm(exact)) < 0.05


def test_a_bfloat16_step_casts_its_matrices_once_and_keeps_the_gradients_of_casting_at_each_use(tiny_fp32):
    """The trainer differentiates through matrices cast before the layers (`layers.in_compute_dtype`);
    its gradients are those of the model casting each parameter where it uses it. A leaf cast that the
    network uses wide (an output bias, a LayerNorm) would move them by bfloat16's rounding."""
    config, params = tiny_fp32
    params = _randomised(params)
    config = config.replace(dtype="bfloat16")
    batch = _random_batch(config)
    rate = 1e3  # the update dominates the parameter, so it is read back to float32's precision
    trainer = Trainer(config.resolved(), optax.sgd(rate), make_mesh("fsdp=1"), remat="none")
    state, _ = trainer.step(trainer.new_state(jax.tree.map(jnp.copy, params)), trainer.place_batch(batch))
    stepped = jax.tree.map(lambda p, n: (p - n) / rate, params, state.params)

    def loss(p):
        logits, _ = forward(config, p, batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        nll, count = token_loss(logits, batch["targets"], batch["loss_weights"])
        return nll / count

    expected = jax.jit(jax.grad(loss))(params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(stepped)[0], jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_a_packed_document_computes_what_it_computes_alone(tiny_fp32):
    config, params = tiny_fp32
    params = _randomised(params)
    tokens, targets, positions, segments, weights, lengths = _packed_batch(config, np.random.default_rng(3))
    packed, _ = forward(config, params, tokens, positions, segment_ids=segments)
    total, count = token_loss(packed, targets, weights)
    start, alone_total, alone_count = 0, 0.0, 0.0
    for n in lengths:
        doc = tokens[:, start:start + n]
        alone, _ = forward(config, params, doc)
        np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=2e-5)
        nll, c = token_loss(alone[:, :-1], doc[:, 1:], np.ones((1, n - 1), np.float32))
        alone_total, alone_count, start = alone_total + nll, alone_count + c, start + n
    np.testing.assert_allclose(total, alone_total, rtol=1e-5)
    assert float(count) == alone_count
    # Without segment ids the documents see each other, as the original pre-training's rows did.
    unsegmented, _ = forward(config, params, tokens, positions)
    assert float(jnp.abs(unsegmented[0, 7:12] - packed[0, 7:12]).max()) > 1e-3


def _concat_row(segments):
    """A `concat` row's positions and segment ids where `segments` holds real tokens: one sequence, then padding."""
    real = segments > 0
    return np.where(real, np.arange(segments.shape[1]), 0).astype(np.int32), real.astype(np.int32)


@pytest.mark.parametrize("layout", [stacked, per_layer])
def test_rows_masked_by_their_order_alone_compute_what_the_full_mask_computes_on_concat_rows(tiny_fp32, layout):
    config, params = tiny_fp32
    params = layout(_randomised(params))
    tokens, _, positions, segments, _, lengths = _packed_batch(config, np.random.default_rng(5))

    def logits(causal_rows, positions, segments):
        model = PanguAlpha(config.resolved(), per_layer=layout is per_layer, causal_rows=causal_rows)
        return model.apply({"params": params}, tokens, positions, segment_ids=segments)[0]

    real = sum(lengths)
    np.testing.assert_allclose(logits(True, *_concat_row(segments))[0, :real],
                               logits(False, *_concat_row(segments))[0, :real], atol=1e-5)
    # On a `reset` row the row order alone lets the second document see the first.
    reset, by_order = logits(False, positions, segments), logits(True, positions, segments)
    assert float(jnp.abs(by_order[0, 7:real] - reset[0, 7:real]).max()) > 1e-3


# --- the step ----------------------------------------------------------------------------------


def _tiny_trainer(mesh_shape: str, accumulation: int = 1, remat: str = "none") -> tuple[Trainer, PanguConfig]:
    """A trainer of the tiny preset. Adam's eps is raised: far below a gradient's rounding noise, Adam would
    blow that noise up to a whole step wherever a gradient is all but zero (the key bias's is zero in exact
    arithmetic), and two summation orders could not be compared."""
    from pangu_jax.train.config import OptimizerConfig

    config = PanguConfig.preset("tiny", dtype="float32")
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-4), 10)
    return Trainer(config.resolved(), opt, make_mesh(mesh_shape), accumulation=accumulation, remat=remat), config


def _random_batch(config, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, config.vocab_size, (rows, length + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "segment_ids": np.ones((rows, length), np.int32), "loss_weights": np.ones((rows, length), np.float32)}


def _spec(array) -> tuple:
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


@pytest.mark.slow
def test_the_13B_fsdp4_config_splits_its_whole_state_in_four_and_its_step_fits_a_card():
    """The 13B full fine-tune's config on four (fake CPU) devices, from shapes alone: every matrix and its
    moments split four ways, and the compiled step's arguments and temporaries per device under 80 GB (the
    CPU's estimate, above a GPU's: its attention keeps the scores)."""
    config = load_train_config(ROOT / "train" / "configs" / "13B-full-fsdp4.yaml", ["model.random_init=true"])
    mesh = run_mesh(config)
    model = PanguConfig.preset(config.model.preset, param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    trainer = make_trainer(config, model, mesh)
    state = trainer.abstract_state(abstract_params(model))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    shard_bytes = total_bytes = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape))
        if leaf.size >= 2**20:  # every matrix and embedding, and their moments; biases may stay whole
            assert shard * 4 == leaf.size, jax.tree_util.keystr(path)
        shard_bytes += shard * leaf.dtype.itemsize
        total_bytes += leaf.size * leaf.dtype.itemsize
    assert shard_bytes < 1.01 * total_bytes / 4
    batch = {name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=trainer.batch_sharding())
             for name, value in _random_batch(model, config.data.batch_size, config.data.seq_len).items()}
    memory = trainer.lower_step(state, batch).compile().memory_analysis()
    assert memory.argument_size_in_bytes + memory.temp_size_in_bytes < 80e9


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_a_sharded_step_equals_the_unsharded_one(shape):
    one, config = _tiny_trainer("fsdp=1", remat="full")
    many, _ = _tiny_trainer(shape, remat="full")
    params = _randomised(init_params(config, 0))
    states = [t.new_state(jax.tree.map(jnp.copy, params)) for t in (one, many)]
    for step in range(2):
        batch = _random_batch(config, seed=step)
        results = [t.step(s, t.place_batch(batch)) for t, s in zip((one, many), states)]
        states = [state for state, _ in results]
        np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(states[0].params), jax.tree.leaves(states[1].params)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    state = states[1]
    fsdp, tensor = ("fsdp" if "fsdp" in shape else None), ("tensor" if "tensor" in shape else None)
    up = state.params["blocks"]["mlp"]["up_kernel"]  # [layers, mlp, embed]
    assert _spec(up) == (None, tensor, fsdp)
    mu = state.opt_state[1].mu["blocks"]["mlp"]["up_kernel"]  # the moments follow their parameters
    assert _spec(mu) == _spec(up) and mu.sharding.mesh == up.sharding.mesh


@pytest.mark.slow
def test_micro_batches_sum_to_the_whole_batch():
    whole, config = _tiny_trainer("fsdp=1")
    pieces, _ = _tiny_trainer("fsdp=1", accumulation=4)
    params = init_params(config, 0)
    batch = _random_batch(config)
    results = [t.step(t.new_state(jax.tree.map(jnp.copy, params)), t.place_batch(batch)) for t in (whole, pieces)]
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0].params), jax.tree.leaves(results[1][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_concat_run_masks_by_the_row_order_alone_and_steps_as_the_full_mask_does():
    model, mesh = PanguConfig.preset("tiny", dtype="float32"), make_mesh("fsdp=1")
    trainer = make_trainer(load_train_config(DEMO, ["data.packing=concat"]), model, mesh)
    assert trainer.causal_rows and not make_trainer(load_train_config(DEMO), model, mesh).causal_rows
    batch = _random_batch(model, rows=2)
    batch["segment_ids"][:, 12:] = batch["positions"][:, 12:] = batch["loss_weights"][:, 11:] = 0  # padding at the end
    params = _randomised(init_params(model, 0))
    results = [t.step(t.new_state(jax.tree.map(jnp.copy, params)), t.place_batch(batch))
               for t in (trainer, dataclasses.replace(trainer, causal_rows=False))]
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0].params), jax.tree.leaves(results[1][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_step_whose_loss_is_not_finite_is_skipped_and_counted():
    trainer, config = _tiny_trainer("fsdp=1")
    state = trainer.new_state(init_params(config, 0))
    before = jax.tree.map(np.asarray, state.params)
    bad = _random_batch(config)
    bad["loss_weights"][0, 3] = np.nan
    state, metrics = trainer.step(state, trainer.place_batch(bad))
    assert bool(metrics["skipped"]) and int(state.skipped) == 1 and int(state.bad_steps) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    state, metrics = trainer.step(state, trainer.place_batch(_random_batch(config)))
    assert not bool(metrics["skipped"]) and int(state.bad_steps) == 0 and int(state.skipped) == 1


def test_weight_decay_spares_biases_and_layernorm():
    from pangu_jax.train.optimizer import decay_mask

    mask = decay_mask(abstract_params(PanguConfig.preset("tiny")))
    assert mask["blocks"]["attention"]["query_kernel"] and mask["word_embedding"] and mask["position_embedding"]
    assert not mask["blocks"]["attention"]["query_bias"] and not mask["final_ln"]["scale"]
    assert not mask["blocks"]["ln1"]["bias"] and not mask["top_query_layer"]["mlp"]["down_bias"]


# --- runs --------------------------------------------------------------------------------------


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _saved_state(config_overrides, out: Path, step: int):
    config = load_train_config(DEMO, config_overrides)
    from pangu_jax.train.loop import load_model, run_mesh

    mesh = run_mesh(config)
    model, params = load_model(config, mesh)
    trainer = make_trainer(config, model, mesh)
    store = StateStore(out / "checkpoints", keep=config.run.keep)
    try:
        return store.restore(trainer.abstract_state(params), step)
    finally:
        store.close()



@pytest.mark.slow
def test_resume_is_exact(corpus, vocab_path, tmp_path):
    """Six steps straight equal three, a save, a fresh process that restores, and three more: bit for bit."""
    straight = small(corpus, tmp_path / "straight", "run.micro_batch=2")
    finetune(load_train_config(DEMO, straight), vocab_path=vocab_path, progress=False)
    halves = small(corpus, tmp_path / "halves", "run.micro_batch=2")
    first = finetune(load_train_config(DEMO, halves), vocab_path=vocab_path, cancel=CancelAfter(3), progress=False)
    assert first.cancelled and first.steps == 3
    done = ScriptRunner("train/finetune.py").subprocess([*halves, "--quiet", "--vocab", vocab_path])
    assert done.returncode == 0, done.stderr
    losses = {out: [r["loss"] for r in _metrics(tmp_path / out) if "loss" in r] for out in ("straight", "halves")}
    assert losses["straight"] == losses["halves"] and len(losses["straight"]) == 6
    a = _saved_state(straight, tmp_path / "straight", 6)
    b = _saved_state(halves, tmp_path / "halves", 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_the_merged_export_computes_the_same(corpus, vocab_path, tmp_path):
    overrides = small(corpus, tmp_path / "run", "lora.rank=4", "lora.targets=[query, value, up]",
                      "optimizer.learning_rate=1e-2")
    result = finetune(load_train_config(DEMO, overrides), vocab_path=vocab_path, progress=False)
    state = _saved_state(overrides, tmp_path / "run", 6)
    base_config, base = load_checkpoint(ROOT / "pangu_jax" / "assets" / "tiny-40k.ckpt", dtype="float32")
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):  # the base never moved
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapters = state.params["blocks"]["attention"]
    assert set(adapters) == {"query_lora_a", "query_lora_b", "value_lora_a", "value_lora_b"}
    assert float(jnp.abs(adapters["query_lora_b"]).max()) > 0  # B started at zero: it trained
    from pangu_jax.train.lora import join

    lora_config = base_config.replace(lora_rank=4, lora_targets=("query", "value", "up"))
    tokens = jnp.asarray([[3826, 11, 21652, 16, 28, 5, 77]])
    with_adapters, _ = forward(lora_config, join(state.params, state.frozen), tokens)
    exported_config, exported = load_checkpoint(result.model_dir)
    assert exported_config.lora_rank == 0
    merged, _ = forward(exported_config, exported, tokens)
    np.testing.assert_allclose(merged, with_adapters, atol=1e-4)
    plain, merged_params = merge_adapters(lora_config, join(state.params, state.frozen))
    np.testing.assert_allclose(forward(plain, merged_params, tokens)[0], with_adapters, atol=1e-4)


@pytest.mark.slow
def test_a_run_folder_generates_and_converts(corpus, vocab_path, tmp_path):
    finetune(load_train_config(DEMO, small(corpus, tmp_path / "run")), vocab_path=vocab_path, progress=False)
    model = tmp_path / "run" / "model"
    generate = ScriptRunner("infer/generate.py")
    assert generate(["--checkpoint", str(model), "--prompt", "中国", "--max-new-tokens", "4", "--vocab",
                     str(vocab_path), "--no-compilation-cache"]) == 0
    convert = ScriptRunner("checkpoints/convert.py")
    assert convert([str(model), str(tmp_path / "hf"), "--to", "hf", "--quiet", "--check"]) == 0
    assert convert([str(model), str(tmp_path / "out.ckpt"), "--to", "mindspore", "--quiet", "--check"]) == 0


@pytest.mark.slow
def test_sigterm_saves_a_state_the_next_run_resumes_from(corpus, vocab_path, tmp_path):
    args = [*small(corpus, tmp_path / "run", "run.steps=100000", "run.checkpoint_minutes=1000"), "--quiet",
            "--vocab", str(vocab_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train" / "finetune.py"), *args], env=env,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=240)[1]
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped at step" in err
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 2
    resumed = small(corpus, tmp_path / "run", f"run.steps={saved[-1] + 1}")
    result = finetune(load_train_config(DEMO, resumed), vocab_path=vocab_path, progress=False)
    assert result.steps == saved[-1] + 1 and not result.cancelled


@pytest.mark.slow
def test_the_demo_learns(vocab_path, peoples_daily, tmp_path, capsys):
    """The CPU demo, shortened: the loss falls and the held-out perplexity drops."""
    cli = ScriptRunner("train/finetune.py")
    assert cli([f"run.output_dir={tmp_path}", "run.steps=60", "run.eval_every=30", "run.log_every=10",
                "--quiet", "--vocab", str(vocab_path)]) == 0
    assert "done: 60 steps" in capsys.readouterr().out
    records = _metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    perplexities = [r["eval_perplexity"] for r in records if "eval_perplexity" in r]
    assert max(losses[-2:]) < 0.85 * losses[0] and perplexities[-1] < 0.2 * perplexities[0], (losses, perplexities)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finetune_processes(args: list[str], processes: int, devices: int) -> None:
    """train/finetune.py as `processes` processes of `devices` CPU devices each, joined over localhost."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    running = [subprocess.Popen([sys.executable, str(ROOT / "train" / "finetune.py"), *args],
                                env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(processes)]
    for process in running:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        assert "done:" in out


def test_a_training_process_claims_most_of_each_gpu_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    claim_device_memory()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    claim_device_memory()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


@pytest.mark.slow
def test_two_processes_train_save_and_resume_as_one_does(corpus, vocab_path, tmp_path):
    """Two processes joined by jax.distributed (CPU collectives over localhost), each feeding its share of
    every batch, train, save, resume and export what one process with as many devices does. Adam's eps is
    raised for the comparison, as in `_tiny_trainer`."""
    runs = {}
    for name, processes, devices in (("two", 2, 2), ("one", 1, 4)):
        out = tmp_path / name
        for steps in (3, 5):  # the second resumes from the first's saved state
            args = small(corpus, out, f"run.steps={steps}", "run.mesh=data=2,fsdp=2", "data.batch_size=8",
                         "optimizer.eps=1e-4")
            _finetune_processes([*args, "--quiet", "--vocab", str(vocab_path)], processes, devices)
        runs[name] = out
    losses = {name: [(r["step"], r["loss"]) for r in _metrics(out) if "loss" in r] for name, out in runs.items()}
    assert [s for s, _ in losses["two"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in losses["two"]], [v for _, v in losses["one"]], rtol=1e-5)
    (_, two), (_, one) = (load_checkpoint(out / "model") for out in runs.values())
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_eval_ppl_prints_the_perplexity_the_harness_computes(corpus, vocab_path, capsys):
    from pangu_jax import Tokenizer
    from pangu_jax.assets import EMBEDDED_CHECKPOINT
    from pangu_jax.evaluate import perplexity, read_documents

    cli = ScriptRunner("train/eval_ppl.py")
    assert cli(["--checkpoint", str(EMBEDDED_CHECKPOINT), "--data", str(corpus), "--vocab", str(vocab_path),
                "--quiet"]) == 0
    config, params = load_checkpoint(EMBEDDED_CHECKPOINT)
    want = perplexity(config, params, Tokenizer(vocab_path), read_documents(corpus))
    assert f"perplexity {want.perplexity:.4g} (mean loss {want.loss:.4f} nats over {want.tokens} tokens" in \
        capsys.readouterr().out
    assert cli(["--checkpoint", str(EMBEDDED_CHECKPOINT), "--data", "absent.txt"]) == 1
    assert_one_error_line(capsys.readouterr().err, "'absent.txt' does not exist")
