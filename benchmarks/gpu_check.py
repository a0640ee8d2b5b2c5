"""GPU check: build TensorRT fp16 engines, check them against PyTorch fp16, time them.

For someone with an NVIDIA GPU and TensorRT (`pip install -e '.[build,dev,tensorrt]'
--extra-index-url https://pypi.nvidia.com`). Run from the repository root:

    python benchmarks/gpu_check.py [--models demo:sd15,demo:sd15-full] [--resolution 512x512] [--runs 10]

For each model it
  1. builds a TensorRT fp16 entry (engines/gpu-<model>) through `build_engine` (Polygraphy API),
  2. compares each TensorRT engine with the PyTorch fp16 module on CUDA on seeded inputs
     (rel-L2, max-abs), and a full 4-step image against diffusers fp16 with the same latents and
     step noise (PSNR),
  3. runs `lcm-export bench` (eager + torch.compile baselines, the solver comparison) and writes
     benchmarks/reports/gpu-<model>-<res>/ in the same report format as the CPU reports, with
     parity.json beside it.
Exit code 1 if a parity check fails (rel-L2 > 5e-2 for a component, or PSNR < 30 dB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), float(np.abs(a - b).max())


def component_parity(engine_dir: Path, hw) -> dict:
    import torch

    from lcm_export.bench_torch import reference_pipeline
    from lcm_export.export import _wrappers, sample_inputs
    from lcm_export.runtime.engines import load_engines
    from lcm_export.store import read_manifest

    m = read_manifest(engine_dir)
    engines = load_engines(m, engine_dir)
    ref, _ = reference_pipeline(m, engine_dir)
    ref = ref.to("cuda", torch.float16)
    mods = _wrappers(ref)
    plan = f"{hw[0]}x{hw[1]}"
    out = {}
    for comp, batch in (("text_encoder", 1), ("unet", 2), ("vae_decoder", 1)):
        feeds = sample_inputs(comp, ref, batch, hw, seed=3)
        eng = engines[comp].get(plan) or engines[comp].get("all") or next(iter(engines[comp].values()))
        got = eng.run(feeds)
        with torch.no_grad():
            args = [torch.from_numpy(v).cuda() for v in feeds.values()]
            args = [a.half() if a.is_floating_point() else a for a in args]
            want = mods[comp](*args).float().cpu().numpy()
        rel, mx = _rel(got, want)
        out[comp] = {"rel_l2": rel, "max_abs": mx, "finite": bool(np.isfinite(got).all())}
    return out


def image_parity(engine_dir: Path, hw) -> float:
    import torch
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    from lcm_export.bench_torch import reference_pipeline
    from lcm_export.runtime import LCMPipeline
    from lcm_export.store import read_manifest

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((1, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    noise = [rng.standard_normal(lat.shape, dtype=np.float32) for _ in range(3)]
    ours = LCMPipeline.from_engine_dir(engine_dir)("a photo", steps=4, latents=lat, step_noise=noise, output_type="np")
    ref, _ = reference_pipeline(read_manifest(engine_dir), engine_dir)
    ref = ref.to("cuda", torch.float16)
    queue = [torch.from_numpy(n).cuda().half() for n in noise]
    lcm_mod.randn_tensor = lambda *a, **k: queue.pop(0)
    theirs = ref("a photo", num_inference_steps=4, guidance_scale=1.0, latents=torch.from_numpy(lat).cuda().half(),
                 height=hw[0], width=hw[1], output_type="np").images
    mse = float(np.mean((ours.astype(np.float64) - theirs) ** 2))
    return 10 * np.log10(1 / max(mse, 1e-12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo:sd15,demo:sd15-full")
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    from lcm_export.bench import BenchOptions, run_bench
    from lcm_export.build_engine import BuildOptions, build_engine

    hw = tuple(int(v) for v in a.resolution.split("x"))
    ok = True
    for model in a.models.split(","):
        tag = model.replace("demo:", "demo-")
        d = Path("engines") / f"gpu-{tag}"
        r = build_engine(BuildOptions(base=model, resolutions=(hw,), backend="tensorrt", precision="fp16", engine_dir=str(d)))
        print(r.summary())
        par = {"components": component_parity(d, hw), "image_psnr_db_vs_diffusers_fp16": image_parity(d, hw)}
        out = Path("benchmarks/reports") / f"gpu-{tag}-{a.resolution}"
        rep = run_bench(BenchOptions(engine_dir=str(d), baselines=("eager", "compile"), resolution=hw, runs=a.runs,
                                     warmup=2, solver_runs=3, out=str(out)))
        (out / "parity.json").write_text(json.dumps(par, indent=2))
        print(rep["summary_line"], json.dumps(par))
        ok &= all(c["rel_l2"] <= 5e-2 and c["finite"] for c in par["components"].values())
        ok &= par["image_psnr_db_vs_diffusers_fp16"] >= 30
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
