"""infer/generate.py end to end on the embedded tiny model."""

from __future__ import annotations

import io
import sys

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def cli():
    """The script, with the persistent compilation cache left off (it would outlive the test in jax's config;
    tests/test_compilation_cache.py covers it in a subprocess)."""
    module = load_script("infer/generate.py")
    module.enable_compilation_cache = lambda path: None
    return module


def test_prompt_prints_the_continuation_after_it(cli, vocab_path, capsys):
    assert cli.main(["--prompt", "四川的省会是?", "--max-new-tokens", "8", "--vocab", str(vocab_path)]) == 0
    out, err = capsys.readouterr()
    assert "TINY RANDOM" in err
    assert "Input is: 四川的省会是?\nOutput is: 四川的省会是?" in out
    continuation = out.split("Output is: 四川的省会是?")[1].strip()
    assert continuation  # eight sampled tokens of gibberish


def test_demo_prompts_then_interactive(cli, vocab_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n\n再见\n"))
    args = ["--max-new-tokens", "2", "--temperature", "0", "--interactive", "--vocab", str(vocab_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("Input is: ") == len(cli.DEMO_PROMPTS) + 2
    assert "Input is: 飞云" not in out and cli.DEMO_PROMPTS[3].endswith("飞云：")
    assert cli.DEMO_PROMPTS[5].endswith("当前，") and "Input is: 再见" in out


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt 0 is empty"),
    ("好 " * 600, "the model has 1024 positions"),
], ids=["empty", "too-long"])
def test_bad_prompts_exit_2_with_the_reason(cli, vocab_path, capsys, prompt, message):
    assert cli.main(["--prompt", prompt, "--vocab", str(vocab_path)]) == 2
    assert message in capsys.readouterr().err


def _continuation(out: str, prompt: str) -> str:
    return out.split(f"Output is: {prompt}")[1].split("\n")[0]


def test_streaming_int8_and_a_one_device_mesh_print_what_the_plain_run_prints(cli, vocab_path, capsys):
    base = ["--prompt", "四川的省会是?", "--max-new-tokens", "12", "--temperature", "0", "--vocab", str(vocab_path)]
    assert cli.main(base) == 0
    plain = _continuation(capsys.readouterr().out, "四川的省会是?")
    assert cli.main([*base, "--stream", "--mesh", "tensor=1"]) == 0
    assert _continuation(capsys.readouterr().out, "四川的省会是?") == plain
    assert cli.main([*base, "--int8"]) == 0
    out, err = capsys.readouterr()
    assert "int8 weights" in err and _continuation(out, "四川的省会是?")


@pytest.mark.parametrize("mesh, message", [
    ("tensor", "expected axis=size pairs"),
    ("tensor=64", "needs 64 devices"),
])
def test_bad_mesh_exits_2_with_the_reason(cli, vocab_path, capsys, mesh, message):
    assert cli.main(["--mesh", mesh, "--vocab", str(vocab_path)]) == 2
    assert message in capsys.readouterr().err
