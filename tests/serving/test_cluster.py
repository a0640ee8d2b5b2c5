"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``), one replica on each; one replica process
is killed (SIGKILL) mid-load. Ray Serve restarts it; every request in flight completes or gets a 5xx,
none hangs; the ones lost (5xx) are counted and printed. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from lcm_export.serve.client import Client, wait_ready
from lcm_export.serve.load import drive

from .conftest import free_port

ray = pytest.importorskip("ray", reason="the [serve] extra (Ray Serve) is not installed")
pytestmark = [pytest.mark.serve, pytest.mark.slow]
LOCAL_ROUTING = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


@pytest.fixture(scope="module")
def two_node_server(tiny_entry):
    from ray.cluster_utils import Cluster

    from lcm_export.serve import ServeOptions, start, stop

    # One proxy (on the head) would send everything to its own node's replica while that one has room;
    # spread the load over both nodes, as one proxy per node behind a load balancer would.
    from lcm_export.serve.server import guard_proxies

    saved = os.environ.get(LOCAL_ROUTING)
    os.environ[LOCAL_ROUTING] = "0"  # read by the proxy, which inherits the nodes' environment
    guard_proxies()  # as `lcm-export serve` does for the Ray it starts
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(60)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        port = free_port()
        # one CPU per replica and one per node: Ray has to put one replica on each node;
        # one HTTP proxy (HeadOnly): both nodes share this machine's ports
        start(ServeOptions(str(tiny_entry), replicas=2, port=port, threads=1, replica_cpus=1, max_ongoing_requests=4,
                           max_queued_requests=64, proxy_location="HeadOnly"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        yield url
    finally:
        try:
            stop(shutdown_ray=True)
        finally:
            cluster.shutdown()
            if saved is None:
                os.environ.pop(LOCAL_ROUTING, None)
            else:
                os.environ[LOCAL_ROUTING] = saved


def replicas(url: str, want: int = 2, tries: int = 60) -> dict[int, str]:
    """{pid: node id} of the replicas answering /health (the router spreads calls; bounded tries)."""
    c = Client(url, timeout=10)
    seen: dict[int, str] = {}
    for _ in range(tries):
        r = c.health()
        if r.status == 200:
            rep = r.json()["replica"]
            seen[rep["pid"]] = rep["node_id"]
            if len(seen) >= want:
                break
        time.sleep(0.05)
    c.close()
    return seen


def test_replica_killed_mid_load_restarts_and_no_request_hangs(two_node_server, tmp_path):
    url = two_node_server
    before = replicas(url)
    assert len(before) == 2 and len(set(before.values())) == 2, f"replicas not spread over both nodes: {before}"
    victim = sorted(before)[0]

    done = [0]
    killed = threading.Event()
    lock = threading.Lock()

    def on_reply(i, r):
        with lock:
            done[0] += 1
            if done[0] == 16 and not killed.is_set():
                os.kill(victim, signal.SIGKILL)
                killed.set()

    res = drive(url, clients=4, requests=96, fields=lambda i: {"prompt": "load", "seed": i, "steps": 8},
                time_limit_s=120, timeout_s=60, on_reply=on_reply)
    counts = res.status_counts()
    lost = sum(v for k, v in counts.items() if k >= 500)
    report = {"requests": len(res.replies), "status_counts": counts, "lost_with_5xx": lost,
              "no_status": counts.get(0, 0), "unfinished_clients": res.unfinished_clients, "wall_s": round(res.wall_s, 2)}
    print(f"\nfault test: {json.dumps(report)}")
    (tmp_path / "fault.json").write_text(json.dumps(report))
    assert killed.is_set()
    assert res.unfinished_clients == 0, "a request hung"
    assert len(res.replies) == 96
    assert counts.get(0, 0) == 0, f"requests ended without an HTTP status: {[r.error for _, r in res.replies if r.status == 0]}"
    assert set(counts) <= {200, 500, 502, 503, 504}, counts
    for _, r in res.ok():
        assert r.body[:8] == b"\x89PNG\r\n\x1a\n"

    # Ray Serve restarts the killed replica (a new process); both answer again
    deadline = time.monotonic() + 90
    after: dict[int, str] = {}
    while time.monotonic() < deadline:
        after = replicas(url, tries=20)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(1)
    assert len(after) == 2 and victim not in after, f"no replacement replica: before {before}, after {after}"
    assert Client(url).generate(prompt="after the fault", seed=3).status == 200
