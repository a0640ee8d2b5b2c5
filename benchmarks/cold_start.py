"""Cold start of the lean runtime against one warm generate (the bf16 issue's target: cold ≤ 1.5× warm).

Cold: a fresh process (as `lcm-export bench` measures it: interpreter start, import, loading the
entry, one 4-step image), `--runs` times, files in the page cache after the first. Warm: in one
process, after one untimed image, the median of `--runs` images. Also the load alone (from_engine_dir)
in the warm process. Writes report.json and report.md.

Usage: python benchmarks/cold_start.py --engine-dir DIR --resolutions 256x256,512x512 [--runs 3] --out DIR
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--resolutions", default="256x256,512x512")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from lcm_export._util import tool_versions, write_json, write_text
    from lcm_export.bench.harness import _LEAN_COLD, _cold, machine_info
    from lcm_export.bench.baselines import PROMPT
    from lcm_export.runtime import LCMPipeline

    threads = len(os.sched_getaffinity(0))
    rows = []
    for res in a.resolutions.split(","):
        h, w = (int(v) for v in res.split("x"))
        cold = [_cold(_LEAN_COLD, [a.engine_dir, str(threads), PROMPT, "1.0", str(h), str(w)]) for _ in range(a.runs)]
        bad = [c["error"] for c in cold if "error" in c]
        if bad:
            raise SystemExit(f"cold start failed: {bad[0]}")
        t0 = time.perf_counter()
        pipe = LCMPipeline.from_engine_dir(a.engine_dir, threads=threads)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe(PROMPT, steps=4, height=h, width=w)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            pipe(PROMPT, steps=4, height=h, width=w)
            warm.append(time.perf_counter() - t0)
        del pipe
        c, wm = float(np.median([x["seconds"] for x in cold])), float(np.median(warm))
        rows.append({"resolution": res, "cold_s": [x["seconds"] for x in cold], "cold_median_s": c, "warm_s": warm,
                     "warm_median_s": wm, "ratio": c / wm, "load_s": load, "first_image_s": first,
                     "cold_peak_rss_mb": max(x["peak_rss_mb"] for x in cold)})
        print(f"{res}: cold {c:.2f} s, warm {wm:.2f} s, ratio {c / wm:.2f} (load {load:.2f} s, first image {first:.2f} s)", flush=True)
    from lcm_export.store.manifest import read_manifest

    m = read_manifest(a.engine_dir)
    rep = {"schema": "lcm-export-cold-start/1", "entry": str(a.engine_dir), "backend": m["backend"], "precision": m["precision"],
           "model": m["base_source"], "runs": a.runs, "machine": machine_info(threads), "versions": tool_versions("openvino"),
           "results": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", rep)
    lines = [f"# Cold start vs warm generate — {m['base_source']}, {m['backend']} {m['precision']}", "",
             f"{rep['machine']['cpu']}, {threads} threads. Cold: a fresh process (interpreter, imports, loading the entry, one "
             f"4-step image), median of {a.runs}, files in the page cache. Warm: median of {a.runs} images after one untimed one.", "",
             "| resolution | cold s | warm s | cold / warm | load s | first image in a process s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['cold_median_s']:.2f} | {r['warm_median_s']:.2f} | {r['ratio']:.2f} | "
                     f"{r['load_s']:.2f} | {r['first_image_s']:.2f} |")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}.", ""]
    write_text(out / "report.md", "\n".join(lines))


if __name__ == "__main__":
    main()
