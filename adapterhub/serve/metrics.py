"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per engine.

Counters and histograms are updated as things happen; the gauges (queue depth, rows in flight,
slot occupancy, evictions, tokens/s over the last 10 s) are read from the engine at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .engine import Engine

RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapterhub_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("adapterhub_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("adapterhub_generated_tokens", "tokens generated", registry=r)
        self.batch_rows = Histogram(
            "adapterhub_batch_rows",
            "rows in each decode step's forward",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.step_tokens = Histogram(
            "adapterhub_step_tokens",
            "tokens in each step's forward (decode tokens and prompt chunks)",
            registry=r,
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096),
        )
        self.preemptions = Counter(
            "adapterhub_preemptions", "rows that gave back their KV blocks to be recomputed later", registry=r
        )
        self.queue_seconds = Histogram(
            "adapterhub_queue_seconds", "time from submission to prefill", registry=r, buckets=LATENCY_BUCKETS
        )
        self.request_seconds = Histogram(
            "adapterhub_request_seconds", "time from submission to the last token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.compositions = Counter(
            "adapterhub_compositions", "requests that combine adapters, by method", ["method"], registry=r
        )
        self.loads = Counter(
            "adapterhub_adapter_loads", "adapter loads (from files or the host cache)", ["result"], registry=r
        )
        self.load_seconds = Histogram(
            "adapterhub_adapter_load_seconds",
            "time to load an adapter into a slot",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW seconds
        self._recent_lock = threading.Lock()

    def tokens(self, n: int) -> None:
        """Counts n generated tokens (total and recent rate)."""
        self.generated_tokens.inc(n)
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._recent_lock:
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def watch(self, engine: Engine) -> None:
        """Adds the gauges read from `engine` at each scrape."""
        self.registry.register(_EngineCollector(engine, self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics

    def collect(self):
        e, bb = self.engine, self.engine.backbone
        values = [
            ("adapterhub_queue_depth", "requests waiting to join the batch", e.queue_depth()),
            ("adapterhub_running_rows", "rows (sequences) in the running batch", e.running_rows()),
            ("adapterhub_adapter_slots_used", "adapter slots holding an adapter", len(bb.names)),
            ("adapterhub_adapter_slots", "adapter slots in all", bb.max_adapters),
            ("adapterhub_adapters", "adapters clients may name (resident or not)", len(e.adapters())),
            ("adapterhub_kv_blocks", f"KV cache blocks of {e.kv.pool.block_size} tokens in all", e.kv.blocks.count),
            ("adapterhub_kv_blocks_used", "KV cache blocks held by rows in flight", e.kv.blocks.used()),
            ("adapterhub_kv_blocks_cached", "KV cache blocks holding a published prefix", e.kv.blocks.cached()),
            (
                "adapterhub_tokens_per_second",
                f"tokens generated per second over the last {RATE_WINDOW:g} s",
                self.metrics.tokens_per_second(),
            ),
        ]
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("adapterhub_adapter_evictions", "adapters evicted to make room", value=bb.evictions)
        yield CounterMetricFamily(
            "adapterhub_composition_materializations",
            "compositions merged into a slot (not found resident or in the host cache)",
            value=bb.composer.materialized,
        )
        yield CounterMetricFamily(
            "adapterhub_composition_materialize_seconds",
            "seconds spent merging compositions",
            value=bb.composer.materialize_seconds,
        )
        blocks = e.kv.blocks
        yield CounterMetricFamily("adapterhub_prefix_cache_lookups", "prefix blocks looked up", value=blocks.lookups)
        yield CounterMetricFamily("adapterhub_prefix_cache_hits", "prefix blocks found cached", value=blocks.hits)
        yield CounterMetricFamily(
            "adapterhub_prefix_cache_tokens",
            "prompt tokens whose K/V came from the prefix cache",
            value=e.kv.reused_tokens,
        )
