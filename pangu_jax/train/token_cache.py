"""Token ids of training files, computed once and kept on disk, memory-mapped.

One cache entry per input file, keyed by the sha256 of the file's contents,
its format, the vocabulary's sha256 and :data:`FORMAT_VERSION`, so that a
changed file, vocabulary or pipeline never reads stale ids. An entry holds the
ids of all documents as one flat ``uint16`` array (``ids.bin``, streamed to
disk while tokenizing), each document's start in it (``offsets.npy``, int64,
one more than documents), the index in each document of its first token
trained on (``loss_starts.npy``: 0, or the first response token of a prompt
and response) and ``meta.json``; it is built in a temporary directory and
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pangu_jax.atomic import atomic_directory
from pangu_jax.tokenizer import Tokenizer
from pangu_jax.train.documents import BadLine, Document, detect_format, read_documents

__all__ = ["FORMAT_VERSION", "FileSummary", "TokenizedDocuments", "TokenizedFile", "tokenize_file"]

FORMAT_VERSION = 1
"""Part of every cache key: raise it when the ids written for a document change."""

_IDS_DTYPE = np.dtype("<u2")
_CHUNK_DOCUMENTS = 64

Encoded = list[tuple[np.ndarray, int]]
"""Each document's ids and the index of its first token trained on."""


@dataclass(frozen=True)
class FileSummary:
    """What one input file gave."""

    path: str
    format: str
    documents: int
    tokens: int
    bad_lines: tuple[BadLine, ...]
    from_cache: bool
    cache: str


@dataclass(frozen=True)
class TokenizedFile:
    """The ids of one input file (memory-mapped) and its summary."""

    summary: FileSummary
    ids: np.ndarray
    offsets: np.ndarray
    loss_starts: np.ndarray


