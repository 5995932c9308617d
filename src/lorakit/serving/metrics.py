"""The server's Prometheus metrics (text exposition format, no extra dependency): requests by route and
status, latency histograms, rows per forward pass, adapter loads and evictions."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum: Counter[str] = Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            buckets = self.latency[route]
            buckets[
                next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            ] += 1
            self.latency_sum[route] += seconds

    def render(self, engine: Any) -> str:
        out = [
            "# HELP lorakit_requests_total Requests by route and status.",
            "# TYPE lorakit_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'lorakit_requests_total{{route="{route}",status="{status}"}} {n}')
            out += [
                "# HELP lorakit_request_seconds Request latency.",
                "# TYPE lorakit_request_seconds histogram",
            ]
            for route, counts in sorted(self.latency.items()):
                cum = 0
                for b, c in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    cum += c
                    le = "+Inf" if b == float("inf") else f"{b}"
                    out.append(f'lorakit_request_seconds_bucket{{route="{route}",le="{le}"}} {cum}')
                out.append(f'lorakit_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                out.append(f'lorakit_request_seconds_count{{route="{route}"}} {cum}')
        sizes = list(engine.stats.batch_sizes)
        out += [
            "# HELP lorakit_batch_rows Rows per forward pass (recent batches).",
            "# TYPE lorakit_batch_rows histogram",
        ]
        for b in BATCH_BUCKETS:
            out.append(f'lorakit_batch_rows_bucket{{le="{b}"}} {sum(1 for s in sizes if s <= b)}')
        out.append(f'lorakit_batch_rows_bucket{{le="+Inf"}} {len(sizes)}')
        out.append(f"lorakit_batch_rows_sum {sum(sizes)}")
        out.append(f"lorakit_batch_rows_count {len(sizes)}")
        out += [
            "# HELP lorakit_batches_total Forward passes run.",
            "# TYPE lorakit_batches_total counter",
            f"lorakit_batches_total {engine.stats.batches}",
            "# HELP lorakit_adapters_loaded Adapters in the model now.",
            "# TYPE lorakit_adapters_loaded gauge",
            f"lorakit_adapters_loaded {len(engine.loaded)}",
            "# HELP lorakit_adapters_known Adapters the server can answer for.",
            "# TYPE lorakit_adapters_known gauge",
            f"lorakit_adapters_known {len(engine.known)}",
            "# HELP lorakit_adapter_loads_total Adapter loads (incl. on demand).",
            "# TYPE lorakit_adapter_loads_total counter",
            f"lorakit_adapter_loads_total {engine.stats.loads}",
            "# HELP lorakit_adapter_evictions_total Adapters unloaded by the LRU.",
            "# TYPE lorakit_adapter_evictions_total counter",
            f"lorakit_adapter_evictions_total {engine.stats.evictions}",
        ]
        return "\n".join(out) + "\n"
