"""A small HTTP client for the server (stdlib ``http.client``; tests and ``benchmarks/serve_bench.py``).

Every call has a timeout; a connection is kept alive per ``Client`` (one per thread).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int  # HTTP status; 0 = no status (connection refused/reset/timed out: `error` says which)
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    def json(self):
        return json.loads(self.body)


class Client:
    def __init__(self, url: str, timeout: float = 60.0):
        u = urlsplit(url)
        self.host, self.port, self.prefix = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        t0 = time.perf_counter()
        for attempt in (0, 1):  # one retry, only when a kept-alive connection turned out closed before sending
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, self.prefix + path, body=body, headers=headers or {})
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt == 0:
                    continue
                return Reply(0, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
            try:
                r = self._conn.getresponse()
                data = r.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:  # includes socket timeouts
                self.close()
                return Reply(0, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
            reply = Reply(r.status, data, {k.lower(): v for k, v in r.getheaders()}, time.perf_counter() - t0)
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return reply
        raise AssertionError("unreachable")

    def generate(self, **fields) -> Reply:
        return self.request("POST", "/generate", json.dumps(fields).encode(), {"Content-Type": "application/json"})

    def health(self) -> Reply:
        return self.request("GET", "/health")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    """Poll /health until it answers 200 (bounded by ``timeout``); return its JSON."""
    c = Client(url, timeout=5.0)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = c.health()
        if r.status == 200:
            c.close()
            return r.json()
        last = r.error or f"HTTP {r.status}"
        time.sleep(0.2)
    c.close()
    raise TimeoutError(f"{url}/health not ready after {timeout:.0f} s ({last})")
