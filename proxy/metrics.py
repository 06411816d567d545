"""Prometheus metrics: counters and histograms fed by the event bus, gauges read from the manager.

``Metrics`` listens on the bus (``EventBus.listen``: called synchronously for every event, so no count
is ever dropped) and owns a private ``CollectorRegistry`` (one per app: tests build many apps). Gauges
are read at scrape time from ``ModelManager.status()`` by a custom collector. Labels are bounded: model
names come from the config ("" for a request that named no served model), routes are templates.
No HTTP here; ``proxy.api.ops`` serves ``render()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.events import Event, EventBus, LoadEnded, RequestEnded, Unloaded
from proxy.runtime import ModelStatus, State

M = TypeVar("M", Counter, Histogram)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FORWARD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# every metric the proxy exports (the Grafana dashboard's test checks its queries against these)
NAMES = (
    "proxy_models_loaded",
    "proxy_model_state",
    "proxy_model_loads_total",
    "proxy_model_load_seconds",
    "proxy_model_unloads_total",
    "proxy_model_memory_bytes",
    "proxy_requests_total",
    "proxy_request_seconds",
    "proxy_time_to_first_token_seconds",
    "proxy_generated_tokens_total",
    "proxy_queue_waiting",
    "proxy_prompt_cache_hits_total",
    "proxy_prompt_cache_misses_total",
    "proxy_prompt_cache_reused_tokens_total",
    "proxy_prompt_cache_ram_bytes",
    "proxy_prompt_cache_disk_bytes",
)


class _Gauges(Collector):
    """What the manager's status says now: loaded count, state, memory, waiting requests per model."""

    def __init__(self, status: Callable[[], Iterable[ModelStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("proxy_models_loaded", "Models loaded and ready now")
        state = GaugeMetricFamily("proxy_model_state", "1 for the state each model is in", labels=["model", "state"])
        memory = GaugeMetricFamily(
            "proxy_model_memory_bytes", "Memory a loaded model's worker uses", labels=["model", "kind"]
        )
        waiting = GaugeMetricFamily("proxy_queue_waiting", "Requests waiting for a model", labels=["model"])
        ready = 0
        for s in self._status():
            ready += s.state == State.READY
            for name in State:
                state.add_metric([s.name, name.value], 1.0 if s.state == name.value else 0.0)
            memory.add_metric([s.name, "ram"], float(s.rss_bytes or 0))
            memory.add_metric([s.name, "vram"], float(s.vram_bytes or 0))
            waiting.add_metric([s.name], float(s.queued))
        loaded.add_metric([], float(ready))
        yield from (loaded, state, memory, waiting)


class _PromptCache(Collector):
    """llama.cpp's prompt cache: each loaded worker's own counts (``prompt_cache`` in its /health, asked at
    each scrape; they start over with each load) and the bytes of saved states on disk, every model together."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.reports: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["model"])

        hits = counter("proxy_prompt_cache_hits_total", "Requests that reused some of their prompt, since the load")
        misses = counter("proxy_prompt_cache_misses_total", "Requests that reused none of their prompt, since the load")
        reused = counter("proxy_prompt_cache_reused_tokens_total", "Prompt tokens not evaluated again, since the load")
        ram = GaugeMetricFamily("proxy_prompt_cache_ram_bytes", "Prompt states kept in RAM", labels=["model"])
        for model, report in self.reports.items():
            cache = report.get("prompt_cache")
            if not isinstance(cache, dict) or not cache.get("enabled"):
                continue
            hits.add_metric([model], float(cache.get("hits") or 0))
            misses.add_metric([model], float(cache.get("misses") or 0))
            reused.add_metric([model], float(cache.get("tokens_reused") or 0))
            ram.add_metric([model], float(cache.get("ram_bytes") or 0))
        disk = GaugeMetricFamily("proxy_prompt_cache_disk_bytes", "Prompt states saved on disk, every model together")
        disk.add_metric([], float(prompt_cache_bytes(self.folder)))
        yield from (hits, misses, reused, ram, disk)


def prompt_cache_bytes(folder: Path | None) -> int:
    """The bytes of the saved prompt states (``*.pcache``) in ``folder``."""
    total = 0
    if folder is not None:
        with contextlib.suppress(OSError):
            for path in folder.glob("*.pcache"):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
    return total


class Metrics:
    def __init__(self, bus: EventBus, prompt_cache: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._prompt_cache = _PromptCache(prompt_cache)
        r.register(self._prompt_cache)
        self.loads = Counter("proxy_model_loads_total", "Model loads that succeeded", ["model"], registry=r)
        self.load_seconds = Histogram(
            "proxy_model_load_seconds", "Time a model took to load", ["model"], buckets=LOAD_BUCKETS, registry=r
        )
        self.unloads = Counter("proxy_model_unloads_total", "Model unloads by reason", ["model", "reason"], registry=r)
        self.requests = Counter("proxy_requests_total", "Requests answered", ["model", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "proxy_request_seconds",
            "Time from a request's arrival to the end of its answer",
            ["model", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "proxy_time_to_first_token_seconds",
            "Time from a streamed request's arrival to the worker's first byte",
            ["model", "route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("proxy_generated_tokens_total", "Tokens generated (from usage)", ["model"], registry=r)
        # streamed answers written by the worker straight to the client (proxy.handoff); not on the dashboard
        self.handoffs = Counter(
            "proxy_stream_handoffs_total",
            "Streamed answers whose worker wrote the tokens to the client itself",
            ["model"],
            registry=r,
        )
        # a cluster's forwards to other nodes (proxy.cluster.hop); not on the dashboard, so not in NAMES
        self.forwards = Counter(
            "proxy_cluster_forwards_total",
            "Requests forwarded to another node, by outcome",
            ["node", "outcome"],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "proxy_cluster_forward_added_seconds",
            "Time a forward added before the serving node's answer began (hop time less the node's own)",
            ["node"],
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self._gauges: _Gauges | None = None
        # a request's counters by their labels, found once: prometheus_client's labels() checks and locks at
        # every call (two to four calls a request, 5-10 us each); no child is ever removed
        self._children: dict[tuple[object, ...], Any] = {}
        bus.listen(self.on_event)

    def watch(self, status: Callable[[], Iterable[ModelStatus]]) -> None:
        """Read the gauges from this status at each scrape (the manager's, once it exists)."""
        if self._gauges is not None:
            self.registry.unregister(self._gauges)
        self._gauges = _Gauges(status)
        self.registry.register(self._gauges)

    def observe_workers(self, reports: dict[str, dict[str, Any]]) -> None:
        """The loaded workers' own reports (``ModelManager.worker_reports``), read before a scrape."""
        self._prompt_cache.reports = reports

    def on_event(self, event: Event) -> None:
        if isinstance(event, RequestEnded):
            self._child(self.requests, event.model, event.route, str(event.status)).inc()
            self._child(self.request_seconds, event.model, event.route).observe(event.seconds)
            if event.ttft is not None:
                self._child(self.ttft, event.model, event.route).observe(event.ttft)
            if event.tokens:
                self._child(self.tokens, event.model).inc(event.tokens)
            if event.handed_off:
                self._child(self.handoffs, event.model).inc()
        elif isinstance(event, LoadEnded):
            if event.ok:
                self.loads.labels(event.model).inc()
                self.load_seconds.labels(event.model).observe(event.seconds)
        elif isinstance(event, Unloaded):
            self.unloads.labels(event.model, event.reason.value).inc()

    def _child(self, metric: M, *labels: str) -> M:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def forwarded(self, node: str, outcome: str, added: float | None) -> None:
        """One forward to ``node`` (``ok``, ``unreachable`` or ``dead``) and the seconds it added."""
        self.forwards.labels(node, outcome).inc()
        if added is not None:
            self.forward_seconds.labels(node).observe(added)

    def render(self, visible: Callable[[str], bool] | None = None) -> bytes:
        """The exposition; with ``visible``, only the samples of the models (``model`` label) it allows."""
        if visible is None:
            return generate_latest(self.registry)
        return generate_latest(_Only(self.registry, visible))


class _Only:
    """A registry's metrics without the samples of the models ``visible`` refuses (for ``generate_latest``)."""

    def __init__(self, registry: CollectorRegistry, visible: Callable[[str], bool]) -> None:
        self._registry = registry
        self._visible = visible

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [s for s in metric.samples if self._visible(s.labels.get("model", ""))]
            yield kept
