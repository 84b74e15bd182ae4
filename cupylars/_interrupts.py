"""Ctrl-C held back while a step writes its results.

A step that stages strided parameters in contiguous copies writes them back
after the native call; a ``KeyboardInterrupt`` raised between the two would
leave the momentum and the step counter advanced and the weights not. Python
runs signal handlers in the main thread, between bytecodes, so blocking the
signal at the OS level (``pthread_sigmask``) does not help once it has been
received: instead the SIGINT handler is replaced for the duration of the block
by one that only records the interrupt, and the original handler runs when the
block ends. The step is then either not started or complete when
``KeyboardInterrupt`` is raised.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["interrupts_deferred"]


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, SIGINT's Python handler is held back; it runs once the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: nothing interrupts this one
        return
    original = signal.getsignal(signal.SIGINT)
    if not callable(original):
        yield  # ignored, or the default action (the process ends): nothing to hold back
        return
    received: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(frame)

    # signal.signal runs the handlers of signals already received first: an interrupt
    # that came before the block is raised here, before anything has changed.
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, original)  # a pending interrupt goes to `hold` first
        if received:
            original(signal.SIGINT, received[0])
