"""The lean runtime's own overhead per image at 512² (goal: at most 2 ms), with stub engines.

    python benchmarks/runtime_overhead.py --engine-dir engines/demo-sd15 [--resolution 512x512] \\
        [--guidance 1 8] [--loop both] [--runs 30] [--out benchmarks/reports/runtime-overhead-512]

Any entry works (its tokenizers, scheduler and manifest are used; its engines are not): every engine is
replaced by one returning fixed arrays, so what is timed is tokenizing, scheduler arithmetic, host
copies, VAE input scaling and image conversion. ``--loop device`` times the GPU path's device loop the
same way, on a stub device whose copies cost nothing (its Python host work only). A measurement, not a
test. `lcm-export bench` records the host-loop figure in report.json as `runtime_overhead_stub`.

``--outside`` also measures it from outside with the entry's real engines (it must be an ONNX Runtime
entry): the wall time of a whole ``pipe(...)`` call minus the time spent inside
``onnxruntime.InferenceSession.run``, the way a user's profiler sees it (caches cold after each engine
call, ONNX Runtime's threads around, the wrapper's own work included).
``--out`` writes report.json (machine, versions, warm-up, runs, medians) and report.md there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcm_export._util import tool_versions, write_json, write_text
from lcm_export.bench.harness import machine_info
from lcm_export.bench.overhead import measure_overhead

WARMUP = 3


def outside(engine_dir: str, hw: tuple[int, int], runs: int, guidance: float) -> dict:
    """Wall time per image minus time inside InferenceSession.run (real engines), median of ``runs``."""
    import statistics
    import time

    import onnxruntime as ort

    from lcm_export.runtime import LCMPipeline

    pipe = LCMPipeline.from_engine_dir(engine_dir)
    if pipe.manifest["backend"] != "onnxruntime":
        raise SystemExit("--outside needs an ONNX Runtime entry (its engine calls are what is subtracted)")
    inside = [0.0]
    real = ort.InferenceSession.run

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            inside[0] += time.perf_counter() - t

    ort.InferenceSession.run = timed
    try:
        call = lambda: pipe("a photo of an astronaut riding a horse", guidance=guidance, height=hw[0], width=hw[1])  # noqa: E731
        for _ in range(WARMUP):
            call()
        out, own = [], []
        for _ in range(runs):
            inside[0] = 0.0
            t = time.perf_counter()
            call()
            out.append(time.perf_counter() - t - inside[0])
            own.append(pipe.last_timings.overhead)
    finally:
        ort.InferenceSession.run = real
    return {"loop": "host, real engines, measured from outside", "guidance": guidance, "resolution": f"{hw[0]}x{hw[1]}",
            "median_s": statistics.median(out), "runs_s": out, "in_project_median_s": statistics.median(own)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--loop", choices=("host", "device", "both"), default="both",
                    help="host: the CPU/host loop; device: the GPU device loop's Python host work (stub device)")
    ap.add_argument("--outside", action="store_true", help="also measure from outside with the entry's real (ONNX Runtime) engines")
    ap.add_argument("--out", help="folder for report.json and report.md")
    a = ap.parse_args()
    hw = tuple(int(v) for v in a.resolution.split("x"))
    results = []
    for guidance in a.guidance:
        for loop in ("host", "device") if a.loop == "both" else (a.loop,):
            r = measure_overhead(a.engine_dir, hw, runs=a.runs, warmup=WARMUP, guidance=guidance, device_loop=loop == "device")
            results.append(r)
            parts = ", ".join(f"{k[:-9]} {r[k] * 1e3:.2f}" for k in ("tokenize_median_s", "scheduler_median_s",
                                                                     "vae_input_median_s", "postprocess_median_s"))
            print(f"runtime overhead at {r['resolution']}, guidance {guidance:g}, {loop} loop: "
                  f"{r['median_s'] * 1e3:.2f} ms per image ({parts} ms)")
    outside_rows = []
    for guidance in a.guidance if a.outside else ():
        r = outside(a.engine_dir, hw, a.runs, guidance)
        outside_rows.append(r)
        print(f"from outside, real engines, guidance {guidance:g}: {r['median_s'] * 1e3:.2f} ms per image "
              f"(the pipeline's own Timings.overhead: {r['in_project_median_s'] * 1e3:.2f} ms)")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"what": "runtime overhead per 4-step image with stub engines (goal: at most 2 ms at 512x512)",
                  "engine_dir": str(a.engine_dir), "machine": machine_info(1), "versions": tool_versions("openvino"),
                  "warmup": WARMUP, "runs": a.runs, "statistic": "median", "results": results, "outside": outside_rows}
        write_json(out / "report.json", report)
        rows = "\n".join(f"| {r['loop']} | {r['guidance']:g} | {r['median_s'] * 1e3:.2f} | {r['tokenize_median_s'] * 1e3:.2f} | "
                         f"{r['scheduler_median_s'] * 1e3:.2f} | {r['vae_input_median_s'] * 1e3:.2f} | "
                         f"{r['postprocess_median_s'] * 1e3:.2f} |" for r in results)
        m = report["machine"]
        write_text(out / "report.md", f"# Runtime overhead at {a.resolution} (stub engines)\n\n"
                   f"Machine: {m['cpu']} ({m['cores']} cores), Python {m['python']}; {a.runs} images per row after "
                   f"{WARMUP} warm-up, medians in ms. Entry: `{a.engine_dir}` (its tokenizer, scheduler and manifest).\n\n"
                   "| loop | guidance | overhead | tokenize | scheduler | VAE input | postprocess |\n|---|---|---|---|---|---|---|\n"
                   f"{rows}\n\nHost loop: " + results[0]["method"] + ".\n\nDevice loop: "
                   + next((r["method"] for r in results if r["loop"] == "device"), "not measured") + ".\n"
                   + ("\nFrom outside, with the entry's real ONNX Runtime engines (wall time of `pipe(...)` minus the time "
                      "inside `InferenceSession.run`), medians in ms:\n\n| guidance | from outside | the pipeline's own "
                      "overhead figure |\n|---|---|---|\n" + "\n".join(
                          f"| {r['guidance']:g} | {r['median_s'] * 1e3:.2f} | {r['in_project_median_s'] * 1e3:.2f} |"
                          for r in outside_rows) + "\n" if outside_rows else ""))
        print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    main()