class TokenizedDocuments:
    """The documents of several tokenized files, numbered across them in order.

    Attributes:
        lengths: each document's number of ids.
        loss_starts: the index in each document of its first token trained on.
    """

    def __init__(self, files: Sequence[TokenizedFile]) -> None:
        self._files = tuple(files)
        self._first = np.cumsum([0] + [f.summary.documents for f in self._files])
        self.lengths = np.concatenate([np.diff(f.offsets) for f in self._files] + [np.zeros(0, np.int64)])
        self.loss_starts = np.concatenate([f.loss_starts for f in self._files] + [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return int(self._first[-1])

    def tokens(self, document: int) -> np.ndarray:
        """The ids of one document, ending in ``<eot>``."""
        index = int(np.searchsorted(self._first, document, side="right")) - 1
        file = self._files[index]
        local = document - int(self._first[index])
        return file.ids[file.offsets[local] : file.offsets[local + 1]]


def tokenize_file(
    path: str | os.PathLike[str],
    format: str,
    tokenizer: Tokenizer,
    cache_root: str | os.PathLike[str],
    *,
    workers: int = 1,
) -> TokenizedFile:
    """The ids of ``path``, read from the cache or tokenized (in ``workers`` processes) and cached.

    Each document is tokenized as ``text <eot>``, or ``prompt <sep> response <eot>``.

    Raises:
        FileNotFoundError, ValueError: as :func:`~pangu_jax.train.documents.read_documents`,
            or the vocabulary has more ids than ``uint16`` holds.
    """
    path = Path(path)
    format = detect_format(path, format)
    if tokenizer.vocab_size > np.iinfo(_IDS_DTYPE).max + 1:
        raise ValueError(f"vocabulary {tokenizer.vocab_path} has {tokenizer.vocab_size} ids; the cache stores uint16")
    entry = Path(cache_root) / _cache_key(path, format, tokenizer.vocab_path)
    if (entry / "meta.json").is_file():
        return _read_entry(entry, path, from_cache=True)
    documents, bad_lines = read_documents(path, format)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(entry) as tmp:
        _write_entry(tmp, path, format, documents, bad_lines, tokenizer, workers)
    return _read_entry(entry, path, from_cache=False)


def _cache_key(path: Path, format: str, vocab_path: Path) -> str:
    key = hashlib.sha256(f"pangu-jax tokens v{FORMAT_VERSION}\n{format}\n".encode())
    for file in (path, vocab_path):
        key.update(_file_sha256(file).encode())
    return key.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_entry(
    entry: Path,
    path: Path,
    format: str,
    documents: list[Document],
    bad_lines: list[BadLine],
    tokenizer: Tokenizer,
    workers: int,
) -> None:
    offsets = np.zeros(len(documents) + 1, np.int64)
    loss_starts = np.zeros(len(documents), np.int64)
    index = 0
    with (entry / "ids.bin").open("wb") as ids, tqdm(
        total=len(documents), unit="doc", desc=f"tokenizing {path.name}"
    ) as progress:
        for encoded in _encode_all(documents, tokenizer, workers):
            for document_ids, loss_start in encoded:
                document_ids.astype(_IDS_DTYPE).tofile(ids)
                offsets[index + 1] = offsets[index] + len(document_ids)
                loss_starts[index] = loss_start
                index += 1
            progress.update(len(encoded))
    np.save(entry / "offsets.npy", offsets)
    np.save(entry / "loss_starts.npy", loss_starts)
    meta = {
        "format_version": FORMAT_VERSION,
        "format": format,
        "source": str(path),
        "documents": len(documents),
        "tokens": int(offsets[-1]),
        "bad_lines": [[bad.line, bad.reason] for bad in bad_lines],
    }
    (entry / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def _read_entry(entry: Path, path: Path, *, from_cache: bool) -> TokenizedFile:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    tokens = meta["tokens"]
    ids = np.memmap(entry / "ids.bin", _IDS_DTYPE, mode="r", shape=(tokens,)) if tokens else np.zeros(0, _IDS_DTYPE)
    summary = FileSummary(
        path=str(path),
        format=meta["format"],
        documents=meta["documents"],
        tokens=tokens,
        bad_lines=tuple(BadLine(str(path), line, reason) for line, reason in meta["bad_lines"]),
        from_cache=from_cache,
        cache=str(entry),
    )
    return TokenizedFile(
        summary,
        ids,
        np.load(entry / "offsets.npy", mmap_mode="r"),
        np.load(entry / "loss_starts.npy", mmap_mode="r"),
    )


def _encode_all(documents: list[Document], tokenizer: Tokenizer, workers: int) -> Iterator[Encoded]:
    """Encoded chunks of documents, in order; in a pool of ``workers`` processes where there is work for them.

    The workers are spawned, not forked: the caller may be a process running JAX,
    whose threads a fork would copy in an unknown state.
    """
    chunks = [documents[i : i + _CHUNK_DOCUMENTS] for i in range(0, len(documents), _CHUNK_DOCUMENTS)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        yield from (_encode_chunk(chunk, tokenizer) for chunk in chunks)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(str(tokenizer.vocab_path),)) as pool:
        yield from pool.imap(_encode_in_worker, chunks)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(vocab_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(vocab_path)


def _encode_in_worker(chunk: list[Document]) -> Encoded:
    assert _worker_tokenizer is not None, "worker started without its tokenizer"
    return _encode_chunk(chunk, _worker_tokenizer)


def _encode_chunk(chunk: list[Document], tokenizer: Tokenizer) -> Encoded:
    encoded = []
    for document in chunk:
        text_ids = tokenizer.encode(document.text)
        if document.prompt is None:
            encoded.append((np.array([*text_ids, tokenizer.eot_id]), 0))
        else:
            prompt_ids = tokenizer.encode(document.prompt)
            ids = np.array([*prompt_ids, tokenizer.sep_id, *text_ids, tokenizer.eot_id])
            encoded.append((ids, len(prompt_ids) + 1))
    return encoded
