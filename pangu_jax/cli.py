"""What the runnable scripts share: errors as one line, warnings as one line, stopping on a signal.

A user's mistake (a missing file, a bad argument, a checkpoint that does
not fit) ends a script with one line on stderr and a non-zero status; a
traceback is shown only for our own bugs, or for everything with `--debug`
or `PANGU_JAX_DEBUG=1`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

DEBUG_ENV = "PANGU_JAX_DEBUG"

# What a user can cause: every error this package raises for bad input is a
# ValueError (ConfigError, CheckpointFormatError, ...) or an OSError
# (FileNotFoundError, PermissionError, VocabNotFoundError).
USER_ERRORS = (ValueError, OSError)


def script_parser(description: str | None) -> argparse.ArgumentParser:
    """A script's argument parser: its docstring as the description, and --debug (see `run`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def add_vocab_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", help="vocab.model (default: $PANGU_JAX_VOCAB, the cache, or a one-time download)")


def one_line(error: BaseException | str) -> str:
    """The message on one line: its own lines joined."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(str(message))}", file=sys.stderr if file is None else file)


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` and turn what a user can cause into one `error:` line and status 1.

    KeyboardInterrupt ends with status 130 and one line. `--debug` (left in
    `argv` for the script's parser) or `PANGU_JAX_DEBUG=1` lets every error
    through with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    with warnings.catch_warnings():  # restores showwarning on exit
        if not debug:
            warnings.showwarning = _show_warning
        try:
            return main(argv)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1


@contextlib.contextmanager
def stop_requests(notice: str) -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event instead of killing the process; the work stops at its next safe point.

    The first signal prints `notice`; a second one interrupts at once
    (KeyboardInterrupt). The handlers are restored on exit. The event's
    `signal` attribute holds the number of the first signal received.
    """
    event = threading.Event()
    event.signal = None

    def handle(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.signal = signum
        event.set()
        print(notice, file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
