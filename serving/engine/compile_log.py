"""Counts every program jax traces, lowers and compiles; flags the ones after start-up.

Start-up builds a fixed set of programs; a request that makes jax build
another pays seconds of latency. ``install()`` registers listeners on jax's
compile events (``jax.monitoring``): the counts and seconds per phase feed
the start-up report (``/get_server_info``'s ``startup``, the ready log line)
and, once ``mark_ready()`` is called, each new trace is logged at WARNING
(with ``jax_explain_cache_misses`` on, so jax logs what changed) and counted
in ``after_ready``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

logger = logging.getLogger(__name__)

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileLog:
    """Process-wide counts and seconds of jax's compile phases."""

    traces: int = 0
    lowerings: int = 0
    backend_compiles: int = 0
    cache_hits: int = 0
    trace_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0
    ready: bool = False
    after_ready: int = 0  # traces after mark_ready()

    def _on_duration(self, event: str, seconds: float, **_) -> None:
        with _LOCK:
            if event == _TRACE:
                self.traces += 1
                self.trace_s += seconds
                if self.ready:
                    self.after_ready += 1
                    logger.warning("jax traced a new program after start-up (%.2fs); every "
                                   "program should be built at start-up (see the cache-miss "
                                   "explanation above)", seconds)
            elif event == _LOWER:
                self.lowerings += 1
                self.lower_s += seconds
            elif event == _COMPILE:
                self.backend_compiles += 1
                self.compile_s += seconds

    def _on_event(self, event: str, **_) -> None:
        if event == _CACHE_HIT:
            with _LOCK:
                self.cache_hits += 1

    def mark_ready(self) -> None:
        """From now on, every trace is a warning (start-up is over)."""
        import jax

        self.ready = True
        jax.config.update("jax_explain_cache_misses", True)

    def snapshot(self) -> dict:
        with _LOCK:
            return dataclasses.asdict(self)


_LOCK = threading.Lock()
_LOG = CompileLog()
_INSTALLED = False


def install() -> CompileLog:
    """Registers the listeners once; returns the process's ``CompileLog``."""
    global _INSTALLED
    with _LOCK:
        if not _INSTALLED:
            import jax

            jax.monitoring.register_event_duration_secs_listener(_LOG._on_duration)
            jax.monitoring.register_event_listener(_LOG._on_event)
            _INSTALLED = True
    return _LOG


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; else since this module loaded)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        import os
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
