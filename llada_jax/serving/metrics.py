"""The server's counters, gauges and histograms, rendered as Prometheus text (`GET /metrics`).

Thread-safe: the HTTP handlers (event loop) and the sampler's worker thread both record here.
Also counts XLA compilations (JAX's `backend_compile_duration` monitoring event), so a client
can check that no program is compiled after warm-up.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

import jax

PREFIX = "llada"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What the server did: requests, batches, forward passes, tokens, latency, compilations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)   # (endpoint, status)
        self.batches = 0
        self.batch_rows = 0          # rows run (padding rows included)
        self.batch_requests = 0      # rows that answered a request
        self.forward_passes = 0
        self.generated_tokens = 0    # answer tokens handed to clients
        self.busy_seconds = 0.0      # time the sampler ran
        self.compilations = 0
        self.warmup_compilations = 0
        self.queue_length = 0        # waiting requests
        self.slots_in_use = 0        # waiting + running requests
        self.cancelled = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self.compilations += 1

    def reset_batches(self) -> None:
        with self._lock:
            self.batches = self.batch_rows = self.batch_requests = self.forward_passes = 0
            self.busy_seconds = 0.0
            self.batch_size = _Histogram(BATCH_BUCKETS)

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_done(self, rows: int, requests: int, forward_passes: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            self.batch_requests += requests
            self.forward_passes += forward_passes
            self.busy_seconds += seconds
            self.batch_size.observe(requests)

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def set(self, name: str, value: float) -> None:
        with self._lock:
            setattr(self, name, value)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status",
                     f"# TYPE {p}_requests_total counter"]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} '
                             f'{count}')
            fill = self.batch_requests / self.batch_rows if self.batch_rows else 0.0
            tokens_per_second = (self.generated_tokens / self.busy_seconds
                                 if self.busy_seconds else 0.0)
            scalars = [
                ("queue_length", "gauge", "requests waiting for a batch", self.queue_length),
                ("slots_in_use", "gauge", "requests waiting or running", self.slots_in_use),
                ("batches_total", "counter", "sampler batches run", self.batches),
                ("batch_rows_total", "counter", "rows run, padding rows included",
                 self.batch_rows),
                ("batch_requests_total", "counter", "rows that answered a request",
                 self.batch_requests),
                ("batch_fill_ratio", "gauge", "batch_requests_total / batch_rows_total", fill),
                ("forward_passes_total", "counter", "model forward passes", self.forward_passes),
                ("generated_tokens_total", "counter", "answer tokens returned",
                 self.generated_tokens),
                ("sampler_busy_seconds_total", "counter", "time the sampler ran",
                 self.busy_seconds),
                ("tokens_per_second", "gauge", "generated tokens per sampler-busy second",
                 tokens_per_second),
                ("cancelled_total", "counter", "requests whose client went away",
                 self.cancelled),
                ("compilations_total", "counter", "XLA programs compiled since start",
                 self.compilations),
                ("warmup_compilations", "gauge", "XLA programs compiled during warm-up",
                 self.warmup_compilations),
            ]
            for name, kind, help_text, value in scalars:
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}",
                          f"{p}_{name} {value:g}" if isinstance(value, float)
                          else f"{p}_{name} {value}"]
            lines += [f"# HELP {p}_request_latency_seconds time from request to full answer",
                      f"# TYPE {p}_request_latency_seconds histogram"]
            lines += self.latency.lines(f"{p}_request_latency_seconds")
            lines += [f"# HELP {p}_batch_size requests per sampler batch",
                      f"# TYPE {p}_batch_size histogram"]
            lines += self.batch_size.lines(f"{p}_batch_size")
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (tests and the benchmark read it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
