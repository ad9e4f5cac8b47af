"""checkpoints/convert.py end to end, and what a failed conversion leaves behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pangu_jax.checkpoints import CheckpointFormatError
from pangu_jax.checkpoints import convert as conversion
from pangu_jax.checkpoints.convert import ConversionCancelled, DestinationError, convert, verify_md5
from tests.conftest import FIXTURES, CancelAfter, ScriptRunner, assert_one_error_line, tree_snapshot

FP32 = FIXTURES / "tiny_fp32.ckpt"


@pytest.fixture(scope="module")
def cli():
    return ScriptRunner("checkpoints/convert.py")


def _fail_on_call(n: int, real):
    """`real`, except that its n-th call raises: a writer dying midway."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return wrapped



def test_cli_converts_checks_and_summarises(cli, tmp_path, capsys):
    assert cli([str(FP32), str(tmp_path / "store"), "--check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"mindspore {FP32} -> orbax {tmp_path / 'store'}" in out
    assert "hidden 64, layers 3, heads 4, ffn 256, vocab 1000, positions 128, gelu_tanh, float32" in out
    assert "53 tensors" in out and "bytes written" in out
    assert "check: max abs logit difference 0" in out
    assert cli([str(tmp_path / "store"), str(tmp_path / "hf"), "--to", "hf", "--check"]) == 0
    assert "orbax" in capsys.readouterr().out and (tmp_path / "hf" / "model.safetensors").is_file()


def test_check_runs_each_model_in_its_stored_dtype(tmp_path, monkeypatch):
    """float16 stays float16 (half the host memory of a float32 check), and an uncast copy agrees exactly."""
    loaded = []
    real = conversion.load_checkpoint

    def spy(path, config):
        config, params = real(path, config)
        loaded.append(config.param_dtype)
        return config, params

    convert(FIXTURES / "tiny_fp16.ckpt", tmp_path / "store", progress=False)
    monkeypatch.setattr(conversion, "load_checkpoint", spy)
    config, _ = real(tmp_path / "store")
    assert conversion.compare_logits(FIXTURES / "tiny_fp16.ckpt", tmp_path / "store", config) == 0.0
    assert loaded == ["float16", "float16"]


def test_cli_cast_reports_the_difference_without_failing(cli, tmp_path, capsys):
    assert cli([str(FP32), str(tmp_path / "half.ckpt"), "--to", "mindspore", "--dtype", "float16",
                     "--check", "--quiet"]) == 0
    diff = float(capsys.readouterr().out.split("max abs logit difference ")[1].split()[0])
    assert 1e-4 < diff < 0.05  # fp16 weights move the logits (fixtures/README.md: 6.9e-03)


def test_cli_check_fails_when_logits_differ(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(conversion, "compare_logits", lambda *a: 0.5)
    assert cli([str(FP32), str(tmp_path / "npy"), "--to", "npy", "--check", "--quiet"]) == 1
    assert "difference 0.5 exceeds 0.0001" in capsys.readouterr().err


def test_cli_verify_md5(cli, tmp_path, capsys):
    assert cli([str(FP32), str(tmp_path / "a"), "--verify-md5", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, "tiny_fp32.ckpt: no released file of that name", "--allow-unknown")
    assert not (tmp_path / "a").exists()
    assert cli([str(FP32), str(tmp_path / "a"), "--verify-md5", "--allow-unknown", "--quiet"]) == 0
    assert "tiny_fp32.ckpt: no released file of that name" in capsys.readouterr().out
    impostor = tmp_path / "PanguAlpha_2.6B_fp16.ckpt"
    shutil.copy(FP32, impostor)
    assert cli([str(impostor), str(tmp_path / "b"), "--verify-md5", "--quiet"]) == 1
    assert "expected 3a14e8bf50548a717160e89df7c14b63" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli([str(FIXTURES / "npy"), str(tmp_path / "c"), "--verify-md5", "--quiet"]) == 1
    assert "MindSpore .ckpt files only" in capsys.readouterr().err


def test_verify_md5_matches_release_names_ignoring_case(tmp_path):
    spelled = tmp_path / "PanguAlpha_13B_fp16.ckpt"  # as the README spells it; released as ..._13b_...
    shutil.copy(FP32, spelled)
    with pytest.raises(CheckpointFormatError, match="expected f2734649b9b859ff4cf62d496291249a for the released "
                                                    "PanguAlpha_13b_fp16.ckpt"):
        verify_md5(spelled)


def test_cli_errors_are_one_line(cli, tmp_path, capsys):
    assert cli([str(tmp_path / "absent.ckpt"), str(tmp_path / "out")]) == 1
    assert "error: checkpoint" in capsys.readouterr().err
    assert cli([str(FP32), str(tmp_path / "out"), "--model", "2.6B", "--quiet"]) == 1
    assert "expected (40000, 2560)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The fixture converted once to each format: {format: path}."""
    root = tmp_path_factory.mktemp("written")
    targets = {"orbax": "store", "hf": "hf", "npy": "npy", "mindspore": "out.ckpt"}
    for to, name in targets.items():
        convert(FP32, root / name, to=to, progress=False)
    return {to: root / name for to, name in targets.items()}


def _copy(path, where):
    target = where / path.name
    (shutil.copytree if path.is_dir() else shutil.copy)(path, target)
    return target


@pytest.mark.parametrize("to", ["orbax", "hf", "npy", "mindspore"])
@pytest.mark.parametrize("stop", ["cancelled after 5 tensors", "disk full on the 3rd array"])
def test_failed_conversion_leaves_the_existing_dst_and_no_temporary(tmp_path, monkeypatch, written, to, stop):
    dst = _copy(written[to], tmp_path)
    before = tree_snapshot(tmp_path)
    cancel = None
    if stop.startswith("cancelled"):
        cancel = CancelAfter(5)
    else:
        monkeypatch.setattr(np, "asarray", _fail_on_call(3, np.asarray))
    with pytest.raises((ConversionCancelled, OSError)):
        convert(FIXTURES / "tiny_fp16.ckpt", dst, to=to, progress=False, overwrite=True, cancel=cancel)
    monkeypatch.undo()
    assert tree_snapshot(tmp_path) == before


def test_orbax_conversion_writes_each_leaf_before_reading_the_next(tmp_path):
    """The host holds one leaf of the tree at a time: only its own tensors are read before it is written."""

    class PiecesAtEachRead:  # asked once per tensor read, before that tensor is written
        def __init__(self):
            self.counts = []

        def is_set(self):
            self.counts.append(sum(1 for p in tmp_path.glob(".store.*.tmp/params/*") if "tmp" not in p.name))
            return False

    spy = PiecesAtEachRead()
    convert(FP32, tmp_path / "store", progress=False, cancel=spy)
    reads_per_leaf = [spy.counts.count(n) for n in range(max(spy.counts) + 1)]
    assert spy.counts == sorted(spy.counts) and len(reads_per_leaf) == 37 and sum(reads_per_leaf) == 53
    assert sorted(set(reads_per_leaf)) == [1, 2]  # two stacked blocks in the fixture
    assert reads_per_leaf.count(2) == 16  # the sixteen leaves of a block


def test_failed_conversion_to_a_new_dst_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", _fail_on_call(30, np.save))
    with pytest.raises(OSError, match="simulated"):
        convert(FP32, tmp_path / "npy", to="npy", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_checkpoint_of_the_target_format(tmp_path, written):
    dst = _copy(written["npy"], tmp_path)
    with pytest.raises(DestinationError, match="already exists; pass --overwrite"):
        convert(FIXTURES / "tiny_fp16.ckpt", dst, to="npy", progress=False)
    convert(FIXTURES / "tiny_fp16.ckpt", dst, to="npy", progress=False, overwrite=True)
    assert np.load(dst / "backbone.layernorm.beta.npy").dtype == np.float16
    assert [p.name for p in tmp_path.iterdir()] == ["npy"]


def _existing(kind: str, root, to: str):
    """A destination that exists before the conversion, of the given kind; returns (dst, src)."""
    src = root / "src" / FP32.name
    src.parent.mkdir()
    shutil.copy(FP32, src)
    if kind == "empty folder":
        (root / "out").mkdir()
        return root / "out", src
    if kind == "folder with a file":
        (root / "out").mkdir()
        (root / "out" / "notes.txt").write_text("mine")
        return root / "out", src
    if kind == "folder with a foreign file beside a checkpoint":
        from_checkpoint = root / "out"
        convert(FP32, from_checkpoint, to=to, progress=False)
        if to != "mindspore":
            (from_checkpoint / "README.md").write_text("mine")
        return from_checkpoint, src
    if kind == "a file":
        (root / "out").write_text("mine")
        return root / "out", src
    if kind == "the folder holding src":
        return src.parent, src
    if kind == "the current folder":
        return Path("."), src
    if kind == "src itself":
        return src, src
    raise AssertionError(kind)


KINDS = ["empty folder", "folder with a file", "folder with a foreign file beside a checkpoint", "a file",
         "the folder holding src", "the current folder", "src itself"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("to", ["orbax", "hf", "npy", "mindspore"])
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_an_existing_dst_of_any_kind_loses_nothing(cli, tmp_path, monkeypatch, capsys, kind, to, overwrite):
    """Whatever stood at DST: every file that existed before still exists, unchanged, unless it was a
    checkpoint of the target format replaced as asked; a refusal is one line and leaves no temporary."""
    monkeypatch.chdir(tmp_path)
    dst, src = _existing(kind, tmp_path, to)
    before = tree_snapshot(tmp_path)
    code = cli([str(src), str(dst), "--to", to, "--quiet"] + ["--overwrite"] * overwrite)
    err = capsys.readouterr().err
    after = tree_snapshot(tmp_path)
    replaceable = ((kind == "empty folder" and to != "mindspore")
                   or (kind.endswith("beside a checkpoint") and to == "mindspore" and overwrite))
    if not replaceable:
        assert code == 1 and after == before, (code, err)
        assert_one_error_line(err)
        return
    assert code == 0, err
    inside = {p for p in before if Path(p).parts[0] == dst.name}
    assert {p: d for p, d in before.items() if p not in inside} == {p: d for p, d in after.items()
                                                                     if Path(p).parts[0] != dst.name}
    conversion.load_checkpoint(dst)


@pytest.mark.parametrize("args, message", [
    (["--to", "npy", "--dtype", "bfloat16"], ".npy files cannot hold bfloat16"),
    (["--to", "mindspore"], "is a folder; --to mindspore writes one .ckpt file"),
])
def test_cli_refuses_what_cannot_be_written_before_writing(cli, tmp_path, capsys, args, message):
    (tmp_path / "out").mkdir()
    target = tmp_path / ("out" if "mindspore" in args else "new")
    assert cli([str(FP32), str(target), "--quiet", *args]) == 1
    assert_one_error_line(capsys.readouterr().err, message)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_names_the_destination_it_cannot_write(cli, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli([str(FP32), str(tmp_path / "afile" / "store"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'afile'} is a file, not a folder")
    assert cli([str(FP32), str(tmp_path / "no" / "store"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"the folder {tmp_path / 'no'} does not exist")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    assert cli([str(FP32), str(locked / "store"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"{locked / 'store'}: cannot write in {locked}")


def _big_source(root) -> Path:
    """A synthetic model big enough that converting it takes a few seconds (a HuggingFace folder: its config
    is recorded, as no preset has these sizes)."""
    from pangu_jax import PanguConfig
    from pangu_jax.checkpoints.hf_format import write_hf
    from pangu_jax.checkpoints.layout import mindspore_slots
    from pangu_jax.checkpoints.synthetic import random_mindspore_tensors

    config = PanguConfig.preset("350M", num_layers=6)
    path = root / "big"
    write_hf(path, config, random_mindspore_tensors(config, dtype="float32"),
             dict.fromkeys(mindspore_slots(config), np.dtype(np.float32)))
    return path


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    return _big_source(tmp_path_factory.mktemp("big"))


def _pieces_written(folder: Path) -> int:
    return sum(1 for temporary in folder.glob(".store.*.tmp") for _ in temporary.glob("params/*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, pieces", [(signal.SIGINT, 0), (signal.SIGINT, 6), (signal.SIGTERM, 3),
                                            (signal.SIGINT, 20)])
def test_a_signalled_conversion_stops_cleanly_and_leaves_nothing(cli, tmp_path, big_source, signum, pieces):
    dst = tmp_path / "store"
    process = subprocess.Popen([sys.executable, str(cli.path), str(big_source), str(dst), "--quiet"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _wait_for(lambda: _pieces_written(tmp_path) > pieces or process.poll() is not None)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signum)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: "), err
    assert "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("pieces", [0, 10])
def test_after_a_kill_the_next_conversion_removes_what_was_left(cli, tmp_path, big_source, pieces):
    dst = tmp_path / "store"
    process = subprocess.Popen([sys.executable, str(cli.path), str(big_source), str(dst), "--quiet"],
                               stderr=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _wait_for(lambda: _pieces_written(tmp_path) > pieces or process.poll() is not None)
    process.kill()
    process.wait()
    (left,) = tmp_path.glob(".store.*.tmp")
    done = cli.subprocess([FP32, dst, "--quiet"])
    assert done.returncode == 0, done.stderr
    assert f"note: removed {left}, left by an interrupted write" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    conversion.load_checkpoint(dst)


def test_a_swap_killed_between_its_renames_gets_the_old_checkpoint_back(tmp_path, written):
    """The old DST was moved aside, the new one not yet moved in: the next run restores the old one."""
    from pangu_jax.atomic import clear_stale

    aside = tmp_path / f".store.{2**22 + 7}-{'a' * 32}.old"  # a process id no process has
    shutil.copytree(written["orbax"], aside)
    before = tree_snapshot(aside)
    assert clear_stale(tmp_path / "store") == [f"restored {tmp_path / 'store'} from {aside.name}, "
                                               "left by an interrupted write"]
    assert tree_snapshot(tmp_path / "store") == before and not aside.exists()


def test_a_running_conversions_temporary_is_left_alone(tmp_path):
    from pangu_jax.atomic import clear_stale

    running = tmp_path / f".store.{os.getpid()}-{'b' * 32}.tmp"
    running.mkdir()
    assert clear_stale(tmp_path / "store") == [] and running.exists()


def test_a_model_of_a_size_no_preset_has_converts_with_a_config_file(cli, tmp_path, capsys):
    """A MindSpore file records no head count: one of our config files, or a HuggingFace one, gives it."""
    import json

    from pangu_jax import PanguConfig
    from pangu_jax.checkpoints.hf_format import hf_config_dict
    from pangu_jax.checkpoints.mindspore_format import write_mindspore
    from pangu_jax.checkpoints.synthetic import random_mindspore_tensors

    config = PanguConfig.preset("tiny", num_layers=5, num_heads=8)
    src = tmp_path / "odd.ckpt"
    write_mindspore(src, random_mindspore_tensors(config))
    assert cli([str(src), str(tmp_path / "a"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, "matches no preset", "--config")
    ours, theirs = tmp_path / "ours.json", tmp_path / "config.json"
    ours.write_text(config.to_json())
    theirs.write_text(json.dumps(hf_config_dict(config, np.dtype(np.float16))))
    for name, given in (("a", ours), ("b", theirs)):
        assert cli([str(src), str(tmp_path / name), "--config", str(given), "--quiet", "--check"]) == 0
        assert "layers 5, heads 8" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"num_heads": "8"}')
    assert cli([str(src), str(tmp_path / "c"), "--config", str(tmp_path / "bad.json"), "--quiet"]) == 1
    assert_one_error_line(capsys.readouterr().err, "bad.json")
