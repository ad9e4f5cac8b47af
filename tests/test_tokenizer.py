"""Tokenizer and vocabulary-resolution tests.

The fixture cases come from the ORIGINAL PanGu ``JIEBATokenizer``. Tests needing
the real vocabulary get it through ``find_vocab()`` and are skipped, with the
reason shown, where it cannot be found or downloaded (set ``PANGU_JAX_VOCAB``).
No test touches the network: downloads are served by a fake URL opener.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_jax import paths, vocab
from pangu_jax.downloads import project_json_url, version_json_url
from pangu_jax.tokenizer import Tokenizer, pretokenize, segment
from pangu_jax.vocab import VocabNotFoundError, find_vocab

CASES = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_cases.json").read_text("ascii"))["cases"]
CASE_IDS = [f"case{index:02d}" for index in range(len(CASES))]


@pytest.fixture(scope="session")
def vocab_path() -> Path:
    try:
        return find_vocab()
    except VocabNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tok(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


@pytest.fixture(scope="session")
def special_tok(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path, special_tokens=True)


# --- the original tokenizer, case by case -------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jieba_segments(case: dict) -> None:
    assert segment(case["text"]) == case["jieba"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sentencepiece_input(case: dict) -> None:
    assert pretokenize(case["text"]) == case["sp_input"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_matches_original(tok: Tokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_original(tok: Tokenizer, case: dict) -> None:
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pieces(tok: Tokenizer, case: dict) -> None:
    assert [tok.id_to_piece(i) for i in case["ids"]] == case["pieces"]


def test_vocab_size_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 40000
    assert (tok.unk_id, tok.sep_id, tok.pad_id, tok.eod_id, tok.eot_id) == (0, 5, 6, 8, 9)


def test_jieba_initialisation_is_silent() -> None:
    """In a fresh process, where jieba builds its dictionary on the first segmentation."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from pangu_jax.tokenizer import segment; segment('四川的省会是?')"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


# --- special tokens (opt-in) ---------------------------------------------------


def test_special_tokens_off_by_default(tok: Tokenizer) -> None:
    case = next(case for case in CASES if case["text"] == "<eod><eot><pad>")
    assert tok.encode(case["text"]) == case["ids"]
    assert not {5, 6, 8, 9} & set(case["ids"])


def test_special_tokens_map_to_single_ids(tok: Tokenizer, special_tok: Tokenizer) -> None:
    question, answer = tok.encode("问："), tok.encode("答：")
    assert special_tok.encode("问：<sep>答：<eot>") == [*question, 5, *answer, 9]


@pytest.mark.parametrize(
    ("literal", "token_id"),
    [("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<sep>", 5), ("<pad>", 6), ("<mask>", 7), ("<eod>", 8), ("<eot>", 9)],
)
def test_every_special_literal(special_tok: Tokenizer, literal: str, token_id: int) -> None:
    assert special_tok.encode(f"你好{literal}{literal}") == [*special_tok.encode("你好"), token_id, token_id]


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=30))
def test_special_mode_equals_default_without_literals(tok: Tokenizer, special_tok: Tokenizer, text: str) -> None:
    assert special_tok.encode(text) == tok.encode(text)


# --- batches, input types, errors ------------------------------------------------


def test_encode_batch_equals_per_item(tok: Tokenizer) -> None:
    texts = [case["text"] for case in CASES]
    assert tok.encode_batch(texts) == [tok.encode(text) for text in texts]


def test_decode_batch_equals_per_item(tok: Tokenizer) -> None:
    batch = [case["ids"] for case in CASES]
    assert tok.decode_batch(batch) == [case["decoded"] for case in CASES]


def test_decode_accepts_arrays(tok: Tokenizer) -> None:
    case = CASES[1]
    ids = np.asarray(case["ids"], dtype=np.int32)
    assert tok.decode(ids) == case["decoded"]
    assert tok.decode_batch(np.stack([ids, ids])) == [case["decoded"]] * 2
    jnp = pytest.importorskip("jax.numpy")
    assert tok.decode(jnp.asarray(ids)) == case["decoded"]


def test_decode_empty(tok: Tokenizer) -> None:
    assert tok.decode([]) == ""
    assert tok.decode(np.zeros((0,), dtype=np.int64)) == ""


@pytest.mark.parametrize("bad_id", [-1, 40000, 123456])
def test_decode_rejects_out_of_range_id(tok: Tokenizer, bad_id: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside \[0, 40000\)"):
        tok.decode([11, bad_id, 11])
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.id_to_piece(bad_id)


def test_decode_rejects_bad_shapes_and_dtypes(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[11, 12], [13, 14]])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.0, 2.0])


