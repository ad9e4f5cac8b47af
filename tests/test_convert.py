"""checkpoints/convert.py end to end, and what a failed conversion leaves behind."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pangu_jax.checkpoints import convert as conversion
from pangu_jax.checkpoints import hf_format, orbax_store
from pangu_jax.checkpoints.convert import convert, verify_md5
from tests.conftest import FIXTURES, load_script

FP32 = FIXTURES / "tiny_fp32.ckpt"


@pytest.fixture(scope="module")
def cli():
    return load_script("checkpoints/convert.py")


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
    assert cli.main([str(FP32), str(tmp_path / "store"), "--check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"mindspore {FP32} -> orbax {tmp_path / 'store'}" in out
    assert "hidden 64, layers 3, heads 4, ffn 256, vocab 1000, positions 128, gelu_tanh, float32" in out
    assert "53 tensors" in out and "bytes written" in out
    assert "check: max abs logit difference 0" in out
    assert cli.main([str(tmp_path / "store"), str(tmp_path / "hf"), "--to", "hf", "--check"]) == 0
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
    assert cli.main([str(FP32), str(tmp_path / "half.ckpt"), "--to", "mindspore", "--dtype", "float16",
                     "--check", "--quiet"]) == 0
    diff = float(capsys.readouterr().out.split("max abs logit difference ")[1].split()[0])
    assert 1e-4 < diff < 0.05  # fp16 weights move the logits (fixtures/README.md: 6.9e-03)


def test_cli_check_fails_when_logits_differ(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "compare_logits", lambda *a: 0.5)
    assert cli.main([str(FP32), str(tmp_path / "npy"), "--to", "npy", "--check", "--quiet"]) == 1
    assert "difference 0.5 exceeds 0.0001" in capsys.readouterr().err


def test_cli_verify_md5(cli, tmp_path, capsys):
    assert cli.main([str(FP32), str(tmp_path / "a"), "--verify-md5", "--quiet"]) == 0
    assert "tiny_fp32.ckpt: no reference MD5" in capsys.readouterr().out
    impostor = tmp_path / "PanguAlpha_2.6B_fp16.ckpt"
    shutil.copy(FP32, impostor)
    assert cli.main([str(impostor), str(tmp_path / "b"), "--verify-md5", "--quiet"]) == 1
    assert "expected 3a14e8bf50548a717160e89df7c14b63" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli.main([str(FIXTURES / "npy"), str(tmp_path / "c"), "--verify-md5", "--quiet"]) == 1
    assert "MindSpore .ckpt files only" in capsys.readouterr().err


def test_verify_md5_accepts_a_matching_file(tmp_path, monkeypatch):
    import hashlib

    digest = hashlib.md5(FP32.read_bytes()).hexdigest()
    monkeypatch.setitem(conversion.RELEASE_MD5, "tiny_fp32.ckpt", digest)
    assert verify_md5(FP32) == f"tiny_fp32.ckpt: MD5 {digest} matches the released file"


def test_cli_errors_are_one_line(cli, tmp_path, capsys):
    assert cli.main([str(tmp_path / "absent.ckpt"), str(tmp_path / "out")]) == 1
    assert "error: checkpoint" in capsys.readouterr().err
    assert cli.main([str(FP32), str(tmp_path / "out"), "--model", "2.6B", "--quiet"]) == 1
    assert "expected (40000, 2560)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("to, target, patch", [
    ("npy", "npy", lambda mp: mp.setattr(np, "save", _fail_on_call(20, np.save))),
    ("hf", "hf", lambda mp: mp.setattr(hf_format, "_write_at", _fail_on_call(20, hf_format._write_at))),
    ("mindspore", "out.ckpt", lambda mp: mp.setattr(conversion, "_target_dtype", lambda *a: np.dtype("complex64"))),
    ("orbax", "store", lambda mp: mp.setattr(orbax_store.PanguConfig, "to_json", _fail_on_call(1, None))),
    ("orbax", "store", lambda mp: mp.setattr(orbax_store, "_save_piece", _fail_on_call(5, orbax_store._save_piece))),
])
def test_failed_conversion_leaves_existing_dst_and_no_temp(tmp_path, monkeypatch, to, target, patch):
    dst = tmp_path / target
    if to == "mindspore":
        dst.write_bytes(b"old")
    else:
        dst.mkdir()
        (dst / "old.txt").write_text("old")
    patch(monkeypatch)
    with pytest.raises((OSError, TypeError)):
        convert(FP32, dst, to=to, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target]
    assert (dst.read_bytes() if to == "mindspore" else (dst / "old.txt").read_bytes()) == b"old"


def test_orbax_conversion_writes_each_leaf_before_reading_the_next(tmp_path, monkeypatch):
    """The host holds one leaf of the tree at a time: only its own tensors are read before it is written."""
    events = []
    tick, save_piece = conversion._Progress.tick, orbax_store._save_piece

    def reading(self, nbytes):
        events.append("read")
        tick(self, nbytes)

    def writing(checkpointer, directory, key, value):
        events.append(key)
        save_piece(checkpointer, directory, key, value)

    monkeypatch.setattr(conversion._Progress, "tick", reading)
    monkeypatch.setattr(orbax_store, "_save_piece", writing)
    convert(FP32, tmp_path / "store", progress=False)
    reads, runs = 0, []
    for event in events:
        if event == "read":
            reads += 1
        else:
            runs.append((event[0], reads))
            reads = 0
    assert reads == 0 and len(runs) == 37 and sum(n for _, n in runs) == 53
    assert all(n == (2 if group == "blocks" else 1) for group, n in runs)  # two stacked blocks in the fixture


def test_failed_conversion_to_a_new_dst_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", _fail_on_call(30, np.save))
    with pytest.raises(OSError, match="simulated"):
        convert(FP32, tmp_path / "npy", to="npy", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_successful_conversion_replaces_an_existing_dst(tmp_path):
    dst = tmp_path / "npy"
    dst.mkdir()
    (dst / "stale.npy").write_bytes(b"stale")
    convert(FP32, dst, to="npy", progress=False)
    assert not (dst / "stale.npy").exists() and len(list(dst.glob("*.npy"))) == 53
    assert [p.name for p in tmp_path.iterdir()] == ["npy"]
