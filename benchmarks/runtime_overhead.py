"""The lean runtime's own overhead per image at 512² (goal: at most 2 ms), with stub engines.

    python benchmarks/runtime_overhead.py --engine-dir engines/demo-sd15 [--resolution 512x512] [--guidance 1]

Any entry works (its tokenizers, scheduler and manifest are used; its engines are not): every engine is
replaced by one returning fixed arrays, so what is timed is tokenizing, scheduler arithmetic, host
copies, VAE input scaling and image conversion. A measurement, not a test. `lcm-export bench` records the
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
    a = ap.parse_args()
    hw = tuple(int(v) for v in a.resolution.split("x"))
    r = measure_overhead(a.engine_dir, hw, runs=a.runs, guidance=a.guidance)
    print(json.dumps(r, indent=1))
    parts = ", ".join(f"{k[:-9]} {r[k] * 1e3:.2f}" for k in ("tokenize_median_s", "scheduler_median_s", "vae_input_median_s",
                                                             "postprocess_median_s"))
    print(f"runtime overhead at {r['resolution']}: {r['median_s'] * 1e3:.2f} ms per image ({parts} ms)")


if __name__ == "__main__":
    main()