@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["list"]])
def test_encode_rejects_non_str(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(bad)  # type: ignore[arg-type]


def test_encode_batch_rejects_single_str(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("四川")


# --- custom vocabularies ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-piece SentencePiece model without PanGu's special pieces."""
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "low lower lowest", "new newer newest"] * 20),
        model_prefix=str(prefix),
        vocab_size=20,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def test_custom_vocab_with_other_hash_is_accepted(tiny_model: Path) -> None:
    assert hashlib.sha256(tiny_model.read_bytes()).hexdigest() != vocab.VOCAB_SHA256
    assert find_vocab(tiny_model) == tiny_model


def test_custom_vocab_without_special_pieces_fails_clearly(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="lacks the special pieces.*<sep>"):
        Tokenizer(tiny_model)


# --- find_vocab: resolution order ------------------------------------------------


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache dir, PANGU_JAX_VOCAB unset and the network cut off."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(paths.CACHE_ENV, str(cache_dir))
    monkeypatch.delenv(vocab.VOCAB_ENV, raising=False)

    def offline(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return cache_dir


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"vocab")
    return path


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    explicit = _touch(tmp_path / "explicit.model")
    from_env = _touch(tmp_path / "env.model")
    cached = _touch(cache / "vocab.model")
    monkeypatch.setenv(vocab.VOCAB_ENV, str(from_env))
    assert find_vocab(explicit) == explicit
    assert find_vocab(str(explicit)) == explicit
    assert find_vocab() == from_env
    monkeypatch.delenv(vocab.VOCAB_ENV)
    assert find_vocab(download=False) == cached


def test_missing_explicit_path_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    monkeypatch.setenv(vocab.VOCAB_ENV, str(_touch(tmp_path / "env.model")))
    missing = tmp_path / "nope.model"
    with pytest.raises(VocabNotFoundError, match="nope.model"):
        find_vocab(missing)


def test_missing_env_file_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    _touch(cache / "vocab.model")
    monkeypatch.setenv(vocab.VOCAB_ENV, str(tmp_path / "nope.model"))
    with pytest.raises(VocabNotFoundError, match=f"{vocab.VOCAB_ENV}=.*nope.model"):
        find_vocab()


def test_no_download_and_empty_cache(cache: Path) -> None:
    with pytest.raises(VocabNotFoundError, match="download=False") as excinfo:
        find_vocab(download=False)
    assert isinstance(excinfo.value, FileNotFoundError)


def test_offline_error_explains_the_fix(cache: Path) -> None:
    with pytest.raises(VocabNotFoundError) as excinfo:
        find_vocab()
    message = str(excinfo.value)
    assert "URLError" in message and "network disabled in tests" in message
    assert vocab.VOCAB_ENV in message and str(cache) in message
    assert not cache.exists() or not any(cache.iterdir())


# --- find_vocab: download (served by a fake opener) -------------------------------

FAKE_VOCAB = b"not really a sentencepiece model"
WHEEL_URL = "https://files.example/pcl_pangu-1.2.6.2-py3-none-any.whl"


def _wheel_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(vocab.WHEEL_MEMBER, FAKE_VOCAB)
        wheel.writestr("pcl_pangu/__init__.py", "")
    return buffer.getvalue()


def _release_files() -> list[dict]:
    return [
        {"packagetype": "sdist", "url": "https://files.example/pcl_pangu-1.2.6.2.tar.gz"},
        {"packagetype": "bdist_wheel", "url": WHEEL_URL},
    ]


class FakePyPI:
    """Serves the PyPI JSON API and the wheel; records the URLs asked for."""

    def __init__(self, *, version_endpoint: bool = True):
        self.version_endpoint = version_endpoint
        self.requests: list[str] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.requests.append(url)
        if url == WHEEL_URL:
            return io.BytesIO(_wheel_bytes())
        if url == version_json_url(vocab.PYPI_PROJECT, vocab.PYPI_VERSION) and self.version_endpoint:
            return io.BytesIO(json.dumps({"urls": _release_files()}).encode())
        if url == project_json_url(vocab.PYPI_PROJECT):
            return io.BytesIO(json.dumps({"releases": {vocab.PYPI_VERSION: _release_files()}}).encode())
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]


def test_download_rejects_wrong_sha256(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", FakePyPI())
    with pytest.raises(VocabNotFoundError, match="sha256"):
        find_vocab()
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("version_endpoint", [True, False], ids=["version-json", "project-json-fallback"])
def test_download_writes_cache_atomically(monkeypatch: pytest.MonkeyPatch, cache: Path, version_endpoint: bool) -> None:
    pypi = FakePyPI(version_endpoint=version_endpoint)
    monkeypatch.setattr(urllib.request, "urlopen", pypi)
    monkeypatch.setattr(vocab, "VOCAB_SHA256", hashlib.sha256(FAKE_VOCAB).hexdigest())

    path = find_vocab()

    assert path == cache / "vocab.model"
    assert path.read_bytes() == FAKE_VOCAB
    assert list(cache.iterdir()) == [path]  # no temporary file left behind
    assert pypi.requests[-1] == WHEEL_URL
    requests_made = len(pypi.requests)
    assert find_vocab() == path
    assert len(pypi.requests) == requests_made  # fetched once, then served from the cache
