"""GPU check: everything issue 13 measures, in one command, with or without TensorRT.

On a machine with an NVIDIA GPU (TensorRT optional: `pip install -e '.[build,dev,tensorrt]'
--extra-index-url https://pypi.nvidia.com`), from the repository root:

    python benchmarks/gpu_check.py [--models demo:sd15,demo:sd15-full] [--resolution 512x512] [--runs 10]

For each model it
  1. builds a TensorRT fp16 entry (engines/gpu-<model>) through `build_engine` (Polygraphy API);
  2. compares each TensorRT engine with the PyTorch fp16 module on CUDA on seeded inputs (rel-L2,
     max-abs), and a 4-step image against diffusers fp16 with the same latents and step noise (PSNR,
     through `lcm_export.builder.verify`, which restores what it patches), once with the latents kept on
     the GPU between steps (the device loop) and once with the host loop;
  3. runs `lcm-export bench` with the eager, torch.compile, CUDA-graph (reduce-overhead) and bf16
     baselines and writes benchmarks/reports/gpu-<model>-<res>/ in the standard report format.
Without TensorRT, steps 1-2 are skipped and say why, and the engine timed is chosen by `engine_to_time`:
ONNX Runtime on its CUDA provider (onnxruntime-gpu); on a CUDA machine without that provider none (an
ONNX Runtime CPU engine would time the host CPU against GPU baselines), and then step 3 is the PyTorch
side alone: the baselines and the paper's Table 2 solvers (DDIM 32, DPM-Solver 16, DPM-Solver++ 8,
LCM 4) on the GPU, in gpu_check.json. Without a GPU, an ONNX Runtime CPU entry against the CPU baselines.
Which parts ran is printed, written to gpu_check.json beside the report, and added to report.json as
"gpu_check". Exit code 1 if a parity check that ran fails (rel-L2 > 5e-2 for a component, or PSNR < 30 dB)
or a bench row errored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BASELINES = ("eager", "compile", "reduce-overhead", "bf16")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), float(np.abs(a - b).max())


def reference(engine_dir: Path, device: str):
    import torch

    from lcm_export.bench.baselines import reference_pipeline
    from lcm_export.store.manifest import read_manifest

    ref, sched = reference_pipeline(read_manifest(engine_dir), engine_dir)
    return (ref.to(device, torch.float16) if device == "cuda" else ref), sched


def component_parity(engine_dir: Path, hw, ref) -> dict:
    import torch

    from lcm_export.builder.components import sample_inputs, wrappers as _wrappers
    from lcm_export.runtime.engines import load_engines
    from lcm_export.store.manifest import read_manifest

    engines = load_engines(read_manifest(engine_dir), engine_dir)
    param = next(ref.unet.parameters())
    mods, plan, out = _wrappers(ref), f"{hw[0]}x{hw[1]}", {}
    for comp, batch in (("text_encoder", 1), ("unet", 2), ("vae_decoder", 1)):
        feeds = sample_inputs(comp, ref, batch, hw, seed=3)
        eng = engines[comp].get(plan) or engines[comp].get("all") or next(iter(engines[comp].values()))
        got = eng.run(feeds)
        with torch.no_grad():
            args = [torch.from_numpy(v).to(param.device) for v in feeds.values()]
            args = [a.to(param.dtype) if a.is_floating_point() else a for a in args]
            want = mods[comp](*args).float().cpu().numpy()
        rel, mx = _rel(got, want)
        out[comp] = {"rel_l2": rel, "max_abs": mx, "finite": bool(np.isfinite(got).all())}
    return out


def image_parity(engine_dir: Path, hw, ref, sched_cfg: dict) -> dict:
    """PSNR of the entry's 4-step image against diffusers (same latents and step noise), with the
    latents kept on the GPU between steps (the device loop, where the entry has LCM step engines) and
    with the host loop; diffusers' noise function and scheduler are restored by ``diffusers_images``."""
    from lcm_export.builder.verify import PROMPT, diffusers_images, psnr, seeded_inputs
    from lcm_export.runtime import LCMPipeline
    from lcm_export.runtime.device_loop import device_loop_for

    runtime = LCMPipeline.from_engine_dir(engine_dir)
    latents, noise = seeded_inputs(runtime.latent_channels, hw, 4, seed=0)
    want = diffusers_images(ref, PROMPT, 4, 1.0, latents, noise, sched_cfg)
    unet, vae = runtime._plan_for("unet", *hw), runtime._plan_for("vae_decoder", *hw)
    out = {"device_loop": device_loop_for(unet, False, vae) is not None}
    for loop in ("device", "host"):
        runtime.device_loop = loop == "device"
        ours = runtime(PROMPT, steps=4, latents=latents, step_noise=noise, height=hw[0], width=hw[1], output_type="np")
        out[f"psnr_db_{loop}_loop"] = psnr(ours, want)
    return out


