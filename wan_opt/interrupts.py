"""Ctrl-C (SIGINT) and SIGTERM end a run the same way: as an exception in the main thread, so every `finally`
and rollback runs (partial files removed, ffmpeg killed), then one line and exit status 130 or 143.

    install()            # the command line does this once; a library caller keeps Python's own handling
    with deferred():     # clean-up that must finish: a signal arriving inside waits until the block ends
        tmp.unlink(missing_ok=True)
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

NOTHING_WRITTEN = "nothing was written for the current video"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": None}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; a KeyboardInterrupt, so code that cleans up after Ctrl-C does so after SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def _exit_now(signum: int, frame) -> None:
    os.write(2, f"interrupted: {NOTHING_WRITTEN}\n".encode())
    os._exit(128 + signum)


def _install(handler) -> None:
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `cmd &` in a script ignores SIGINT: keep it so
            signal.signal(signum, handler)


def exit_at_once() -> None:
    """Until `install()`: the command has written nothing yet, so a signal ends it at once, with its line."""
    _install(_exit_now)


def install() -> None:
    """From here on SIGINT and SIGTERM raise `Interrupted` in the main thread."""
    _install(_raise)


@contextmanager
def deferred(raise_pending: bool = True) -> Iterator[None]:
    """Run the block to its end; a signal that arrived meanwhile is raised as it exits, or dropped where the
    run is already ending for an earlier one (`raise_pending=False`)."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"] if not _state["depth"] else None
        if pending is not None:
            _state["pending"] = None
            if raise_pending:
                raise Interrupted(pending)


def exit_line(interrupt: KeyboardInterrupt) -> tuple[str, int]:
    """The line the command ends with and its exit status; `interrupt.kept` (set by the run) says what stayed."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    return f"interrupted: {getattr(interrupt, 'kept', NOTHING_WRITTEN)}", 128 + signum
