"""``lcm-export serve``: start Ray (a local cluster, or join one), deploy ``LCMModel`` behind Ray
Serve's HTTP proxy, block until Ctrl-C / SIGTERM, shut down.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

APP_NAME = "lcm-export"
RETRY_AFTER_S = 1.0
MAX_BATCH_WAIT_MS = 1000.0
"""Longest a replica may wait for requests to merge: every request in a batch waits that long first,
so beyond a second it costs more latency than any merge saves."""


@dataclass(frozen=True)
class ServeOptions:
    engine_dir: str
    replicas: int = 1
    """Ray Serve replicas; each loads the entry once (memory: one entry per replica)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on; 0.0.0.0 exposes it to the network."""
    port: int = 8000
    max_ongoing_requests: int = 4
    """Requests a replica holds at once (being checked, waiting for the engine thread, or running)."""
    max_queued_requests: int | None = None
    """Requests waiting at the proxy when every replica is full; past it: 503 + Retry-After.
    Default: replicas × max_ongoing_requests."""
    max_batch_size: int | None = None
    """Images merged into one engine call; capped by the entry's built batch (default: that batch)."""
    batch_wait_ms: float = 5.0
    """How long a replica waits for more requests to merge (only when merging is possible)."""
    threads: int | None = None
    """Engine threads per replica (default: this machine's cores / replicas, at least 1)."""
    replica_cpus: float | None = None
    """Ray CPUs each replica reserves (default: its threads, at most cores / replicas); 0 lets
    replicas share CPUs freely."""
    address: str | None = None
    """An existing Ray cluster (``ray start --head``'s address, or ``auto``); default: start a local one."""
    proxy_location: str = "EveryNode"
    """Where Serve runs HTTP proxies: EveryNode (Ray's default) or HeadOnly (several Ray nodes on one
    machine, which would all bind the same port)."""


