"""Prometheus metrics under vLLM's names with the `lmc:` prefix.

Engine state (requests running and waiting, KV usage, token and prefix-cache
counters, preemptions) is read from the engine's latest stats snapshot at scrape
time; latencies are histograms the request handlers observe:

    time_to_first_token_seconds   arrival -> first generated token
    inter_token_latency_seconds   gap between two outputs of a request
    e2e_request_latency_seconds   arrival -> last output
    request_queue_time_seconds    time in the server's admission queue

Each server has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmcompress.turbo.outputs import EngineStats

PREFIX = "lmc:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    """Turns an EngineStats snapshot (plus the admission queue's length) into metric families."""

    def __init__(self, stats: Callable[[], EngineStats], queued: Callable[[], int], model_name: str):
        self._stats, self._queued, self._model_name = stats, queued, model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges = {
            "num_requests_running": ("Sequences the engine is running.", stats.num_running),
            "num_requests_waiting": ("Sequences waiting: in the server's admission queue or the engine's.",
                                     stats.num_waiting + self._queued()),
            "kv_cache_usage_perc": ("Fraction of KV-cache blocks held by requests (0 to 1).", stats.kv_usage),
            "kv_cache_num_blocks": ("KV-cache blocks in the pool.", stats.num_total_blocks),
            "kv_cache_num_free_blocks": ("KV-cache blocks no request holds.", stats.num_free_blocks),
        }
        counters = {
            "prompt_tokens": ("Prompt tokens of the requests added.", stats.prompt_tokens),
            "generation_tokens": ("Tokens generated.", stats.generation_tokens),
            "num_preemptions": ("Sequences preempted for lack of KV blocks.", stats.num_preemptions),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family
        for name, (doc, value) in counters.items():  # exposed with the _total suffix
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], queued: Callable[[], int], model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, queued, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Seconds from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Seconds between two streamed outputs of a request.", _GAP_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Seconds from arrival to the last output.", _LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Seconds spent in the admission queue.", _LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's clock: started on arrival, fed each time outputs with new tokens arrive."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._arrival = time.perf_counter()
        self._last_output: float | None = None

    def admitted(self, seconds_queued: float) -> None:
        self._metrics.request_queue_time.observe(seconds_queued)

    def tokens_arrived(self) -> None:
        now = time.perf_counter()
        if self._last_output is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_output)
        self._last_output = now

    def finished(self) -> None:
        self._metrics.e2e_request_latency.observe(time.perf_counter() - self._arrival)
