"""`lcm-export serve` under load: throughput and p50/p95 latency against concurrency, and the server's
overhead over a direct runtime call. Localhost only; every level is bounded in requests and time.

    python benchmarks/serve_bench.py --engine-dir engines/demo-sd15 --out benchmarks/reports/serve-tiny

1. Direct: ``LCMPipeline(prompt, seed=i)`` in this process, with the threads a replica gets (p50, and
   p50 including the PNG encoding the server also does).
2. Starts a local Ray cluster + Serve (``--replicas``, ``--max-batch-size``), waits for /health, warms up.
3. For each concurrency C: C client threads share ``--requests`` POST /generate (distinct seeds) with a
   time limit per level. Throughput = 200s / wall time; latency = client-side, per request.
4. Overhead = server p50 at concurrency 1 - direct p50; also the paired figure, p50 of (client latency
   - the replica's engine-call time from the X-Runtime-Ms header).
Writes report.json, report.md and throughput.png to --out. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path


def direct(engine_dir: str, threads: int, runs: int, fields: dict) -> dict:
    from lcm_export.runtime import LCMPipeline
    from lcm_export.serve.load import percentile

    pipe = LCMPipeline.from_engine_dir(engine_dir, threads)
    call = {k: v for k, v in fields.items() if k != "response_format"}
    for i in range(3):
        pipe(**call, seed=10_000 + i)
    plain, with_png = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        imgs = pipe(**call, seed=i)
        t1 = time.perf_counter()
        imgs[0].save(io.BytesIO(), format="PNG")
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        with_png.append(t2 - t0)
    plain.sort()
    with_png.sort()
    return {"runs": runs, "threads": threads, "p50_s": percentile(plain, 50), "p95_s": percentile(plain, 95),
            "with_png_p50_s": percentile(with_png, 50), "throughput_rps": 1 / percentile(plain, 50)}


def interleaved(pipe, url: str, fields: dict, runs: int) -> dict:
    """Direct call and one server request, alternating (same minutes, same machine load): p50 of each
    and p50 of the per-pair difference. Also GET /health (the HTTP + Ray round trip alone)."""
    from lcm_export.serve.client import Client
    from lcm_export.serve.load import percentile

    c = Client(url, timeout=120)
    call = {k: v for k, v in fields.items() if k != "response_format"}
    direct_s, served_s, diff_s, runtime_s, health_s = [], [], [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        pipe(**call, seed=50_000 + i)
        d = time.perf_counter() - t0
        r = c.generate(**fields, seed=50_000 + i)
        assert r.status == 200, r.body[:200]
        direct_s.append(d)
        served_s.append(r.seconds)
        diff_s.append(r.seconds - d)
        runtime_s.append(float(r.headers["x-runtime-ms"]) / 1e3)
        health_s.append(c.health().seconds)
    c.close()
    p = lambda v: percentile(sorted(v), 50)  # noqa: E731
    return {"runs": runs, "direct_p50_s": p(direct_s), "served_p50_s": p(served_s), "pair_diff_p50_s": p(diff_s),
            "replica_engine_call_p50_s": p(runtime_s), "served_minus_engine_call_p50_s": p([a - b for a, b in zip(served_s, runtime_s)]),
            "health_roundtrip_p50_s": p(health_s)}


def chart(levels: list[dict], direct_r: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [lv["clients"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(c, [lv["throughput_rps"] for lv in levels], "o-", label="server")
    a1.axhline(direct_r["throughput_rps"], color="gray", ls="--", label="direct calls, one after another")
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("images / s")
    a1.set_xscale("log", base=2)
    a1.legend()
    a1.set_title("throughput")
    a2.plot(c, [lv["latency_p50_s"] * 1e3 for lv in levels], "o-", label="p50")
    a2.plot(c, [lv["latency_p95_s"] * 1e3 for lv in levels], "s-", label="p95")
    a2.axhline(direct_r["p50_s"] * 1e3, color="gray", ls="--", label="direct call p50")
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("latency (ms)")
    a2.set_xscale("log", base=2)
    a2.legend()
    a2.set_title("latency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    d, o = r["direct"], r["overhead"]
    lines = [
        f"# Serving benchmark: {r['engine_dir']}", "",
        f"{r['machine']} · {r['options']['replicas']} replica(s) × {r['options']['threads']} thread(s) · "
        f"max batch {r['options']['max_batch_size']} (entry built for {r['entry_batch']}) · "
        f"{r['fields']['width']}x{r['fields']['height']}, {r['fields']['steps']} steps, guidance {r['fields']['guidance']} · "
        f"{r['date']}", "",
        f"Direct runtime call (same process, {d['threads']} thread(s)): p50 {d['p50_s'] * 1e3:.2f} ms, "
        f"with PNG encoding {d['with_png_p50_s'] * 1e3:.2f} ms ({d['runs']} runs).", "",
        f"**Server overhead over a direct call, interleaved (direct call, then one request, {r['interleaved']['runs']} "
        f"times): p50 {r['interleaved']['served_p50_s'] * 1e3:.2f} ms served vs {r['interleaved']['direct_p50_s'] * 1e3:.2f} ms "
        f"direct = {(r['interleaved']['served_p50_s'] - r['interleaved']['direct_p50_s']) * 1e3:.2f} ms** (p50 of the "
        f"per-pair difference {r['interleaved']['pair_diff_p50_s'] * 1e3:.2f} ms). Target: at most 10 ms. Outside the "
        f"replica's engine call: {r['interleaved']['served_minus_engine_call_p50_s'] * 1e3:.2f} ms p50 (HTTP, proxy, Ray "
        f"actor call, FastAPI, checks, PNG encoding); a bare GET /health round trip: "
        f"{r['interleaved']['health_roundtrip_p50_s'] * 1e3:.2f} ms.", "",
        f"Before the server started (separate phases): direct p50 {d['p50_s'] * 1e3:.2f} ms; server at 1 client "
        f"p50 − that = {o['p50_vs_direct_s'] * 1e3:.2f} ms.", "",
        "| clients | requests | ok | statuses | throughput (img/s) | p50 (ms) | p95 (ms) | engine call p50 (ms) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for lv in r["levels"]:
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['ok']} | {lv['status_counts']} | {lv['throughput_rps']:.1f} | "
                     f"{lv['latency_p50_s'] * 1e3:.1f} | {lv['latency_p95_s'] * 1e3:.1f} | {lv['engine_call_p50_s'] * 1e3:.1f} |")
    lines += ["", "![throughput and latency against concurrency](throughput.png)", ""]
    if r.get("notes"):
        lines += [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--concurrency", default="1,2,4,8", help="client counts, comma-separated")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level (bounded)")
    ap.add_argument("--time-limit-s", type=float, default=60.0, help="no new request after this, per level")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    ap.add_argument("--direct-runs", type=int, default=30)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="engine threads per replica (default: cores / replicas)")
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-ongoing-requests", type=int, default=8)
    ap.add_argument("--resolution", default=None, help="HxW (default: the entry's default)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    a = ap.parse_args()

    from lcm_export._cpu import cpu_name, usable_cores
    from lcm_export._util import write_json, write_text
    from lcm_export.serve import ServeOptions, start, stop
    from lcm_export.serve.client import wait_ready
    from lcm_export.serve.load import drive
    from lcm_export.store.manifest import read_manifest

    m = read_manifest(Path(a.engine_dir))
    h, w = (int(v) for v in (a.resolution or m["resolutions"][0]).split("x"))
    fields = {"prompt": "a photo of an astronaut riding a horse", "steps": a.steps, "guidance": a.guidance,
              "height": h, "width": w}
    threads = a.threads or max(1, usable_cores() // a.replicas)
    print(f"direct runtime calls ({a.direct_runs}) ...", flush=True)
    d = direct(a.engine_dir, threads, a.direct_runs, fields)
    print(f"  p50 {d['p50_s'] * 1e3:.2f} ms", flush=True)

    port = a.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    opts = ServeOptions(engine_dir=a.engine_dir, replicas=a.replicas, port=port, threads=threads,
                        max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=1000,
                        max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms, replica_cpus=0)
    url = f"http://127.0.0.1:{port}"
    levels = []
    try:
        t0 = time.perf_counter()
        start(opts)
        health = wait_ready(url, 120)
        print(f"server up in {time.perf_counter() - t0:.1f} s: {health['backend']} {health['precision']}, "
              f"max batch {health['max_batch_size']}", flush=True)
        drive(url, 2, 8, lambda i: {**fields, "seed": 90_000 + i}, 60, a.timeout_s)  # warm-up
        from lcm_export.runtime import LCMPipeline

        pipe = LCMPipeline.from_engine_dir(a.engine_dir, threads)
        pipe(**{k: v for k, v in fields.items()}, seed=1)
        pairs = interleaved(pipe, url, fields, a.direct_runs)
        del pipe
        print(f"  interleaved: direct p50 {pairs['direct_p50_s'] * 1e3:.2f} ms, served p50 {pairs['served_p50_s'] * 1e3:.2f} ms, "
              f"pair difference p50 {pairs['pair_diff_p50_s'] * 1e3:.2f} ms, /health {pairs['health_roundtrip_p50_s'] * 1e3:.2f} ms",
              flush=True)
        for c in [int(v) for v in a.concurrency.split(",")]:
            res = drive(url, c, a.requests, lambda i, c=c: {**fields, "seed": c * 1000 + i}, a.time_limit_s, a.timeout_s)
            lv = res.summary()
            levels.append(lv)
            print(f"  {c} clients: {lv['ok']}/{lv['requests']} ok {lv['status_counts']}, {lv['throughput_rps']:.1f} img/s, "
                  f"p50 {lv['latency_p50_s'] * 1e3:.1f} ms, p95 {lv['latency_p95_s'] * 1e3:.1f} ms", flush=True)
    finally:
        stop()

    one = next((lv for lv in levels if lv["clients"] == 1), levels[0])
    report = {
        "engine_dir": a.engine_dir, "entry": {k: m.get(k) for k in ("family", "backend", "resolutions", "batch", "guidance")},
        "entry_batch": int(m.get("batch", 1)), "machine": f"{cpu_name()}, {usable_cores()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "fields": fields,
        "options": {"replicas": a.replicas, "threads": threads, "max_batch_size": health["max_batch_size"],
                    "batch_wait_ms": a.batch_wait_ms, "max_ongoing_requests": a.max_ongoing_requests},
        "direct": d, "levels": levels,
        "overhead": {"p50_vs_direct_s": one["latency_p50_s"] - d["p50_s"],
                     "p50_vs_direct_with_png_s": one["latency_p50_s"] - d["with_png_p50_s"],
                     "paired_p50_s": one["client_minus_engine_call_p50_s"]},
        "interleaved": pairs,
        "notes": a.note, "command": " ".join(sys.argv),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    chart(levels, d, out / "throughput.png", f"lcm-export serve: {Path(a.engine_dir).name}, {w}x{h}")
    print(f"overhead p50 (interleaved) {(pairs['served_p50_s'] - pairs['direct_p50_s']) * 1e3:.2f} ms; "
          f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
