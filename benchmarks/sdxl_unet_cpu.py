"""SDXL-config UNet on CPU, one UNet step: engines (ONNX Runtime fp32, OpenVINO bf16) against PyTorch
eager in fp32 and with the module cast to bf16, at 512² and/or 1024².

Why the UNet alone: the SDXL-base configs in fp32 are 10.3 GB (UNet) + 2.8 GB (text encoder 2) +
0.8 GB; by estimate, export, ONNX Runtime's optimized copy and a PyTorch baseline in one process would
not fit a 24 GB machine (not attempted), and the UNet is where the time goes (4 steps vs one text-encoder and one VAE call).
So each stage runs in its own process: export (seeded random weights = `demo:sdxl-full`'s UNet),
ORT timing, PyTorch timing; the parent compares the two outputs on the same inputs.

Usage: python benchmarks/sdxl_unet_cpu.py [--resolutions 512x512,1024x1024] [--paths ort,eager,ov-bf16,torch-bf16]
       [--runs 3] [--work DIR] [--out DIR]
bf16 paths run only where the CPU has native bf16 (AMX / AVX512_BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT_DIM, POOLED = 2048, 1280


def _unet():
    import torch
    from diffusers import UNet2DConditionModel

    from lcm_export.sources.demo import demo_configs

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same seed build_demo_pipeline("sdxl-full") uses for the UNet
        unet = UNet2DConditionModel(**demo_configs("sdxl-full", 0)["unet"])
    return unet.eval()


def _inputs(hw):
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((1, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32),
            "timestep": np.array([999.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, TEXT_DIM), dtype=np.float32),
            "text_embeds": rng.standard_normal((1, POOLED), dtype=np.float32),
            "time_ids": np.array([[hw[0], hw[1], 0, 0, hw[0], hw[1]]], np.float32)}


def stage_export(work: Path):
    """Export the UNet (lcm_export's exporter) and store the ORT_ENABLE_ALL graph, as build-engine does."""
    import types

    from lcm_export.backends.onnxruntime import optimize_graph
    from lcm_export.builder.export import export_component

    t0 = time.perf_counter()
    reused = (work / "onnx" / "unet" / "model.onnx.data").exists()  # an earlier run's export
    if not reused:
        unet = _unet()
        # export_component needs a pipeline-like object: the UNet plus the widths of the SDXL text encoders
        te2 = types.SimpleNamespace(config=types.SimpleNamespace(projection_dim=POOLED, hidden_size=1280))
        te1 = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=768))
        pipe = types.SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2, vae=None,
                                     tokenizer=types.SimpleNamespace(bos_token_id=0))
        export_component("unet", pipe, work / "onnx", (512, 512))
        del unet, pipe
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = optimize_graph(work / "onnx" / "unet" / "model.onnx", work / "ort" / "model.onnx", "cpu")
    print(json.dumps({"export_s": t_export, "ort_optimize_s": time.perf_counter() - t0, "ort": info, "export_reused": reused}))


def _time(fn, runs):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return out, first, ts


def stage_ort(work: Path, hw, runs: int, threads: int):
    import onnxruntime as ort

    from lcm_export.backends.onnxruntime import OrtEngine

    t0 = time.perf_counter()
    eng = OrtEngine(work / "ort" / "model.onnx", ["CPUExecutionProvider"], threads, "ORT_DISABLE_ALL")
    load = time.perf_counter() - t0
    out, first, ts = _time(lambda: eng.run(_inputs(hw)), runs)
    np.save(work / f"ort-{hw[0]}.npy", out)
    print(json.dumps({"session_create_s": load, "first_s": first, "runs_s": ts, "onnxruntime": ort.__version__}))


