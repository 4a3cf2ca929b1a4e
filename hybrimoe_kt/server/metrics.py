"""Server metrics in Prometheus form (``GET /metrics``, text exposition) and as JSON (``GET /metrics.json``).

Each engine has its own registry (several servers can live in one process, as in the tests). Counters
and histograms are updated by the worker and the HTTP side; gauges (queue, batch, the hybrid runtime's
expert cache and copies) are read when scraped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("served", "failed", "rejected", "invalid", "cancelled")
RECENT = 32  # requests in the JSON view's decode tokens/s window
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.started = time.time()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybrimoe_requests", "requests by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.prompt_tokens = Counter("hybrimoe_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("hybrimoe_generation_tokens", "tokens generated", registry=r)
        self.latency = Histogram("hybrimoe_request_latency_seconds", "submit to last token", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("hybrimoe_time_to_first_token_seconds", "submit to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("hybrimoe_decode_batch_size", "requests per decode forward", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step = Histogram("hybrimoe_decode_step_seconds", "time per decode forward", registry=r,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        r.register(_EngineCollector(engine))
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._tokens = [0, 0]  # prompt, generated
        self._decode: deque[tuple[int, float]] = deque(maxlen=RECENT)  # (tokens after the first, seconds)

    # updates ---------------------------------------------------------------------------------------
    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()
        with self._lock:
            self._counts[name] += 1

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step.observe(seconds)

    def finished(self, outcome: str, prompt_tokens: int, generated: int, decode_s: float, latency_s: float) -> None:
        self.outcome(outcome)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if outcome == "served":
            self.latency.observe(latency_s)
        with self._lock:
            self._tokens[0] += prompt_tokens
            self._tokens[1] += generated
            if generated > 1 and decode_s > 0:
                self._decode.append((generated - 1, decode_s))

    # views -----------------------------------------------------------------------------------------
    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            tokens = sum(t for t, _ in self._decode)
            secs = sum(s for _, s in self._decode)
            out: dict[str, Any] = {"requests": dict(self._counts), "prompt_tokens": self._tokens[0],
                                   "tokens_generated": self._tokens[1],
                                   "decode_tokens_per_s_recent": round(tokens / secs, 3) if secs > 0 else None}
        e = self.engine
        out["uptime_s"] = round(time.time() - self.started, 3)
        out["queue"] = {"length": e.queue_length(), "capacity": e.queue_size}
        out["batch"] = {"running": e.running(), "max": e.max_batch}
        out.update(runtime_view(e.hybrid))
        return out


def runtime_view(hybrid: Any) -> dict[str, Any]:
    rt = hybrid.runtime
    out: dict[str, Any] = {"gpu_tier": hybrid.tier_label, "cache": None, "transfers": None}
    if rt is not None:
        c = rt.cache.counters
        out["cache"] = {"hit_rate": round(c.hit_rate, 4), "hits": c.hits, "late_hits": c.late_hits,
                        "misses": c.misses}
        out["transfers"] = {"copies": rt.pool.copies, "gb": round(rt.pool.bytes_copied / 1e9, 6)}
    return out


class _EngineCollector:
    """Gauges read at scrape time: the queue, the batch, the worker, the hybrid runtime's counters."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine
        yield _gauge("hybrimoe_queue_length", "requests waiting", e.queue_length())
        yield _gauge("hybrimoe_queue_capacity", "requests that may wait", e.queue_size)
        yield _gauge("hybrimoe_running_requests", "requests in the decode batch", e.running())
        yield _gauge("hybrimoe_worker_alive", "1 while the engine worker runs", int(e.alive()))
        yield _gauge("hybrimoe_last_step_age_seconds", "since the worker's last step",
                     time.monotonic() - e.last_step)
        rt = e.hybrid.runtime
        if rt is None:
            return
        c = rt.cache.counters
        yield _gauge("hybrimoe_expert_cache_hit_rate", "activated experts resident on the GPU tier", c.hit_rate)
        experts = CounterMetricFamily("hybrimoe_expert_lookups", "activated routed experts by cache result",
                                      labels=["result"])
        for name, value in (("hit", c.hits), ("late_hit", c.late_hits), ("miss", c.misses)):
            experts.add_metric([name], value)
        yield experts
        yield CounterMetricFamily("hybrimoe_expert_copies", "expert copies to the GPU tier", value=rt.pool.copies)
        yield CounterMetricFamily("hybrimoe_expert_copy_bytes", "bytes copied to the GPU tier",
                                  value=rt.pool.bytes_copied)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
