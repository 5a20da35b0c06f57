"""Ctrl-C and SIGTERM during ``evalkit report``: recorded when they arrive, acted on between stages.

A signal handler that raises can raise anywhere, including inside a C library's callback (numba
compiling, a ctypes callback), which prints "Exception ignored" and drops the exception: the
run went on and replaced the previous run folder. So the command line's handlers
(:func:`recording_signals`) only record the signal, and the run calls :func:`check_interrupted`
at every stage boundary (after loading the data, per extraction batch, between embedding
methods, before rendering, right before the run folder is swapped in), which raises
``KeyboardInterrupt`` (SIGINT) or :class:`Terminated` (SIGTERM) there. No signal is lost, and
none can arrive in the middle of the swap.

Only the command line installs these handlers: in a notebook, ``evalkit.evaluate`` leaves the
interpreter's own signal handling alone and :func:`check_interrupted` does nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

__all__ = ["Terminated", "check_interrupted", "pending_signal", "recording_signals"]


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so the run unwinds and leaves nothing behind."""


_pending: Optional[int] = None


def _record(signum, frame) -> None:
    global _pending
    if _pending is None:  # the first signal decides the exit code
        _pending = signum


def pending_signal() -> Optional[int]:
    """The signal recorded since :func:`recording_signals` began, or None."""
    return _pending


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` (SIGINT) or :class:`Terminated` (SIGTERM) if one was recorded.

    Cheap (one global read): call it at stage boundaries and in long loops.
    """
    if _pending is None:
        return
    if _pending == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


@contextlib.contextmanager
def recording_signals():
    """Within: SIGINT and SIGTERM are recorded (see :func:`check_interrupted`), not raised.

    Restores the previous handlers and forgets the recorded signal on exit. A signal the
    process ignores (a background job's SIGINT) stays ignored; outside the main thread (where
    handlers cannot be installed) it does nothing.
    """
    global _pending
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _record)
    _pending = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _pending = None
