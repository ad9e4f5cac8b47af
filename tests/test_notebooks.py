"""The research notebooks run top to bottom on the embedded tiny model, and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pangu_jax import Tokenizer
from pangu_jax.plotting import token_labels, token_table, use_chinese_font

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# Each notebook's figures (matplotlib) and a line it must print.
EXPECTED = {
    "01_quickstart": (2, "top-k 5 (the original demo):"),
    "02_inside_pangu": (5, "mean cosine of a position's two embeddings"),
    "03_finetune": (1, "held-out perplexity:"),
    "04_sharding": (0, "greedy generations identical: True"),
}


def test_the_notebooks_are_the_four_and_carry_no_outputs():
    import nbformat

    assert [path.stem for path in NOTEBOOKS] == sorted(EXPECTED)
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit it without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_the_notebook_runs(path, vocab_path, monkeypatch, request):
    import nbformat
    from nbclient import NotebookClient

    if path.stem == "03_finetune":
        request.getfixturevalue("peoples_daily")
    monkeypatch.setenv("PANGU_JAX_VOCAB", str(vocab_path))
    monkeypatch.delenv("PANGU_JAX_CHECKPOINT", raising=False)
    monkeypatch.setenv("PANGU_JAX_NOTEBOOK_STEPS", "60")  # 03_finetune: the loss has fallen well by then
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on a cell's error
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    figures = sum("image/png" in output.get("data", {}) for output in outputs)
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    want_figures, want_text = EXPECTED[path.stem]
    assert figures == want_figures
    assert want_text in text


def test_tokens_are_labelled_by_piece_or_by_position(vocab_path):
    tok = Tokenizer(vocab_path)
    ids = tok.encode("四川的省会是成都")
    assert token_labels(tok, ids, chinese=True) == [tok.id_to_piece(i) for i in ids]
    assert token_labels(tok, ids, chinese=False) == [str(i) for i in range(len(ids))]
    table = token_table(tok, ids).splitlines()
    assert len(table) == len(ids) and table[0].split() == ["0", str(ids[0]), tok.id_to_piece(ids[0])]


def test_a_chinese_font_is_one_that_draws_chinese():
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    before = list(rcParams["font.sans-serif"])
    name = use_chinese_font()
    if name is None:  # none installed (matplotlib's own fonts have no Chinese): nothing changed
        assert rcParams["font.sans-serif"] == before
        return
    path = font_manager.findfont(font_manager.FontProperties(family=name))
    assert ord("中") in FT2Font(path).get_charmap() and rcParams["font.sans-serif"][0] == name
