"""Bounded load against a running server: N client threads share a fixed number of requests and a
deadline (tests and ``benchmarks/serve_bench.py``). Stdlib only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .client import Client, Reply


@dataclass
class LoadResult:
    clients: int
    wall_s: float
    replies: list[tuple[int, Reply]] = field(default_factory=list)  # (request index, reply), completion order
    unfinished_clients: int = 0  # client threads still running at deadline + timeout (hung requests)

    def status_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, r in self.replies:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def ok(self) -> list[tuple[int, Reply]]:
        return [(i, r) for i, r in self.replies if r.status == 200]

    def summary(self) -> dict:
        lat = sorted(r.seconds for _, r in self.ok())
        runtime = sorted(float(r.headers.get("x-runtime-ms", "nan")) / 1e3 for _, r in self.ok())
        over = sorted(r.seconds - float(r.headers.get("x-runtime-ms", "nan")) / 1e3 for _, r in self.ok())
        return {
            "clients": self.clients, "requests": len(self.replies), "ok": len(lat),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts().items())},
            "wall_s": self.wall_s, "throughput_rps": len(lat) / self.wall_s if self.wall_s > 0 else 0.0,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "engine_call_p50_s": percentile(runtime, 50),
            "client_minus_engine_call_p50_s": percentile(over, 50),
            "unfinished_clients": self.unfinished_clients,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def drive(url: str, clients: int, requests: int, fields: Callable[[int], dict], time_limit_s: float = 60.0,
          timeout_s: float = 60.0, on_reply: Callable[[int, Reply], None] | None = None) -> LoadResult:
    """Send ``requests`` POST /generate (body ``fields(i)`` for request i) from ``clients`` threads; no
    new request starts after ``time_limit_s``; each waits at most ``timeout_s``; the call returns
    within time_limit_s + timeout_s + 5 s whatever the server does."""
    lock = threading.Lock()
    next_i = [0]
    result = LoadResult(clients, 0.0)
    deadline = time.monotonic() + time_limit_s

    def worker():
        c = Client(url, timeout=timeout_s)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next_i[0]
                    if i >= requests:
                        return
                    next_i[0] += 1
                r = c.generate(**fields(i))
                with lock:
                    result.replies.append((i, r))
                if on_reply is not None:
                    on_reply(i, r)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, daemon=True, name=f"load-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    end = time.monotonic() + time_limit_s + timeout_s + 5
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    result.wall_s = time.perf_counter() - t0
    result.unfinished_clients = sum(t.is_alive() for t in threads)
    return result
