"""The fine-tuning run: load the model onto the mesh, feed it batches, evaluate, save, resume, report.

`finetune(config)` restores the run in `run.output_dir` if one was saved
there (the state, and through the step the data's position), else starts
one; trains to `run.steps`; and writes the final parameters as our orbax
store, `<output_dir>/model`, which `load_checkpoint`, `infer/generate.py`
and `checkpoints/convert.py` read (adapters merged in). Setting `cancel`
(SIGTERM or SIGINT in `train/finetune.py`) saves the state and ends the run
after the step in hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import jax
import numpy as np

from ..assets import EMBEDDED_CHECKPOINT
from ..checkpoints import load_checkpoint, save_orbax, save_orbax_stream
from ..config import PRESETS, PanguConfig
from ..model import init_params
from ..sharding import TRAIN_RULES, make_mesh, param_shardings
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .data import TrainData, load_data
from .lora import init_adapters, join, merge_adapters
from .metrics import MetricsWriter, Timers, flops_per_token, peak_flops
from .optimizer import make_optimizer, schedule
from .state_store import StateStore
from .step import TrainState, Trainer

__all__ = ["RunResult", "TrainingStopped", "finetune", "load_model", "make_trainer", "run_mesh"]


class TrainingStopped(RuntimeError):
    """Too many steps in a row had a loss or gradient that was not finite; the last saved state is intact."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    steps: int  # optimizer steps taken in all (skipped ones included)
    skipped: int  # steps whose loss or gradient norm was not finite
    last_loss: float
    eval_loss: float | None  # mean over the held-out tokens at the end
    model_dir: Path | None  # the exported store (None when the run was cancelled)
    cancelled: bool


def load_model(config: TrainConfig, mesh) -> tuple[PanguConfig, dict]:
    """The model to train, placed on `mesh` by the training rules, with fresh adapters when asked for."""
    m = config.model
    if m.random_init:
        model = PanguConfig.preset(m.preset, param_dtype=m.param_dtype, dtype=m.param_dtype)
        shardings = param_shardings(model, mesh, rules=TRAIN_RULES)
        params = jax.jit(lambda key: init_params(model, key), out_shardings=shardings)(jax.random.key(config.run.seed))
    else:
        path = m.checkpoint or EMBEDDED_CHECKPOINT
        model, params = load_checkpoint(path, dtype=m.param_dtype, mesh=mesh, rules=TRAIN_RULES)
        if m.preset is not None:
            _check_preset(model, m.preset, path)
    model = model.replace(dtype=m.dtype, attention=m.attention, lora_rank=config.lora.rank,
                          lora_alpha=config.lora.alpha, lora_targets=config.lora.targets)
    if model.lora_rank:
        params = join(init_adapters(model, jax.random.key(config.run.seed + 1),
                                    param_shardings(model, mesh, rules=TRAIN_RULES)), params)
    if config.data.seq_len > model.max_positions:
        raise ValueError(f"data.seq_len {config.data.seq_len} exceeds the model's {model.max_positions} positions")
    return model, params


def _check_preset(model: PanguConfig, preset: str, path) -> None:
    wanted = PRESETS[preset]  # the sizes the preset fixes
    found = {field: getattr(model, field) for field in wanted}
    if found != wanted:
        raise ValueError(f"model.checkpoint {path}: a model of {found}, not PanGu-alpha {preset} "
                         f"(model.preset) of {wanted}")


def make_trainer(config: TrainConfig, model: PanguConfig, mesh) -> Trainer:
    return Trainer(model.resolved(), make_optimizer(config.optimizer, config.run.steps), mesh,
                   accumulation=config.accumulation, dropout=config.model.dropout, remat=config.model.remat,
                   causal_rows=config.data.packing == "concat", seed=config.run.seed)


def run_mesh(config: TrainConfig):
    """The run's mesh (default: every device on fsdp), checked against the micro-batch it splits."""
    mesh = make_mesh(config.run.mesh or f"fsdp={jax.device_count()}")
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.micro_batch % rows:
        raise ValueError(f"run.micro_batch {config.micro_batch} (rows a forward pass takes) does not split over the "
                         f"mesh's data x fsdp = {rows} devices ({dict(mesh.shape)}): make it a multiple of {rows}, "
                         "or set run.mesh")
    return mesh


