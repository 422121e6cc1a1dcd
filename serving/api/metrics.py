"""Prometheus metrics under vLLM's names, one CollectorRegistry per app.

Gauges and token counters are read from ``engine.stats()`` at scrape time (a
custom collector), so they are never stale; latency histograms are observed by
the HTTP layer as each request's outputs arrive (:class:`RequestTimer`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class _EngineStatsCollector:
    """Yields the engine-state gauges and token counters from ``engine.stats()``."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self._stats = stats
        self._labels = {"model_name": model_name, "engine": "0"}

    def collect(self):
        try:
            s = self._stats() or {}
        except Exception:  # a scrape must never fail because the engine is busy
            s = {}
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, float(value))
            return c

        usage = float(s.get("kv_cache_usage", 0.0))
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    s.get("num_running", 0))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    s.get("num_waiting", 0))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge("vllm:gpu_cache_usage_perc",
                    "KV-cache usage (deprecated name of kv_cache_usage_perc).", usage)
        yield gauge("vllm:prefix_cache_hit_rate", "Prefix cache hit rate.",
                    s.get("prefix_cache_hit_rate", 0.0))
        yield gauge("jax_serve:num_total_pages", "KV-cache pages in the pool.",
                    s.get("num_total_pages", 0))
        yield gauge("jax_serve:num_free_pages", "KV-cache pages not held by any request.",
                    s.get("num_free_pages", 0))
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      s.get("prompt_tokens_total", 0))
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      s.get("generation_tokens_total", 0))
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.",
                      s.get("num_preemptions_total", 0))
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.get("prefix_cache_queries_total", 0))
        yield counter("vllm:prefix_cache_hits", "Prompt tokens served by the prefix cache.",
                      s.get("prefix_cache_hits_total", 0))


class ServerMetrics:
    """The app's registry and the request-level histograms and counters.

    Args:
        stats: a callable returning the engine's stats dict.
        model_name: the ``model_name`` label value.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(stats, model_name))
        labels = ["model_name", "engine"]
        kw = {"labelnames": labels, "registry": self.registry}
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.",
                              buckets=_TTFT_BUCKETS, **kw)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.",
                             buckets=_ITL_BUCKETS, **kw)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.",
                              buckets=_ITL_BUCKETS, **kw)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.",
                             buckets=_E2E_BUCKETS, **kw)
        self.prompt_tokens = Histogram("vllm:request_prompt_tokens",
                                       "Number of prefill tokens processed.",
                                       buckets=_TOKEN_BUCKETS, **kw)
        self.generation_tokens = Histogram("vllm:request_generation_tokens",
                                           "Number of generation tokens processed.",
                                           buckets=_TOKEN_BUCKETS, **kw)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               labelnames=labels + ["finished_reason"], registry=self.registry)
        self.rejected = Counter("jax_serve:requests_rejected",
                                "Requests refused with 503 because the queue was full.",
                                **kw)
        self._labels = (model_name, "0")

    def on_rejected(self) -> None:
        self.rejected.labels(*self._labels).inc()

    def timer(self) -> "RequestTimer":
        """Starts timing one engine request."""
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes TTFT, inter-token latency and end-to-end latency of one engine request."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._start = time.monotonic()
        self._last: Optional[float] = None
        self._first: Optional[float] = None
        self._num_tokens = 0

    def on_output(self, num_generated_tokens: int) -> None:
        """Records a snapshot carrying ``num_generated_tokens`` tokens in all."""
        new = num_generated_tokens - self._num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        labels = self._m._labels
        if self._last is None:
            self._first = now
            self._m.ttft.labels(*labels).observe(now - self._start)
            new -= 1
        if new > 0 and self._last is not None:
            gap = (now - self._last) / new
            for _ in range(new):
                self._m.itl.labels(*labels).observe(gap)
                self._m.tpot.labels(*labels).observe(gap)
        self._last = now
        self._num_tokens = num_generated_tokens

    def on_finish(self, finish_reason: Optional[str], num_prompt_tokens: int) -> None:
        """Records the end of the request (only successful ends count as success)."""
        labels = self._m._labels
        self._m.e2e.labels(*labels).observe(time.monotonic() - self._start)
        self._m.prompt_tokens.labels(*labels).observe(num_prompt_tokens)
        self._m.generation_tokens.labels(*labels).observe(self._num_tokens)
        if finish_reason in ("stop", "length", "abort"):
            self._m.success.labels(*labels, finish_reason).inc()
