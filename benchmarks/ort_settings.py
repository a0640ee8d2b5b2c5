"""What ONNX Runtime settings (and OpenVINO, if installed) give for one SD 1.5 UNet step on this CPU.

Usage: python benchmarks/ort_settings.py UNET_ONNX [--resolution 256x256] [--runs 5] [--out DIR]
UNET_ONNX is the exported, not yet optimized UNet (`lcm-export export --model demo:sd15-full --out DIR`
writes DIR/unet/model.onnx). Writes OUT/report.json and OUT/report.md. Each configuration: a fresh
session, 1 warm-up run, ``runs`` timed runs, median and min. Batch 1 (guidance off), seeded inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lcm_export._util import write_json
from lcm_export.bench.harness import median_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("unet_onnx")
    ap.add_argument("--text-dim", type=int, default=768)
    ap.add_argument("--resolution", default="256x256")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per configuration per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (interleaved)")
    ap.add_argument("--out", default="benchmarks/reports/ort-settings")
    a = ap.parse_args()
    h, w = (int(v) for v in a.resolution.split("x"))
    m = {"text_dim": a.text_dim}
    path = a.unet_onnx
    import tempfile

    saved = Path(tempfile.mkdtemp(prefix="ort-all-")) / "model.onnx"  # what build-engine stores on CPU
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(saved)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, h // 8, w // 8), dtype=np.float32),
             "timestep": np.array([999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, m["text_dim"]), dtype=np.float32)}
    threads = len(os.sched_getaffinity(0))
    L = ort.GraphOptimizationLevel
    configs = [
        ("ORT_ENABLE_ALL at load", dict(level=L.ORT_ENABLE_ALL)),
        ("ORT_ENABLE_ALL graph saved at build, ORT_DISABLE_ALL at load, spinning off (lcm-export's choice)",
         dict(level=L.ORT_DISABLE_ALL, path=str(saved), spin=False)),
        ("same, spinning on", dict(level=L.ORT_DISABLE_ALL, path=str(saved))),
        ("ORT_ENABLE_EXTENDED at load (no NCHWc layout)", dict(level=L.ORT_ENABLE_EXTENDED)),
        ("ORT_ENABLE_BASIC at load", dict(level=L.ORT_ENABLE_BASIC)),
        ("ORT_ENABLE_ALL at load, memory arena off", dict(level=L.ORT_ENABLE_ALL, arena=False)),
        ("ORT_ENABLE_ALL at load, 1 thread", dict(level=L.ORT_ENABLE_ALL, threads=1)),
    ]
    # Rounds: every configuration once per round, so slow phases of this shared host hit all of them.
    runs_by = {name: [] for name, _ in configs}
    loads_by = {name: [] for name, _ in configs}
    outs = {}
    for rnd in range(a.rounds):
        for name, c in configs:
            so = ort.SessionOptions()
            so.graph_optimization_level = c["level"]
            so.intra_op_num_threads = c.get("threads", threads)
            so.inter_op_num_threads = 1
            so.enable_cpu_mem_arena = c.get("arena", True)
            if c.get("spin") is False:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            t0 = time.perf_counter()
            sess = ort.InferenceSession(c.get("path", path), so, providers=["CPUExecutionProvider"])
            loads_by[name].append(time.perf_counter() - t0)
            _, ts = median_time(lambda: sess.run(None, feeds), a.runs)
            runs_by[name] += ts
            outs[name] = sess.run(None, feeds)[0]
            del sess
        print(f"round {rnd + 1}/{a.rounds} done", flush=True)
    fp32_out = outs[configs[0][0]]
    results = []
    for name, _ in configs:
        ts = runs_by[name]
        results.append({"config": name, "median_s": float(np.median(ts)), "min_s": min(ts), "runs_s": ts,
                        "session_create_s": float(np.median(loads_by[name])),
                        "rel_l2_vs_ort_fp32": float(np.linalg.norm(outs[name] - fp32_out) / np.linalg.norm(fp32_out))})
        print(f"{name}: {results[-1]['median_s']:.3f} s (session {results[-1]['session_create_s']:.1f} s)", flush=True)
    ref_out = None
    for prec in ("f32", "bf16"):
        try:
            import openvino as ov

            core = ov.Core()
            t0 = time.perf_counter()
            model = core.read_model(path)
            model.reshape({"sample": list(feeds["sample"].shape), "timestep": [1], "encoder_hidden_states": [1, 77, m["text_dim"]]})
            compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                          "INFERENCE_PRECISION_HINT": prec})
            load = time.perf_counter() - t0
            req = compiled.create_infer_request()
            med, ts = median_time(lambda: req.infer(feeds), a.runs)
            out = np.asarray(req.infer(feeds)[compiled.outputs[0]])
            ref_out = ref_out if ref_out is not None else fp32_out
            rel = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
            note = " — NOT fp32: AMX/AVX-512 bf16 math, shown for reference only" if prec == "bf16" else ""
            results.append({"config": f"OpenVINO {ov.__version__.split('-')[0]} CPU (direct, {prec}, static shape){note}", "median_s": med, "min_s": min(ts),
                            "runs_s": ts, "session_create_s": load, "rel_l2_vs_ort_fp32": rel})
            print(f"OpenVINO {prec}: {med:.3f} s rel {rel:.2e}", flush=True)
        except ImportError:
            results.append({"config": "OpenVINO", "error": "openvino not installed"})
            break
        except Exception as exc:  # report, don't hide
            results.append({"config": f"OpenVINO {prec}", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    rep = {"unet": path, "resolution": a.resolution, "note": "this VM's timings vary by up to ~30% run to run (shared host); compare rows by median and min", "threads": threads, "runs_per_round": a.runs, "rounds": a.rounds, "warmup": "1 per session",
           "machine": {"cpu": cpu, "cores": threads, "platform": platform.platform()}, "onnxruntime": ort.__version__,
           "results": results}
    write_json(out / "report.json", rep)  # atomic, as every file lcm-export writes
    lines = [f"# ONNX Runtime settings for one SD 1.5 UNet step ({a.resolution}, batch 1)", "",
             f"{cpu}, {threads} threads, onnxruntime {ort.__version__}. ONNX Runtime rows: {a.rounds} interleaved rounds, "
             f"each a fresh session with 1 warm-up + {a.runs} timed runs; median and min over all timed runs, session "
             f"creation median. OpenVINO rows: one session, 1 warm-up + {a.runs} runs. This shared VM's timings vary by "
             "up to ~30 % between runs: differences smaller than that are not significant.", "",
             "| configuration | median s | min s | session create s | rel-L2 vs the first row |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['session_create_s']:.1f} | {r['rel_l2_vs_ort_fp32']:.1e} |"
                     if "median_s" in r else f"| {r['config']} | {r['error']} | | | |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
