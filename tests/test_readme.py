"""The README's Python examples run as written, on the embedded tiny model in place of the released files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pangu_jax.assets import EMBEDDED_CHECKPOINT

README = Path(__file__).parents[1] / "README.md"
RELEASED_FILES = ("PanguAlpha_2.6B_fp16.ckpt", "PanguAlpha_13B_fp16.ckpt")


@pytest.mark.slow
def test_the_python_examples_run(vocab_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        for name in RELEASED_FILES:
            block = block.replace(f'"{name}"', repr(str(EMBEDDED_CHECKPOINT)))
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert len(namespace["new"]) == 3 and all(len(row) <= 50 for row in namespace["new"])
    assert namespace["logits"].shape == (1, 5, 40000)
    assert capsys.readouterr().out.strip()
