"""Training documents read from plain-text and JSONL files.

Plain text, as pcl-pangu's fine-tuning reads it: documents separated by blank
lines, the lines of a document kept with their newlines. JSONL: one record a
line, ``{"text": ...}`` for continued pre-training or ``{"prompt": ...,
"response": ...}`` for supervised fine-tuning. A JSONL line that is no such
record is reported as a :class:`BadLine`, never silently skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FORMATS", "BadLine", "Document", "detect_format", "read_documents"]

FORMATS = ("auto", "text", "jsonl")
"""Accepted input formats; ``auto`` picks ``text`` or ``jsonl`` per file (:func:`detect_format`)."""

_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Document:
    """One training document.

    Attributes:
        text: what is trained on (the whole document, or the response).
        prompt: for supervised fine-tuning, the text before it, not trained on.
    """

    text: str
    prompt: str | None = None


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that holds no usable record."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def detect_format(path: str | os.PathLike[str], requested: str = "auto") -> str:
    """``text`` or ``jsonl`` for ``path``: ``requested`` unless it is ``auto``.

    ``auto`` goes by the suffix (``.txt``/``.text``, ``.jsonl``/``.ndjson``);
    with another suffix a file whose first non-blank line is a JSON object is
    JSONL, and anything else is an error (plain text could be anything).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``requested`` is not one of :data:`FORMATS`, or the format cannot be told.
    """
    path = Path(path)
    if requested not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {requested!r}")
    if not path.is_file():
        raise FileNotFoundError(f"training data file {str(path)!r} does not exist or is not a file")
    if requested != "auto":
        return requested
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return "text"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    with path.open("rb") as file:
        first = next((line for line in file if line.strip()), b"")
    try:
        if isinstance(json.loads(first), dict):
            return "jsonl"
    except ValueError:
        pass
    raise ValueError(
        f"cannot tell the format of training data file {str(path)!r}: name it .txt (documents separated "
        f"by blank lines) or .jsonl (one JSON record a line), or set the format to 'text' or 'jsonl'"
    )


def read_documents(path: str | os.PathLike[str], format: str) -> tuple[list[Document], list[BadLine]]:
    """The documents of one file (``format`` ``text`` or ``jsonl``) and its bad lines.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``format`` is not ``text`` or ``jsonl``, or a plain-text file is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file {str(path)!r} does not exist or is not a file")
    if format == "text":
        return _read_text(path), []
    if format == "jsonl":
        return _read_jsonl(path)
    raise ValueError(f"format must be 'text' or 'jsonl', got {format!r}")


def _read_text(path: Path) -> list[Document]:
    documents: list[Document] = []
    lines: list[str] = []
    try:
        with path.open(encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    lines.append(line)
                elif lines:
                    documents.append(Document("".join(lines).rstrip("\n")))
                    lines = []
    except UnicodeDecodeError as exc:
        raise ValueError(f"training data file {str(path)!r} is not UTF-8 text: {exc}") from exc
    if lines:
        documents.append(Document("".join(lines).rstrip("\n")))
    return documents


def _read_jsonl(path: Path) -> tuple[list[Document], list[BadLine]]:
    documents: list[Document] = []
    bad: list[BadLine] = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                documents.append(_record(raw))
            except ValueError as exc:
                bad.append(BadLine(str(path), number, str(exc)))
    return documents, bad


def _record(raw: bytes) -> Document:
    """The document of one JSONL line; ValueError saying what is wrong with it."""
    if not raw.strip():
        raise ValueError("blank line")
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        if "prompt" in record or "response" in record:
            raise ValueError("has both 'text' and 'prompt'/'response'; expected one kind of record")
        return Document(_field(record, "text"))
    if "prompt" in record or "response" in record:
        return Document(_field(record, "response"), prompt=_field(record, "prompt"))
    raise ValueError(f"expected a 'text' field or 'prompt' and 'response' fields, got fields {sorted(record)}")


def _field(record: dict, name: str) -> str:
    if name not in record:
        raise ValueError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value