def availability() -> dict:
    """What `engine_to_time` decides from, found on this machine."""
    import torch

    from lcm_export.backends.onnxruntime import cuda_available
    from lcm_export.backends.tensorrt import tensorrt_status

    return {"cuda": torch.cuda.is_available(), "tensorrt": tensorrt_status(), "ort_cuda": cuda_available()}


def engine_to_time(cuda: bool, tensorrt: tuple[bool, str], ort_cuda: bool) -> tuple[str | None, str]:
    """(backend to build and time, or None; why). Pure: ``tensorrt`` is (usable, reason), ``ort_cuda`` whether
    onnxruntime has its CUDAExecutionProvider. On a CUDA machine an engine must run on the GPU to be compared
    with the GPU baselines: an ONNX Runtime CPU engine there timed the host CPU (9 s per 512² image on an H200
    machine), so with neither TensorRT nor the CUDA provider no engine is timed."""
    trt_ok, trt_why = tensorrt
    if trt_ok:
        return "tensorrt", "TensorRT fp16 engines on the GPU"
    if cuda and ort_cuda:
        return "onnxruntime", f"{trt_why}: ONNX Runtime fp32 on its CUDA provider instead"
    if cuda:
        return None, (f"{trt_why} and onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu): an engine would run on "
                      "the CPU, not comparable with the GPU baselines; the PyTorch baselines and solvers alone were timed")
    return "onnxruntime", f"{trt_why}; no CUDA GPU: ONNX Runtime fp32 on the CPU against the CPU baselines"


