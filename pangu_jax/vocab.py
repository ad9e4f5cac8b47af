"""Locate (and on first use download) the PanGu-alpha SentencePiece vocabulary.

The vocabulary is not shipped with this package. The model's authors publish it
inside the wheel of the PyPI package ``pcl-pangu``; that package pins
``numpy<2``, so it is never installed: :mod:`pangu_jax.downloads` takes
``vocab.model`` out of its wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from pangu_jax.downloads import DownloadError, Member, download_members
from pangu_jax.paths import cache_dir

__all__ = ["VOCAB_SHA256", "VocabNotFoundError", "find_vocab"]

VOCAB_SHA256 = "18857e86783e50cfcaa0bc3c043fb4e9b5f240b885d2870ea593ee69b44f7a3a"
"""sha256 of the original PanGu-alpha ``vocab.model`` (40000 BPE pieces)."""

VOCAB_ENV = "PANGU_JAX_VOCAB"
VOCAB_FILENAME = "vocab.model"

PYPI_PROJECT = "pcl-pangu"
PYPI_VERSION = "1.2.6.2"
WHEEL_MEMBER = "pcl_pangu/tokenizer/bpe_4w_pcl/vocab.model"


class VocabNotFoundError(FileNotFoundError):
    """No usable vocabulary file could be found or downloaded."""


def find_vocab(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Return the path of the PanGu ``vocab.model``.

    Resolution order:

    1. ``path`` if given (it must exist);
    2. the ``PANGU_JAX_VOCAB`` environment variable (a file path; it must exist);
    3. ``vocab.model`` in :func:`pangu_jax.paths.cache_dir`;
    4. if ``download``: fetch it once from PyPI (``pcl-pangu`` wheel), verify its
       sha256 against :data:`VOCAB_SHA256`, store it atomically in the cache.

    Only the downloaded file is checked against :data:`VOCAB_SHA256`: a file given
    explicitly, through the environment or placed in the cache is used as is, so
    custom vocabularies work.

    Raises:
        VocabNotFoundError: the given file is missing, or nothing was found and the
            download was disabled or failed (offline, HTTP error, bad checksum).
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise VocabNotFoundError(f"vocabulary file {str(explicit)!r} does not exist")
        return explicit

    from_env = os.environ.get(VOCAB_ENV)
    if from_env:
        env_path = Path(from_env).expanduser()
        if not env_path.is_file():
            raise VocabNotFoundError(
                f"{VOCAB_ENV}={from_env!r} does not name an existing file; "
                f"point it at vocab.model or unset it"
            )
        return env_path

    cached = cache_dir() / VOCAB_FILENAME
    if cached.is_file():
        return cached
    if not download:
        raise VocabNotFoundError(
            _not_found_message(cached, f"downloading is disabled (download=False).\n{_fix(cached)}")
        )

    try:
        download_members(
            PYPI_PROJECT,
            PYPI_VERSION,
            "bdist_wheel",
            [Member(WHEEL_MEMBER, VOCAB_SHA256, cached)],
            offline_hint=_fix(cached),
        )
    except DownloadError as exc:
        raise VocabNotFoundError(_not_found_message(cached, str(exc))) from exc
    return cached


def _not_found_message(cached: Path, failure: str) -> str:
    return (
        f"PanGu vocabulary (vocab.model) not found: {VOCAB_ENV} is not set, {str(cached)!r} "
        f"does not exist, and {failure}"
    )


def _fix(cached: Path) -> str:
    return (
        f"Fix: pass --vocab /path/to/vocab.model to the scripts (Tokenizer(vocab_path) in Python), "
        f"set {VOCAB_ENV}=/path/to/vocab.model, or copy vocab.model into "
        f"{str(cached.parent)!r} (the file is in the {PYPI_PROJECT}=={PYPI_VERSION} wheel at "
        f"{WHEEL_MEMBER}; sha256 {VOCAB_SHA256})."
    )
