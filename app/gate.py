"""How many model calls run at once, shared by the chat app and the HTTP API of one process."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["ModelGate", "ServerBusyError"]


class ServerBusyError(RuntimeError):
    """Raised when a request would wait behind more than ``max_waiting`` others."""


class ModelGate:
    """At most ``concurrency`` model calls at a time; at most ``max_waiting`` more wait for a slot.

    Every caller (an app turn, an API request) holds a :meth:`slot` for as long as it uses the
    pipeline, so the two front ends of one server share one budget.
    """

    def __init__(self, concurrency: int = 1, max_waiting: int = 64):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency, self.max_waiting = concurrency, max_waiting
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return self._waiting

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block.

        Raises:
            ServerBusyError: ``max_waiting`` callers are already waiting.
        """
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise ServerBusyError(f"the server is busy: {self._waiting} requests are waiting; "
                                          f"try again shortly")
                self._waiting += 1
            try:
                self._slots.acquire()
            finally:
                with self._lock:
                    self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