def stage_ov(work: Path, hw, runs: int, threads: int):
    """OpenVINO bf16 from the same exported ONNX, compiled as build-engine's openvino backend does."""
    import openvino as ov

    from lcm_export.backends.openvino import compile_config

    t0 = time.perf_counter()
    core = ov.Core()
    compiled = core.compile_model(str(work / "onnx" / "unet" / "model.onnx"), "CPU", compile_config("bf16", threads))
    req = compiled.create_infer_request()
    load = time.perf_counter() - t0
    out, first, ts = _time(lambda: np.asarray(req.infer(_inputs(hw))[compiled.outputs[0]]), runs)
    np.save(work / f"ov-bf16-{hw[0]}.npy", out)
    print(json.dumps({"compile_s": load, "first_s": first, "runs_s": ts, "openvino": ov.get_version()}))


def stage_torch(work: Path, hw, runs: int, threads: int, dtype: str = "fp32"):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    unet = _unet()
    x = {k: torch.from_numpy(v) for k, v in _inputs(hw).items()}
    if dtype == "bf16":  # the module cast to bf16 (the "PyTorch bf16" baseline), output back to fp32
        unet = unet.to(torch.bfloat16)
        x = {k: v.to(torch.bfloat16) for k, v in x.items()}
    call = lambda: unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        # the warm-up run doubles as the FLOP count; on SDPA's math backend, as bench_torch.unet_flops
        # does, because FlopCounterMode counts the fused CPU attention kernel as 0 FLOP
        with counter, sdpa_kernel(SDPBackend.MATH):
            out = call().float().numpy()
        _, _, ts = _time(lambda: call(), runs)
    np.save(work / f"torch{'-bf16' if dtype == 'bf16' else ''}-{hw[0]}.npy", out)
    print(json.dumps({"runs_s": ts, "flops": int(counter.get_total_flops()), "torch": torch.__version__}))