def check_options(o: ServeOptions) -> None:
    from ..store.manifest import read_manifest

    m = read_manifest(Path(o.engine_dir))  # one-line UserError if it is not a usable entry (a damaged one: no start)
    for name in ("replicas", "max_ongoing_requests"):
        if getattr(o, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be at least 1")
    if o.max_queued_requests is not None and o.max_queued_requests < 0:
        raise UserError(f"--max-queued-requests {o.max_queued_requests}: must be 0 or more")
    if o.max_batch_size is not None and o.max_batch_size < 1:
        raise UserError(f"--max-batch-size {o.max_batch_size}: must be at least 1")
    if o.max_batch_size is not None and o.max_batch_size > m["batch"]:
        raise UserError(f"--max-batch-size {o.max_batch_size}: {o.engine_dir} was built for batch {m['batch']}, the most "
                        f"images one engine call takes; use at most {m['batch']}, or rebuild it with --batch "
                        f"{min(o.max_batch_size, 64)}")
    if not (math.isfinite(o.batch_wait_ms) and 0 <= o.batch_wait_ms <= MAX_BATCH_WAIT_MS):
        raise UserError(f"--batch-wait-ms {o.batch_wait_ms:g}: must be a number from 0 to {MAX_BATCH_WAIT_MS:g}")
    if o.threads is not None and o.threads < 1:
        raise UserError(f"--threads {o.threads}: must be at least 1")
    if not 0 < o.port < 65536:
        raise UserError(f"--port {o.port}: must be 1-65535")


def _import_ray():
    try:
        import fastapi  # noqa: F401
        import ray
        from ray import serve
    except ImportError as exc:
        raise UserError(f"serving needs Ray Serve and FastAPI ({exc.name} is missing): pip install 'lcm-export[serve]'") from None
    return ray, serve


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def application(o: ServeOptions):
    """The bound Serve application for ``o`` (``serve.run`` it on a cluster with Serve started)."""
    from ray.serve.config import BackpressureConfig

    from .._cpu import usable_cores
    from .deployment import LCMModel

    threads = o.threads or max(1, usable_cores() // o.replicas)
    queued = o.max_queued_requests if o.max_queued_requests is not None else o.replicas * o.max_ongoing_requests
    cpus = o.replica_cpus if o.replica_cpus is not None else replica_cpus(threads, usable_cores(), o.replicas)
    return LCMModel.options(
        num_replicas=o.replicas, max_ongoing_requests=o.max_ongoing_requests, max_queued_requests=queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        ray_actor_options={"num_cpus": cpus}, max_constructor_retry_count=2,
    ).bind(str(Path(o.engine_dir).resolve()), threads, o.max_batch_size, o.batch_wait_ms / 1e3)


def replica_cpus(threads: int, cores: int, replicas: int) -> float:
    """Ray CPUs a replica reserves: its threads, but no more than a 1/replicas share of this machine's
    cores, so that every replica of a local cluster can be placed (Ray wants whole numbers above 1)."""
    share = min(float(threads), cores / replicas)
    return float(int(share)) if share >= 1 else int(share * 100) / 100  # rounded down: the shares must fit


def start(o: ServeOptions, name: str = APP_NAME, route_prefix: str = "/"):
    """Start (or join) Ray, start Serve's proxy on host:port and deploy; return the app's handle.
    Ray must not be initialised by the caller unless it already runs Serve on the same port."""
    check_options(o)
    ray, serve = _import_ray()
    init_ray(o)
    serve.start(proxy_location=o.proxy_location, http_options={"host": o.host, "port": o.port})
    try:
        return serve.run(application(o), name=name, route_prefix=route_prefix)
    except RuntimeError as exc:  # a replica's constructor failed (its UserError is inside the trace)
        raise UserError(f"the replicas could not load {o.engine_dir}: {replica_error(str(exc))}") from None


def guard_proxies(environ=os.environ) -> None:
    """Have Ray Serve's HTTP proxies started from ``environ`` (a Ray this process starts: its nodes
    inherit it) run ``guard.proxy_middlewares``: bodies read whole and bounded in size and time before a
    replica is involved, every error answer JSON. A callback the user set is left in place."""
    from .guard import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)


def init_ray(o: ServeOptions, **ray_options) -> None:
    """Start a local Ray (or join ``o.address``) unless Ray is initialised already; ``ray_options`` go
    to ``ray.init`` (tests: ``num_cpus``). A Ray joined with ``--address`` keeps its own proxies'
    settings: start its nodes with ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` set (README, Serving)."""
    ray, _ = _import_ray()
    if ray.is_initialized():
        return
    if o.address is None and not port_free(o.host, o.port):
        raise UserError(f"--port {o.port}: {o.host}:{o.port} is in use; pick another --port")
    if o.address is None:
        guard_proxies()
    ray.init(address=o.address, **{"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False,
                                    **ray_options})


def replica_error(trace: str) -> str:
    """The one-line lcm-export error inside a Ray deployment failure, else its last line."""
    for line in reversed(trace.splitlines()):
        for kind in ("UserError: ", "DamagedEntry: ", "EngineError: "):
            if kind in line:
                return line.split(kind, 1)[1].strip()
    lines = [l.strip() for l in trace.splitlines() if l.strip()]
    return (lines[-1][:300] if lines else "unknown error") + " (the replicas' tracebacks are in /tmp/ray/session_latest/logs/serve/)"


def serve_forever(o: ServeOptions) -> int:
    """``lcm-export serve``: run until Ctrl-C, SIGTERM or SIGHUP (the CLI turns those into
    KeyboardInterrupt), then shut Serve and the Ray it started down. Exit 0 on a requested stop."""
    ray, serve = _import_ray()
    started_ray = not ray.is_initialized()
    try:
        check_options(o)
        from .._stderr import release

        release()  # before Ray starts processes: they would inherit the spool as their stderr
        init_ray(o)
        _stop_on_signals()  # Ray's driver installs a handler that aborts on SIGTERM: put ours back
        start(o)
        url = f"http://{o.host}:{o.port}"
        print(f"serving {o.engine_dir} on {url} ({o.replicas} replica(s)); open {url}/ in a browser (the playground page); "
              f"POST {url}/generate, GET {url}/health, docs {url}/docs; logs under /tmp/ray/session_latest/logs/serve; Ctrl-C stops",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    finally:
        stop(started_ray)
    print("stopped", flush=True)
    return 0


def _stop_on_signals() -> None:
    """SIGTERM / SIGHUP / SIGINT raise KeyboardInterrupt in the main thread, so ``serve_forever``
    shuts Serve and Ray down instead of dying with them running."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def stop(shutdown_ray: bool = True) -> None:
    """Delete the applications and the proxy; stop Ray if we started it."""
    ray, serve = _import_ray()
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        if shutdown_ray:
            ray.shutdown()
