"""Locate (and on first use download) the PanGu-alpha SentencePiece vocabulary.

The vocabulary is not shipped with this package. The model's authors publish it
inside the wheel of the PyPI package ``pcl-pangu``; that package pins
``numpy<2``, so it is never installed: its wheel is downloaded without
dependencies and ``vocab.model`` is read out of the zip in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import platformdirs

__all__ = ["VOCAB_SHA256", "VocabNotFoundError", "cache_dir", "find_vocab"]

VOCAB_SHA256 = "18857e86783e50cfcaa0bc3c043fb4e9b5f240b885d2870ea593ee69b44f7a3a"
"""sha256 of the original PanGu-alpha ``vocab.model`` (40000 BPE pieces)."""

VOCAB_ENV = "PANGU_JAX_VOCAB"
CACHE_ENV = "PANGU_JAX_CACHE"
VOCAB_FILENAME = "vocab.model"

PYPI_PROJECT = "pcl-pangu"
PYPI_VERSION = "1.2.6.2"
WHEEL_MEMBER = "pcl_pangu/tokenizer/bpe_4w_pcl/vocab.model"
_VERSION_JSON_URL = f"https://pypi.org/pypi/{PYPI_PROJECT}/{PYPI_VERSION}/json"
_PROJECT_JSON_URL = f"https://pypi.org/pypi/{PYPI_PROJECT}/json"
_TIMEOUT_S = 60.0


class VocabNotFoundError(FileNotFoundError):
    """No usable vocabulary file could be found or downloaded."""


def cache_dir() -> Path:
    """Directory holding the downloaded vocabulary (``$PANGU_JAX_CACHE`` overrides)."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("pangu-jax"))


def find_vocab(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Return the path of the PanGu ``vocab.model``.

    Resolution order:

    1. ``path`` if given (it must exist);
    2. the ``PANGU_JAX_VOCAB`` environment variable (a file path; it must exist);
    3. ``vocab.model`` in :func:`cache_dir`;
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
        raise VocabNotFoundError(_not_found_message(cached, "downloading is disabled (download=False)"))

    try:
        data = _download_vocab()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise VocabNotFoundError(
            _not_found_message(cached, f"downloading it from PyPI failed: {type(exc).__name__}: {exc}")
        ) from exc
    _write_atomically(cached, data)
    return cached


def _not_found_message(cached: Path, failure: str) -> str:
    return (
        f"PanGu vocabulary (vocab.model) not found: {VOCAB_ENV} is not set, {str(cached)!r} "
        f"does not exist, and {failure}.\n"
        f"Fix: pass --vocab /path/to/vocab.model to the scripts (Tokenizer(vocab_path) in Python), "
        f"set {VOCAB_ENV}=/path/to/vocab.model, or copy vocab.model into "
        f"{str(cached.parent)!r} (the file is in the {PYPI_PROJECT}=={PYPI_VERSION} wheel at "
        f"{WHEEL_MEMBER}; sha256 {VOCAB_SHA256})."
    )


def _download_vocab() -> bytes:
    """Fetch the ``pcl-pangu`` wheel and return its verified ``vocab.model`` bytes."""
    wheel = _fetch(_wheel_url())
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        data = archive.read(WHEEL_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"{WHEEL_MEMBER} has sha256 {digest}, expected {VOCAB_SHA256}")
    return data


def _wheel_url() -> str:
    """URL of the ``pcl-pangu`` wheel of :data:`PYPI_VERSION`, from the PyPI JSON API."""
    try:
        files = json.loads(_fetch(_VERSION_JSON_URL))["urls"]
    except urllib.error.HTTPError:
        # Some PyPI mirrors and proxies serve only the project-level endpoint,
        # whose "releases" lists the files of every version.
        files = json.loads(_fetch(_PROJECT_JSON_URL))["releases"][PYPI_VERSION]
    for file in files:
        if file["packagetype"] == "bdist_wheel":
            return file["url"]
    raise ValueError(f"PyPI lists no wheel for {PYPI_PROJECT}=={PYPI_VERSION}")


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        return response.read()


def _write_atomically(dest: Path, data: bytes) -> None:
    """Write via a temporary sibling and a rename, so readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