def _sub(stage, *args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--stage", stage, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{stage} failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default=None)
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--resolutions", default="512x512,1024x1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--paths", default="ort,eager,ov-bf16,torch-bf16", help="which of ort,eager,ov-bf16,torch-bf16 to run")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="benchmarks/reports/sdxl-unet-cpu")
    ap.add_argument("--chart-only", action="store_true", help="redraw unet_step.png from OUT/report.json")
    a = ap.parse_args()
    if a.chart_only:
        return write_chart(json.loads(Path(a.out, "report.json").read_text()), Path(a.out))
    if a.stage:
        work, rest = Path(a.rest[0]), a.rest[1:]
        if a.stage == "export":
            return stage_export(work)
        hw = tuple(int(v) for v in rest[0].split("x"))
        args = (work, hw, int(rest[1]), int(rest[2]))
        if a.stage == "torch-bf16":
            return stage_torch(*args, dtype="bf16")
        return {"ort": stage_ort, "ov-bf16": stage_ov, "torch": stage_torch}[a.stage](*args)

    from lcm_export.bench.harness import machine_info
    from lcm_export.bench.baselines import measure_peak
    from lcm_export._util import tool_versions, write_json, write_text

    threads = len(os.sched_getaffinity(0))
    work = Path(a.work or tempfile.mkdtemp(prefix="sdxl-unet-"))
    exp = _sub("export", work) if not (work / "ort" / "model.onnx").exists() else {"reused": True}
    from lcm_export._cpu import native_bf16

    paths = [p for p in a.paths.split(",") if p]
    skipped = {}
    if not native_bf16():
        for p in ("ov-bf16", "torch-bf16"):
            if p in paths:
                paths.remove(p)
                skipped[p] = "this CPU has no native bf16 (AMX / AVX512_BF16)"
    if "eager" not in paths:
        raise SystemExit("--paths must include eager (the reference for rel-L2 and the FLOP count)")
    stage = {"ort": "ort", "eager": "torch", "ov-bf16": "ov-bf16", "torch-bf16": "torch-bf16"}
    npy = {"ort": "ort", "eager": "torch", "ov-bf16": "ov-bf16", "torch-bf16": "torch-bf16"}
    rows = []
    for res in a.resolutions.split(","):
        got = {p: _sub(stage[p], work, res, a.runs, threads) for p in paths}
        want = np.load(work / f"torch-{res.split('x')[0]}.npy").astype(np.float64)
        row = {"resolution": res, "unet_step_flops": got["eager"]["flops"], "paths": {}}
        for p in paths:
            out = np.load(work / f"{npy[p]}-{res.split('x')[0]}.npy").astype(np.float64)
            row["paths"][p] = {**got[p], "median_s": float(np.median(got[p]["runs_s"])),
                               "rel_l2_vs_eager_fp32": float(np.linalg.norm(out - want) / np.linalg.norm(want))}
        rows.append(row)
        print(res + ": " + ", ".join(f"{p} {v['median_s']:.2f} s (rel-L2 {v['rel_l2_vs_eager_fp32']:.1e})"
                                     for p, v in row["paths"].items()), flush=True)
    peak = measure_peak(threads)
    peak_bf16 = measure_peak(threads, precision="bf16") if native_bf16() else None
    rep = {"schema": "lcm-export-sdxl-unet/2", "model": "demo:sdxl-full UNet (stabilityai SDXL-base config, seeded random weights)",
           "batch": 1, "runs": a.runs, "warmup": 1, "machine": machine_info(threads), "versions": tool_versions("openvino"),
           "export": exp, "peak": peak, "peak_bf16": peak_bf16, "skipped": skipped, "results": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", rep)  # atomic, as every file lcm-export writes
    labels = {"ort": "ORT fp32", "eager": "eager fp32", "ov-bf16": "OpenVINO bf16", "torch-bf16": "PyTorch bf16"}
    lines = ["# SDXL-config UNet on CPU: engines vs PyTorch, fp32 and bf16", "",
             f"{rep['model']}; batch 1 (guidance off); 1 warm-up + {a.runs} timed runs each, median; "
             f"{rep['machine']['cpu']}, {threads} threads; each path in its own process (by estimate fp32 SDXL "
             "export, ORT and PyTorch would not fit one 24 GB process).", "",
             f"Measured peaks in this run: fp32 {peak['best_flops_per_s'] / 1e9:.1f} GFLOP/s"
             + (f", bf16 {peak_bf16['best_flops_per_s'] / 1e9:.1f} GFLOP/s" if peak_bf16 else "")
             + " (best of a 4096² matrix product). Each path's share is of the peak of its own precision. "
             "GFLOP counted by torch's FlopCounterMode with attention on SDPA's math backend.", "",
             "| resolution | GFLOP/step | path | s (median) | vs eager fp32 | GFLOP/s (% of its peak) | rel-L2 vs eager fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["unet_step_flops"]
        eager = r["paths"]["eager"]["median_s"]
        for p, v in r["paths"].items():
            pk = (peak_bf16 if p.endswith("bf16") else peak)["best_flops_per_s"]
            fs = f / v["median_s"]
            lines.append(f"| {r['resolution']} | {f / 1e9:,.0f} | {labels[p]} | {v['median_s']:.2f} | {eager / v['median_s']:.2f}x | "
                         f"{fs / 1e9:.0f} ({fs / pk * 100:.0f}%) | {v['rel_l2_vs_eager_fp32']:.1e} |")
    for p, why in skipped.items():
        lines.append(f"\n{labels[p]}: skipped ({why}).")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}.", ""]
    write_text(out / "report.md", "\n".join(lines + ["Chart: `unet_step.png`.", ""]))
    write_chart(rep, out)


def write_chart(rep: dict, out: Path) -> None:
    """unet_step.png: median seconds per UNet step, ONNX Runtime vs PyTorch eager, per resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["results"]
    x = np.arange(len(rows))
    names = list(rows[0]["paths"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        vals = [r["paths"][name]["median_s"] for r in rows]
        ax.bar(x + i * width, vals, width, label=name)
        for xi, v in zip(x, vals):
            ax.text(xi + i * width, v, f"{v:.1f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x + 0.4 - width / 2, [r["resolution"] for r in rows])
    ax.set_ylabel("median seconds per UNet step")
    ax.set_title(f"SDXL-config UNet, batch 1 — {rep['machine']['cores']} CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "unet_step.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