def baselines_only(model: str, hw, runs: int, baselines, solver_runs: int, device: str) -> dict:
    """The PyTorch side without an engine: each baseline and the Table 2 solvers on ``device`` (fp16 on CUDA)."""
    import torch

    from lcm_export._util import progress
    from lcm_export.bench.harness import BenchOptions, failures, parse_solvers
    from lcm_export.bench.baselines import base_pipeline, baseline_setup, time_baselines, time_solvers

    ref, sched = base_pipeline(model)
    ref = ref.to(device, getattr(torch, baseline_setup("eager", device)["dtype"]))
    solvers = parse_solvers(BenchOptions(engine_dir="").solvers)  # the bench defaults: the paper's Table 2
    latents = np.random.default_rng(0).standard_normal((1, ref.unet.config.in_channels, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    bar = progress(len(baselines) * (runs + 2) + len(solvers) * solver_runs, "PyTorch baselines")
    paths = time_baselines(ref, baselines, device, latents, hw, 1.0, runs, 2, bar)
    table2 = time_solvers(ref, sched, solvers, latents, hw, 1.0, solver_runs, bar)
    bar.close()
    return {"paths": paths, "solvers": table2, "failures": failures(paths, {})}


def _print_torch_side(t: dict) -> None:
    for p in t["paths"].values():
        if "stages" in p:
            print(f"  {p['label']}: UNet step {p['stages']['unet_step']['median_s'] * 1e3:.1f} ms, "
                  f"end to end {p['stages']['end_to_end']['median_s']:.3f} s (median)")
    for row in t["solvers"]:
        print(f"  {row['solver']} {row['steps']} steps ({row['path']}): {row['median_s']:.3f} s (median)")


def check_model(model: str, hw, runs: int, parts: dict, avail: dict | None = None, baselines=BASELINES,
                solver_runs: int = 3, reports: Path = Path("benchmarks/reports")) -> bool:
    import torch

    from lcm_export._cpu import usable_cores
    from lcm_export._util import tool_versions, write_json
    from lcm_export.bench.harness import BenchOptions, machine_info, run_bench
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag, res = model.replace("demo:", "demo-"), f"{hw[0]}x{hw[1]}"
    backend, why = engine_to_time(**(avail or availability()))
    ok, par, rep = True, {}, None
    out = reports / f"gpu-{tag}-{res}"
    if backend == "tensorrt":
        d = Path("engines") / f"gpu-{tag}"
        print(build_engine(BuildOptions(base=model, resolutions=(hw,), backend="tensorrt", precision="fp16", engine_dir=str(d))).summary())
        parts["tensorrt build"] = {"ran": True}
        ref, sched = reference(d, device)
        image = image_parity(d, hw, ref, sched)
        par = {"components": component_parity(d, hw, ref), "image_vs_diffusers": image}
        del ref
        parts["tensorrt parity"] = {"ran": True}
        parts["device loop (latents on the GPU)"] = {"ran": image["device_loop"], **({} if image["device_loop"] else
                                                     {"why": "the entry has no LCM step engines"})}
        ok = all(c["rel_l2"] <= 5e-2 and c["finite"] for c in par["components"].values()) and \
            min(image["psnr_db_device_loop"], image["psnr_db_host_loop"]) >= 30
    else:
        for p in ("tensorrt build", "tensorrt parity", "device loop (latents on the GPU)"):
            parts[p] = {"ran": False, "why": why}
    if backend is None:
        parts["bench engine"] = {"ran": False, "why": why}
        torch_side = baselines_only(model, hw, runs, baselines, solver_runs, device)
        paths, fails = torch_side["paths"], torch_side["failures"]
    else:
        if backend == "onnxruntime":
            d = Path("engines") / f"gpu-{tag}-onnxruntime"
            print(build_engine(BuildOptions(base=model, resolutions=(hw,), backend="onnxruntime", precision="fp32", engine_dir=str(d))).summary())
        rep = run_bench(BenchOptions(engine_dir=str(d), baselines=tuple(baselines), resolution=hw, runs=runs, warmup=2,
                                     solver_runs=solver_runs, out=str(out)))
        paths, fails = rep["paths"], rep["failures"]
        parts["bench engine"] = {"ran": True, "backend": rep["engine"]["backend"], "device": device, "why": why}
    for b in baselines:
        p = paths[b]
        parts[f"bench {b}"] = {"ran": "stages" in p, **({"why": p.get("skipped") or p.get("error")} if "stages" not in p else {})}
    summary = {"model": model, "resolution": res, "device": device, "engine": {"backend": backend, "why": why}, "parts": parts,
               **({"parity": par} if par else {})}
    if rep is None:  # no bench report: the figures themselves, with the machine and versions they come from
        summary |= {"machine": machine_info(usable_cores()), "versions": tool_versions(), **torch_side}
        out.mkdir(parents=True, exist_ok=True)
        _print_torch_side(torch_side)
    else:
        write_json(out / "report.json", {**rep, "gpu_check": summary})
        print(rep["summary_line"])
    write_json(out / "gpu_check.json", summary)
    for name, p in parts.items():
        print(f"  {name}: {'ran' if p['ran'] else 'skipped — ' + str(p.get('why'))}")
    for f in fails:
        print(f"  FAILED {f['row']}: {f['error']}")
    return ok and not fails


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo:sd15,demo:sd15-full")
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    hw = tuple(int(v) for v in a.resolution.split("x"))
    ok = True
    for model in a.models.split(","):
        ok &= check_model(model, hw, a.runs, {})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
