"""infer/generate.py end to end on the embedded tiny model, and every mistake a user can make with it."""

from __future__ import annotations

import io
import sys

import pytest

from tests.conftest import ScriptRunner, assert_one_error_line


@pytest.fixture(scope="module")
def cli():
    return ScriptRunner("infer/generate.py")


@pytest.fixture
def base(vocab_path):
    """The arguments every run here takes: the real vocabulary, no persistent compilation cache."""
    return ["--vocab", str(vocab_path), "--no-compilation-cache"]


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_prompt_prints_the_continuation_after_it(cli, base, capsys):
    assert cli(["--prompt", "四川的省会是?", "--max-new-tokens", "8", *base]) == 0
    out, err = capsys.readouterr()
    assert "TINY RANDOM" in err and "(1.38M parameters, float16)" in err
    assert "Input is: 四川的省会是?\nOutput is: 四川的省会是?" in out
    continuation = out.split("Output is: 四川的省会是?")[1].strip()
    assert continuation  # eight sampled tokens of gibberish


def test_demo_prompts_without_interactive(cli, base, capsys):
    assert cli(["--max-new-tokens", "2", "--temperature", "0", *base]) == 0
    out = capsys.readouterr().out
    assert out.count("Input is: ") == len(cli.module.DEMO_PROMPTS)
    assert "Input is: 飞云" not in out and cli.module.DEMO_PROMPTS[3].endswith("飞云：")


def test_interactive_answers_each_line_and_survives_bad_ones(cli, base, capsys, monkeypatch):
    too_long = ("好 " * 600).encode()
    _stdin(monkeypatch, "你好\n\n".encode() + b"\xc4\xe3\xba\xc3\n" + too_long + "\n再见\n".encode())
    assert cli(["--max-new-tokens", "2", "--temperature", "0", "--interactive", *base]) == 0
    out, err = capsys.readouterr()
    assert out.count("Input is: ") == 2 and "Input is: 你好" in out and "Input is: 再见" in out  # no demo prompts
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: line 3 is not UTF-8") and "set the terminal to UTF-8" in errors[0]
    assert errors[1].startswith("error: line 4: prompt 0 has") and "1024 positions" in errors[1]
    assert len(errors) == 2 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "好 " * 600], "the model has 1024 positions"),
    (["--prompt", "好 " * 600, "--stream"], "the model has 1024 positions"),
    (["--mesh", "tensor"], "expected axis=size pairs"),
    (["--mesh", "tensor=64"], "XLA_FLAGS=--xla_force_host_platform_device_count=64"),
    (["--checkpoint", "typo.ckpt"], "checkpoint typo.ckpt does not exist"),
    (["--temperature", "-1"], "temperature must be >= 0"),
], ids=["empty", "too-long", "too-long-streamed", "mesh-syntax", "mesh-size", "checkpoint", "temperature"])
def test_mistakes_end_in_one_error_line(cli, base, capsys, args, message):
    assert cli([*args, *base]) == 1
    out, err = capsys.readouterr()
    assert_one_error_line(err, message)
    assert "Input is" not in out


def test_vocabulary_mistakes_end_in_one_error_line(cli, tmp_path, capsys, monkeypatch):
    assert cli(["--vocab", str(tmp_path / "nope.model"), "--prompt", "你好"]) == 1
    assert_one_error_line(capsys.readouterr().err, "nope.model' does not exist")
    (tmp_path / "bad.model").write_text("not a model")
    assert cli(["--vocab", str(tmp_path / "bad.model"), "--prompt", "你好"]) == 1
    assert_one_error_line(capsys.readouterr().err, "is not a SentencePiece model", "--vocab")


def test_an_offline_first_run_says_to_pass_the_vocabulary(cli, tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.delenv("PANGU_JAX_VOCAB", raising=False)
    monkeypatch.setenv("PANGU_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert cli(["--prompt", "你好", "--no-compilation-cache"]) == 1
    assert_one_error_line(capsys.readouterr().err, "from pcl-pangu==1.2.6.2 (bdist_wheel) failed", "--vocab")


def test_an_unwritable_compilation_cache_warns_and_goes_on(cli, vocab_path, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    args = ["--vocab", str(vocab_path), "--prompt", "你好", "--max-new-tokens", "2",
            "--compilation-cache", str(tmp_path / "a-file" / "xla")]
    assert cli(args) == 0
    out, err = capsys.readouterr()
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "a-file/xla cannot be written" in warning and "going on without it" in warning
    assert "Output is: 你好" in out


def test_more_new_tokens_than_positions_says_so_once(cli, base, capsys):
    from pangu_jax import Tokenizer

    lengths = [len(Tokenizer(base[1]).encode(text)) for text in ("你好", "你好吗啊")]
    assert cli(["--prompt", "你好", "--prompt", "你好吗啊", "--max-new-tokens", "2000", "--temperature", "0",
                "--top-k", "0", *base]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert "max_new_tokens 2000 is capped by the model's 1024 positions" in warning
    assert f"prompt 0 to {1024 - lengths[0]}, prompt 1 to {1024 - lengths[1]} new tokens" in warning


def _continuation(out: str, prompt: str) -> str:
    return out.split(f"Output is: {prompt}")[1].split("\n")[0]


@pytest.mark.slow
def test_streaming_int8_and_a_one_device_mesh_print_what_the_plain_run_prints(cli, base, capsys):
    args = ["--prompt", "四川的省会是?", "--max-new-tokens", "12", "--temperature", "0", *base]
    assert cli(args) == 0
    plain = _continuation(capsys.readouterr().out, "四川的省会是?")
    assert cli([*args, "--stream", "--mesh", "tensor=1"]) == 0
    assert _continuation(capsys.readouterr().out, "四川的省会是?") == plain
    assert cli([*args, "--int8"]) == 0
    out, err = capsys.readouterr()
    assert "int8 weights" in err and _continuation(out, "四川的省会是?")


def test_help_is_quick_and_says_what_every_option_does(cli):
    done = cli.subprocess(["-X", "importtime", "--help"][2:], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "jax" not in imported and "pangu_jax.config" in imported
    for option in ("--top-p", "--seed", "--max-new-tokens", "--checkpoint"):
        text = done.stdout.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(text.split()) > 3, (option, text)
    assert "MindSpore .ckpt, HuggingFace" in done.stdout


@pytest.mark.slow
def test_a_script_error_in_a_fresh_process_is_one_line(cli, tmp_path):
    done = cli.subprocess(["--checkpoint", tmp_path / "typo.ckpt", "--no-compilation-cache"])
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "typo.ckpt does not exist")
    debug = cli.subprocess(["--checkpoint", tmp_path / "typo.ckpt", "--no-compilation-cache", "--debug"])
    assert debug.returncode == 1 and "Traceback" in debug.stderr
