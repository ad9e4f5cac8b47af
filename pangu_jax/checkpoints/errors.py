"""What reading, writing and converting checkpoints can raise: each a ValueError, so a script reports it as one line."""

from __future__ import annotations

__all__ = ["CheckpointFormatError", "CheckpointMismatchError", "ConversionCancelled", "DestinationError"]


class CheckpointFormatError(ValueError):
    """A file is not a well-formed checkpoint of the format it claims."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not hold the model asked for."""


class DestinationError(ValueError):
    """A conversion's destination that cannot be written without losing something, or at all."""


class ConversionCancelled(Exception):
    """The conversion was asked to stop (`convert(cancel=...)`); nothing was written."""
