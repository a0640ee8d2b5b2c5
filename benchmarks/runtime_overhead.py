"""The lean runtime's own overhead per image at 512² (goal: at most 2 ms), with stub engines.

    python benchmarks/runtime_overhead.py --engine-dir engines/demo-sd15 [--resolution 512x512] [--guidance 1] [--loop both]

Any entry works (its tokenizers, scheduler and manifest are used; its engines are not): every engine is
replaced by one returning fixed arrays, so what is timed is tokenizing, scheduler arithmetic, host
copies, VAE input scaling and image conversion. ``--loop device`` times the GPU path's device loop the
same way, on a stub device whose copies cost nothing (its Python host work only). A measurement, not a test. `lcm-export bench` records the
same figure in report.json as `runtime_overhead_stub`.
"""

from __future__ import annotations

import argparse
import json

from lcm_export.overhead import measure_overhead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--loop", choices=("host", "device", "both"), default="both",
                    help="host: the CPU/host loop; device: the GPU device loop's Python host work (stub device)")
    a = ap.parse_args()
    hw = tuple(int(v) for v in a.resolution.split("x"))
    for loop in ("host", "device") if a.loop == "both" else (a.loop,):
        r = measure_overhead(a.engine_dir, hw, runs=a.runs, guidance=a.guidance, device_loop=loop == "device")
        print(json.dumps(r, indent=1))
        parts = ", ".join(f"{k[:-9]} {r[k] * 1e3:.2f}" for k in ("tokenize_median_s", "scheduler_median_s", "vae_input_median_s",
                                                                 "postprocess_median_s"))
        print(f"runtime overhead at {r['resolution']}, {loop} loop: {r['median_s'] * 1e3:.2f} ms per image ({parts} ms)")


if __name__ == "__main__":
    main()
