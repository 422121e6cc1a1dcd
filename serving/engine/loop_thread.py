"""The worker thread an engine's loop runs on, shared by the generation and pooling engines."""

from __future__ import annotations

import asyncio
import threading
from typing import Optional


class LoopThread:
    """Runs ``self._run`` on a daemon thread; ``_wake`` rouses it, ``shutdown`` stops it.

    Subclasses call ``_init_loop()`` in ``__init__``, ``_start_loop(name)`` once
    ready, and loop ``while not self._stop`` in ``_run``.
    """

    def _init_loop(self) -> None:
        self._wake = threading.Event()
        self._stop = False
        self._ready = False
        self._thread: Optional[threading.Thread] = None

    def _start_loop(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready = True

    def _run(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stops the loop and waits (up to 10 s) for its thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._ready = False