def finetune(config: TrainConfig, *, vocab_path: str | None = None, cancel: threading.Event | None = None,
             progress: bool = True) -> RunResult:
    """Run (or resume) the fine-tuning `config` describes; see the module docstring."""
    out = Path(config.run.output_dir)
    mesh = run_mesh(config)
    model, params = load_model(config, mesh)
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(config, model, mesh)
    pieces = Tokenizer(vocab_path).vocab_size
    if pieces > model.vocab_size:
        raise ValueError(f"the vocabulary's {pieces} pieces do not fit the model's vocab_size {model.vocab_size}: "
                         "train a model of the real vocabulary (e.g. model.preset=tiny-40k model.random_init=true, "
                         "not tiny)")
    data = load_data(config.data, vocab_path)
    store = StateStore(out / "checkpoints", keep=config.run.keep)
    abstract = trainer.abstract_state(params)
    state = store.restore(abstract)
    if state is None:
        state = trainer.new_state(params)
        if jax.process_index() == 0:
            (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    del params
    writer = MetricsWriter(out, tensorboard=config.run.tensorboard)
    try:
        return _run(config, model, trainer, data, state, store, writer, cancel, progress)
    finally:
        writer.close()
        store.close()


def _run(config: TrainConfig, model: PanguConfig, trainer: Trainer, data: TrainData, state: TrainState,
         store: StateStore, writer: MetricsWriter, cancel: threading.Event | None, progress: bool) -> RunResult:
    from tqdm.auto import tqdm

    run = config.run
    rate = schedule(config.optimizer, run.steps)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops = flops_per_token(model, config.data.seq_len)
    peak = peak_flops() * jax.device_count()
    timers = Timers()
    first = int(state.step)
    bar = tqdm(total=run.steps, initial=first, desc="fine-tuning", disable=not progress or jax.process_index() != 0)
    if run.eval_every and first == 0 and len(data.eval):  # where the run starts from, to compare with
        with timers("eval"):
            writer.write({"step": 0, **_evaluate(trainer, data, state, run.eval_batches)})
    last_save, last_loss, window = time.monotonic(), math.nan, []
    cancelled = False
    for step in range(first, run.steps):
        with timers("data"):
            batch = trainer.place_batch(data.batch(step, process_index=jax.process_index(),
                                                   process_count=jax.process_count()))
        with timers("compile" if step == first else "step"):
            state, metrics = trainer.step(state, batch)
            metrics = jax.device_get(metrics)
        last_loss = float(metrics["loss"])
        if step != first:  # the first step's time is mostly compiling
            window.append(timers.last)
        if int(state.bad_steps) >= max(run.max_bad_steps, 1):
            raise TrainingStopped(
                f"step {step}: {int(state.bad_steps)} steps in a row had a loss or gradient norm that was not finite "
                f"(loss {last_loss}); the last saved state in {store.directory} is intact")
        done = step + 1
        if run.log_every and done % run.log_every == 0 or done == run.steps:
            record = {"step": done, "loss": last_loss, "grad_norm": float(metrics["grad_norm"]),
                      "learning_rate": float(rate(step)), "skipped": int(state.skipped), **timers.totals()}
            if window:  # steps timed since the last record, compiling left out
                seconds = sum(window) / len(window)
                record["tokens_per_s"] = tokens_per_step / seconds
                if peak:
                    record["mfu"] = flops * tokens_per_step / seconds / peak
                window.clear()
            writer.write(record)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{record['learning_rate']:.2e}",
                            **{k: f"{record[k]:.0f}" for k in ("tokens_per_s",) if k in record},
                            **{k: f"{record[k]:.1%}" for k in ("mfu",) if k in record})
        bar.update(1)
        if run.eval_every and done % run.eval_every == 0 and done < run.steps:
            with timers("eval"):
                writer.write({"step": done, **_evaluate(trainer, data, state, run.eval_batches)})
        cancelled = cancel is not None and cancel.is_set()
        due = (run.checkpoint_every and done % run.checkpoint_every == 0) or \
            time.monotonic() - last_save > 60 * run.checkpoint_minutes
        if run.save and (cancelled or due or done == run.steps):
            with timers("checkpoint"):
                store.save(done, state)
            last_save = time.monotonic()
        if cancelled:
            break
    bar.close()
    store.wait()
    if cancelled:
        return RunResult(int(state.step), int(state.skipped), last_loss, None, None, True)
    evaluation = None
    if len(data.eval):
        with timers("eval"):
            evaluation = _evaluate(trainer, data, state, run.eval_batches)
        writer.write({"step": int(state.step), **evaluation})
    model_dir = _export(config, model, state, Path(run.output_dir) / "model") if run.save else None
    writer.write({"step": int(state.step), "final": True, **timers.totals()})
    return RunResult(int(state.step), int(state.skipped), last_loss,
                     None if evaluation is None else evaluation["eval_loss"], model_dir, False)


def _evaluate(trainer: Trainer, data: TrainData, state: TrainState, limit: int | None) -> dict[str, float]:
    """Mean loss and perplexity over the held-out rows (the first `limit` batches of them)."""
    total, count = 0.0, 0.0
    for index, batch in enumerate(data.eval_batches(process_index=jax.process_index(),
                                                    process_count=jax.process_count())):
        if limit is not None and index >= limit:
            break
        nll, weight = jax.device_get(trainer.evaluate(state, trainer.place_batch(batch)))
        total, count = total + float(nll), count + float(weight)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}


def _export(config: TrainConfig, model: PanguConfig, state: TrainState, path: Path) -> Path:
    """The trained parameters as our orbax store (adapters merged in), in the training's parameter dtype.

    With several processes, each leaf is gathered (all take part) and the
    first process writes the store alone.
    """
    params = join(state.params, state.frozen)
    plain, params = merge_adapters(model, params)
    stored = plain.replace(attention="auto", decode_attention="auto", matvec="auto", dtype=plain.param_dtype)
    if jax.process_count() == 1:
        save_orbax(path, stored, params)  # swapped in whole: an earlier export of this run is replaced only then
        return path
    from jax.experimental import multihost_utils

    gathered = ((tuple(k.key for k in keys), np.asarray(multihost_utils.process_allgather(leaf, tiled=True)))
                for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0])
    if jax.process_index() == 0:
        save_orbax_stream(path, stored, gathered, alone=True)
    else:
        for _ in gathered:
            pass
    multihost_utils.sync_global_devices("pangu_jax export")
    return path
