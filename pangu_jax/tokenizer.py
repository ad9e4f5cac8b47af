"""The PanGu-alpha tokenizer, byte for byte the original ``JIEBATokenizer``.

Encoding segments the text with jieba (precise mode), replaces spaces and newlines
inside each segment with U+2582 and U+2583, joins the segments with single spaces
and SentencePiece-encodes the result. Decoding reverses that: SentencePiece
decode, delete every space, then U+2582 -> space and U+2583 -> newline. The
round trip is not always the identity (NFKC normalisation, dropped tabs and
spaces, ``<unk>``), exactly as in the original.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence

import jieba
import numpy as np
import numpy.typing as npt
import sentencepiece as spm

from pangu_jax.vocab import find_vocab

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "pretokenize", "segment"]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>")
"""Literal special tokens recognised in text by ``Tokenizer(special_tokens=True)``."""

_REQUIRED_PIECES = ("<unk>", "<sep>", "<pad>", "<eod>", "<eot>")
_ENCODE_TRANSLATION = str.maketrans({" ": "\u2582", "\n": "\u2583"})

_segmenter: jieba.Tokenizer | None = None
_segmenter_lock = threading.Lock()


def _jieba() -> jieba.Tokenizer:
    """A private, lazily initialised jieba instance with the default dictionary.

    Private, so that words a user adds to jieba's global instance cannot change
    PanGu's tokenization; initialised with jieba's logger raised to WARNING, so
    library users do not see its "Building prefix dict" banner.
    """
    global _segmenter
    with _segmenter_lock:
        if _segmenter is None:
            instance = jieba.Tokenizer()
            logger = logging.getLogger("jieba")
            previous_level = logger.level
            logger.setLevel(logging.WARNING)
            try:
                instance.initialize()
            finally:
                logger.setLevel(previous_level)
            _segmenter = instance
        return _segmenter


def segment(text: str) -> list[str]:
    """jieba precise-mode segments of ``text`` (``jieba.cut(text, cut_all=False)``)."""
    return list(_jieba().cut(text, cut_all=False))


def pretokenize(text: str) -> str:
    """The string the original tokenizer hands to SentencePiece for ``text``."""
    return " ".join(piece.translate(_ENCODE_TRANSLATION) for piece in segment(text))


class Tokenizer:
    """PanGu-alpha tokenizer (jieba + SentencePiece BPE, 40000 pieces).

    Args:
        vocab_path: ``vocab.model`` to load; ``None`` resolves it with
            :func:`pangu_jax.vocab.find_vocab` (env var, cache, download).
        special_tokens: if true, the literals in :data:`SPECIAL_TOKENS` found in the
            text become their single ids and the text between them is encoded as
            if alone. Off by default, as in the original, which splits e.g.
            ``<eod>`` into ordinary pieces.
    """

    def __init__(self, vocab_path: str | os.PathLike[str] | None = None, *, special_tokens: bool = False) -> None:
        self.vocab_path = find_vocab(vocab_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.vocab_path))
        except RuntimeError as e:  # sentencepiece's only error type for a file it cannot read
            raise ValueError(f"vocabulary {str(self.vocab_path)!r} is not a SentencePiece model ({e}); "
                             "point --vocab (or PANGU_JAX_VOCAB) at PanGu's vocab.model") from None
        needed = SPECIAL_TOKENS if special_tokens else _REQUIRED_PIECES
        self._special_ids = self._lookup_pieces(needed)
        self._special_pattern = (
            re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")") if special_tokens else None
        )

    def _lookup_pieces(self, pieces: Sequence[str]) -> dict[str, int]:
        """Ids of ``pieces``; ``piece_to_id`` silently maps unknown pieces to <unk>, so check."""
        ids = {piece: self._sp.piece_to_id(piece) for piece in pieces}
        missing = [piece for piece, i in ids.items() if self._sp.id_to_piece(i) != piece]
        if missing:
            raise ValueError(f"vocabulary {str(self.vocab_path)!r} lacks the special pieces {missing}")
        return ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._special_ids["<unk>"]

    @property
    def sep_id(self) -> int:
        return self._special_ids["<sep>"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["<pad>"]

    @property
    def eod_id(self) -> int:
        return self._special_ids["<eod>"]

    @property
    def eot_id(self) -> int:
        return self._special_ids["<eot>"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        if self._special_pattern is None:
            return self._encode_plain(text)
        ids: list[int] = []
        # re.split with one capturing group alternates text, token, text, ...
        for index, part in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self._special_ids[part])
            else:
                ids.extend(self._encode_plain(part))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(pretokenize(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode_batch expects a sequence of str, got a single str")
        return [self.encode(text) for text in texts]

    def decode(self, ids: npt.ArrayLike) -> str:
        """Text of a 1-D sequence of ids (list, tuple, NumPy or JAX integer array)."""
        text = self._sp.decode(self._checked_ids(ids))
        return text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")

    def decode_batch(self, batch: Iterable[npt.ArrayLike]) -> list[str]:
        """Text of each id sequence (a sequence of sequences, or the rows of a 2-D array)."""
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, token_id: int) -> str:
        """SentencePiece piece of one id (e.g. ``'▁四川'``)."""
        (checked,) = self._checked_ids([token_id])
        return self._sp.id_to_piece(checked)

    def _checked_ids(self, ids: npt.ArrayLike) -> list[int]:
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {array.shape}")
        if array.size == 0:
            return []
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {array.dtype}")
        out_of_range = array[(array < 0) | (array >= self.vocab_size)]
        if out_of_range.size:
            raise ValueError(f"token id {int(out_of_range[0])} is outside [0, {self.vocab_size})")
        return array.tolist()
