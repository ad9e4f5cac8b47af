"""Checkpoint formats: readers, writers and the name mapping they share."""

from .loader import CheckpointMismatchError, load_checkpoint
from .mindspore_format import CheckpointFormatError

__all__ = ["CheckpointFormatError", "CheckpointMismatchError", "load_checkpoint"]
