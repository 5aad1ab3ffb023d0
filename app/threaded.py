"""A blocking iterator read from the event loop, produced by a worker thread of its own.

The app's named API and the OpenAI-compatible server both stream a pipeline turn whose steps
block for seconds (a decoder call yields nothing meanwhile). Awaiting such a step would leave a
cancelled request unable to stop it; a worker thread keeps the event loop free, so that leaving
early can set the turn's cancel event while the pipeline is inside a step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterable

import anyio

__all__ = ["ThreadedIterator"]

_END = object()


class ThreadedIterator:
    """The items of ``produce()``, iterated in a daemon thread named ``name`` and handed, in
    order, to the event loop that created this object.

    Args:
        produce: makes the blocking iterable (called in the worker thread).
        cancel: set by :meth:`close` when the reader leaves before the end; ``produce`` must
            stop soon after it is set (the pipeline does, at its next token or denoising step).
        name: the worker thread's name.
    """

    def __init__(self, produce: Callable[[], Iterable[Any]], cancel: threading.Event, name: str):
        self.cancel = cancel
        self.ended = False  # the reader saw the last item (or the error)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stopped = asyncio.Event()
        threading.Thread(target=self._work, args=(produce,), name=name, daemon=True).start()

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _work(self, produce: Callable[[], Iterable[Any]]) -> None:
        try:
            for item in produce():
                self._put(item)
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - raised again by the reader, in the event loop
            self._put(exc)
        finally:
            self._loop.call_soon_threadsafe(self._stopped.set)

    async def items(self) -> AsyncIterator[Any]:
        """The items, in order; what ``produce`` raised is raised here."""
        while True:
            item = await self._queue.get()
            if item is _END or isinstance(item, BaseException):
                self.ended = True
                if item is _END:
                    return
                raise item
            yield item

    async def close(self) -> bool:
        """Set :attr:`cancel` unless the reader saw the end, and wait for the worker to finish.
        Shielded: it runs as a cancelled task unwinds. Returns whether it cancelled."""
        with anyio.CancelScope(shield=True):
            cancelled = not self.ended
            if cancelled:
                self.cancel.set()
            await self._stopped.wait()
        return cancelled
