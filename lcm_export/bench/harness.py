"""Latency of the engine path (the lean runtime) against PyTorch baselines on the same fused model.

What is timed, per path: text encoder, each UNet step, VAE decode, end to end — median and p90
of ``runs`` after ``warmup`` untimed runs. Baselines: diffusers' StableDiffusionPipeline with
LCMScheduler at 4 steps, eager (fp32 on CPU, fp16 on GPU), torch.compile, torch.compile with CUDA graphs
(``reduce-overhead``; GPU only, reported as skipped elsewhere) and every module cast to bf16; the LCM-LoRA paper's Table 2 solvers (DDIM 32, DPM-Solver 16,
DPM-Solver++ 8, LCM 4) end to end; cold start (process start -> first image) of both stacks;
the FLOP count of one UNet step (torch's FlopCounterMode, attention included) against the matrix-product peak
of each path's own precision, measured in the same run (fp32 paths vs the fp32 peak, bf16 paths and bf16
engines vs the bf16 peak), each peak sized to take a couple of seconds; the runtime's own overhead at 512² with
stub engines. On a CPU without native bf16 (no AMX, no AVX512_BF16) bf16 is neither timed nor peak-measured: the
bf16 baseline is skipped and the bf16 peak listed as not measured, each with the reason (emulated bf16 takes
minutes and means nothing), and a reduced-precision engine is compared with the fp32 peak. Writes report.json,
report.md and PNG charts. A row that errors (a baseline, either cold start) keeps its error in the report and
in ``failures``: the run has failed (``lcm-export bench`` exits 1, the schema and check_report refuse it).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._cpu import usable_cores
from .._util import progress, tool_versions, write_json, write_text, writing
from .baselines import (BASELINES, NO_NATIVE_BF16, PROMPT, SOLVERS, bf16_emulated, measure_peak, reference_pipeline, stats,
                        time_baselines, time_solvers, unet_flops)
from ..errors import UserError
from ..store.manifest import read_manifest

STAGES = ("text_encoder", "unet_step", "vae_decoder", "end_to_end")
REPORT_SCHEMA = "lcm-export-bench/2"
"""2: ``failures`` (rows that errored; a report with any is refused), ``cold_start.skipped``, ``machine.flags``."""


@dataclass(frozen=True)
class BenchOptions:
    engine_dir: str
    baselines: tuple[str, ...] = ("eager",)
    solvers: tuple[str, ...] = ("lcm:4", "ddim:32", "dpm:16", "dpmpp:8")
    resolution: tuple[int, int] | None = None
    guidance: float = 1.0
    runs: int = 5
    warmup: int = 1
    solver_runs: int | None = None
    threads: int | None = None
    cold_start: bool = True
    out: str = "benchmarks/reports/latest"
    show_progress: bool = True


def engine_precision(precision: str, device: str, cpu_bf16: bool = True) -> str:
    """The peak an engine is measured against: its manifest precision; "mixed" (an fp32 VAE beside fp16
    engines) counts as the reduced precision of its device (fp16 on CUDA, bf16 on CPU), and so does an
    int8 entry: no int8 peak is measured yet, so its share of the bf16 peak may exceed 100 %. On a CPU
    without native bf16 (``cpu_bf16`` False) that bf16 is fp32: no bf16 peak is measured there (the backend
    runs such an entry's bf16 in fp32)."""
    if precision in ("fp32", "fp16"):
        return precision
    if device == "cuda" and precision != "bf16":
        return "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def parse_solvers(items) -> list[tuple[str, int]]:
    out = []
    for item in items:
        name, _, steps = item.partition(":")
        if name not in SOLVERS:
            raise UserError(f"--solvers {item!r}: unknown solver {name!r}; choose from {', '.join(SOLVERS)} as NAME:STEPS")
        try:
            n = int(steps)
        except ValueError:
            raise UserError(f"--solvers {item!r}: STEPS must be a positive integer (e.g. ddim:32)") from None
        if n < 1:
            raise UserError(f"--solvers {item!r}: STEPS must be a positive integer")
        out.append((name, n))
    return out


def _validate(o: BenchOptions, manifest: dict) -> tuple[int, int]:
    if o.runs < 1:
        raise UserError(f"--runs {o.runs}: must be at least 1")
    if o.warmup < 0:
        raise UserError(f"--warmup {o.warmup}: must be 0 or more")
    if o.solver_runs is not None and o.solver_runs < 1:
        raise UserError(f"--solver-runs {o.solver_runs}: must be at least 1")
    if o.threads is not None and o.threads < 1:
        raise UserError(f"--threads {o.threads}: must be at least 1")
    bad = [b for b in o.baselines if b not in BASELINES]
    if bad:
        raise UserError(f"--baselines {','.join(bad)}: unknown; choose from {', '.join(BASELINES)}")
    from ..runtime.validate import MAX_GUIDANCE

    if not (np.isfinite(o.guidance) and 0 <= o.guidance <= MAX_GUIDANCE):
        raise UserError(f"--guidance {o.guidance}: must be a number from 0 to {MAX_GUIDANCE:g} (the runtime's range)")
    res = [tuple(int(v) for v in r.split("x")) for r in manifest["resolutions"]]
    hw = tuple(o.resolution) if o.resolution else res[0]
    if hw not in res:
        raise UserError(f"--resolution {hw[0]}x{hw[1]} was not built into {o.engine_dir}; built: {', '.join(manifest['resolutions'])}")
    return hw


def median_time(fn, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, every time) of ``runs`` calls of ``fn`` after ``warmup`` untimed ones (the
    first call of a shape compiles kernels)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def machine_info(threads: int) -> dict:
    """The machine a figure was measured on: CPU name, its ISA and the speed-deciding flags (AMX and AVX512_BF16
    among them: two CPUs of one name can differ in both), cores, GPU."""
    from .._cpu import cpu_isa, cpu_name, recorded_flags, usable_cores

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu_name(), "isa": cpu_isa(), "flags": recorded_flags(), "cores": usable_cores(), "threads": threads, "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def _rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM (reset at exec, unlike ru_maxrss, which a child
    inherits from its parent on Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------
# Cold start: a fresh process each, from interpreter start to the first image

_LEAN_COLD = """
import json, sys, time
from lcm_export.bench.harness import _rss_mb
from lcm_export.runtime import LCMPipeline
pipe = LCMPipeline.from_engine_dir(sys.argv[1], threads=int(sys.argv[2]))
pipe(sys.argv[3], steps=4, guidance=float(sys.argv[4]), height=int(sys.argv[5]), width=int(sys.argv[6]))
print(json.dumps({"peak_rss_mb": _rss_mb(), "torch_loaded": "torch" in sys.modules}))
"""

_TORCH_COLD = """
import json, sys
import torch
from lcm_export.bench.harness import _rss_mb
torch.set_num_threads(int(sys.argv[2]))
import json as _j, pathlib
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
dtype = getattr(torch, sys.argv[8])
if "XL" in _j.loads(pathlib.Path(sys.argv[1], "model_index.json").read_text())["_class_name"]:
    pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=dtype)
else:
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
pipe = pipe.to(sys.argv[7])
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    pipe(sys.argv[3], num_inference_steps=4, guidance_scale=float(sys.argv[4]), height=int(sys.argv[5]), width=int(sys.argv[6]))
print(json.dumps({"peak_rss_mb": _rss_mb(), "loaded_dtypes": sorted({str(m.dtype).removeprefix("torch.") for m in pipe.components.values() if isinstance(m, torch.nn.Module)})}))
"""


def _nvidia_smi_used_mb() -> float | None:
    """GPU memory in use (MB) on device 0, without importing torch; None where there is no NVIDIA GPU."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
        return float(r.stdout.strip().splitlines()[0]) if r.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _cold(script: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return {"seconds": wall, **json.loads(r.stdout.strip().splitlines()[-1])}


def diffusers_cold_start(ref, threads: int, args: list[str]) -> dict:
    """diffusers' cold start on ``ref``'s device and dtype: ``ref`` saved to a temporary folder, then a fresh
    process loads it with that dtype, moves it to that device and makes one image. The dtype is explicit:
    without it transformers keeps the saved dtype (fp16 on CUDA) and diffusers loads fp32, and the mixed
    pipeline fails ("mat1 and mat2 must have the same dtype")."""
    param = next(ref.unet.parameters())
    device, dtype = param.device.type, str(param.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="lcm-export-bench-") as d:
        ref.save_pretrained(d, safe_serialization=True)
        row = _cold(_TORCH_COLD, [d, str(threads), *args, device, dtype])
    return {"device": device, "dtype": dtype, **row}


def failures(paths: dict, cold: dict) -> list[dict]:
    """Every row of the report that errored, as {"row", "error"}. A report with any is a failed run: bench
    exits 1, and the schema and ``benchmarks/check_report.py`` refuse it."""
    out = [{"row": f"paths.{n}", "error": p["error"]} for n, p in paths.items() if "error" in p]
    return out + [{"row": f"cold_start.{n}", "error": v["error"]} for n, v in cold.items() if isinstance(v, dict) and "error" in v]


# ----------------------------------------------------------------------------------------------

def run_bench(o: BenchOptions) -> dict:
    from ..runtime import LCMPipeline

    engine_dir = Path(o.engine_dir)
    manifest = read_manifest(engine_dir)
    hw = _validate(o, manifest)
    solvers = parse_solvers(o.solvers)
    threads = o.threads or usable_cores()
    solver_runs = o.solver_runs or o.runs
    batch = 1
    cfg_on = o.guidance > 1.0
    out = Path(o.out)
    n_torch = len(o.baselines) * (o.runs + o.warmup)
    total = (o.runs + o.warmup) + n_torch + len(solvers) * solver_runs + (2 if o.cold_start else 0) + 3
    bar = progress(total, "bench", enabled=o.show_progress)

    # 1. Engine path (lean runtime), before torch is imported, so its RSS is its own
    bar.set_description_str("engine")
    pipe = LCMPipeline.from_engine_dir(engine_dir, threads=threads)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, int(manifest.get("latent_channels", 4)), hw[0] // 8, hw[1] // 8), dtype=np.float32)
    for _ in range(o.warmup):
        pipe(PROMPT, steps=4, guidance=o.guidance, height=hw[0], width=hw[1], latents=latents)
        bar.update()
    rec = defaultdict(list)
    for _ in range(o.runs):
        pipe(PROMPT, steps=4, guidance=o.guidance, height=hw[0], width=hw[1], latents=latents)
        t = pipe.last_timings
        rec["text_encoder"].append(t.text_encoder)
        rec["unet_step"] += t.unet
        rec["vae_decoder"].append(t.vae_decoder)
        rec["end_to_end"].append(t.total)
        rec["runtime_overhead"].append(t.overhead)
        bar.update()
    paths = {"engine": {"label": f"engine ({manifest['backend']}, {manifest['precision']})",
                        "stages": {k: stats(v) for k, v in rec.items()}, "peak_rss_mb": _rss_mb()}}
    gpu_used = _nvidia_smi_used_mb()
    if gpu_used is not None:
        paths["engine"]["gpu_memory_used_mb"] = gpu_used
    engine_lcm4 = paths["engine"]["stages"]["end_to_end"]

    # 2. PyTorch baselines on the same fused model
    import torch

    torch.set_num_threads(threads)
    bar.set_description_str("load PyTorch reference")
    ref, sched_cfg = reference_pipeline(manifest, engine_dir)
    bar.update()
    flops = unet_flops(ref, 2 * batch if cfg_on else batch, hw)  # device-independent: counted in fp32 on CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        ref = ref.to("cuda", torch.float16)
    bar.update()
    cpu_bf16 = not bf16_emulated(device)  # on CUDA: True
    paths.update(time_baselines(ref, o.baselines, device, latents, hw, o.guidance, o.runs, o.warmup, bar, cpu_bf16=cpu_bf16))

    # 3. The paper's Table 2: solvers end to end (the model is warm from the eager baseline)
    table2 = time_solvers(ref, sched_cfg, solvers, latents, hw, o.guidance, solver_runs, bar)
    table2.append({"solver": "LCMScheduler", "steps": 4, "path": paths["engine"]["label"], **engine_lcm4})

    # 4. Cold start, each in a fresh process
    cold = {"skipped": "not measured: bench ran with --no-cold-start"}
    if o.cold_start:
        bar.set_description_str("cold start: lean runtime")
        args = [PROMPT, str(o.guidance), str(hw[0]), str(hw[1])]
        cold = {"engine": _cold(_LEAN_COLD, [str(engine_dir), str(threads), *args])}
        bar.update()
        bar.set_description_str("cold start: diffusers")
        cold["diffusers"] = diffusers_cold_start(ref, threads, args)
        bar.update()
        if "seconds" in cold["engine"] and "seconds" in cold["diffusers"]:
            cold["ratio"] = cold["diffusers"]["seconds"] / cold["engine"]["seconds"]

    # 5. FLOP/s against the peak of each path's own precision, measured now
    paths["engine"]["precision"] = engine_precision(manifest["precision"], device, cpu_bf16)
    needed = sorted({p["precision"] for p in paths.values() if "stages" in p} | {"fp32"})
    peaks_skipped = {}
    engine_bf16 = engine_precision(manifest["precision"], device) == "bf16"
    if not cpu_bf16 and ("bf16" in o.baselines or engine_bf16):
        peaks_skipped["bf16"] = NO_NATIVE_BF16 + (f"; the engine's {manifest['precision']} entry is compared with the fp32 peak"
                                                  if engine_bf16 else "")
    peaks = {}
    for prec in needed:
        bar.set_description_str(f"{prec} peak (matrix product)")
        peaks[prec] = measure_peak(threads, precision=prec, device=device)
    bar.update()
    bar.set_description_str("runtime overhead at 512x512 (stub engines)")
    from .overhead import measure_overhead

    overhead_stub = measure_overhead(engine_dir, (512, 512), runs=10, guidance=o.guidance)
    bar.close()
    flop = {"unet_step_flops": flops, "unet_batch": 2 * batch if cfg_on else batch, "peak": peaks["fp32"], "peaks": peaks,
            **({"peaks_skipped": peaks_skipped} if peaks_skipped else {})}
    for name, p in paths.items():
        if "stages" in p:
            fps = flops / p["stages"]["unet_step"]["median_s"]
            flop[name] = {"flops_per_s": fps, "precision": p["precision"],
                          "fraction_of_peak": fps / peaks[p["precision"]]["best_flops_per_s"]}

    ratios = {}
    eng = paths["engine"]["stages"]
    for name, p in paths.items():
        if name != "engine" and "stages" in p:
            ratios[name] = {s: p["stages"][s]["median_s"] / eng[s]["median_s"] for s in STAGES}

    report = {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "lcm-export " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("lcm-export") else None,
        "engine_dir": str(engine_dir),
        "model": {"family": manifest["family"], "base": manifest["base_source"], "demo": manifest.get("demo", False),
                  "loras": [{"file": Path(l["path"]).name, "weight": l["weight"]} for l in manifest["fusion"]["loras"]],
                  **({"note": "demo model with random weights: images are noise; timings are what matter"} if manifest.get("demo") else {})},
        "resolution": f"{hw[0]}x{hw[1]}", "guidance": o.guidance, "steps": 4, "batch": batch,
        "settings": {"runs": o.runs, "warmup": o.warmup, "solver_runs": solver_runs, "solver_warmup": 0,
                     "threads": threads, "statistic": "median and p90 over timed runs (UNet: over every step of every run)"},
        "machine": machine_info(threads),
        "versions": tool_versions("tensorrt", "openvino"),
        "engine": {"backend": manifest["backend"], "precision": manifest["precision"],
                   "settings": manifest.get(manifest["backend"])},  # the backend's own manifest section
        "paths": paths, "ratios": ratios, "solvers": table2, "cold_start": cold, "flops": flop,
        "runtime_overhead_stub": overhead_stub, "failures": failures(paths, cold),
    }
    e_unet = eng["unet_step"]["median_s"]
    parts = [f"engine UNet step {e_unet * 1e3:.1f} ms"]
    if "eager" in ratios:
        r = ratios["eager"]
        parts.append(f"{r['unet_step']:.2f}x eager's speed (end to end {r['end_to_end']:.2f}x)")
    if "reduce-overhead" in ratios:
        parts.append(f"{ratios['reduce-overhead']['unet_step']:.2f}x the CUDA-graph baseline's")
    parts.append(f"{flop['engine']['fraction_of_peak'] * 100:.0f}% of measured {flop['engine']['precision']} peak")
    report["summary_line"] = f"{report['resolution']}: " + ", ".join(parts)
    if report["failures"]:
        report["summary_line"] = f"FAILED ({', '.join(f['row'] for f in report['failures'])}) " + report["summary_line"]
    from .report import write_charts, write_markdown

    with writing(out):  # each file atomic; a failed write is the one-line disk error
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        write_charts(report, out)
        write_text(out / "report.md", write_markdown(report))
    return report
