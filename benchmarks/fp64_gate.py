"""The fp32 gate's factor and cost, measured (README, "Verification"; issue: the fp32 gate refuses valid models).

1. Factor: on ill-conditioned models (tests/strong_lora.py: an SD 1.5-architecture base with two strong LoRAs,
   deltas ``ratio`` x the base weights), for several seeded inputs and sizes, the rel-L2 to a float64 run of
   the fused UNet of PyTorch fp32 (e32) and of the exported graph in ONNX Runtime and OpenVINO fp32. The
   ratio engine / e32 of correct engines sets how far above 1 the factor k must be; planted export bugs
   (a transposed weight, a wrong op, 1 % noise in one conv) show how far above k real bugs are.
2. Cost: seconds of the PyTorch fp32 and float64 references of each component of demo:sd15-full (the real
   SD 1.5 configs) at the given sizes, and peak RSS, i.e. what the gate adds to a build.

    python benchmarks/fp64_gate.py --out benchmarks/reports/fp64-gate [--sizes 256,512] [--skip-cost]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _engines(graph: Path):
    import onnxruntime as ort
    import openvino as ov

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    c = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = c.create_infer_request()
    return {"onnxruntime fp32": lambda f: s.run(None, f)[0],
            "openvino fp32": lambda f: np.asarray(req.infer(f)[c.outputs[0]])}


def _corrupt(src: Path, dst: Path, how: str) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    if how == "transposed weight":
        mm = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
        t = next(t for t in m.graph.initializer if t.name in mm and len(t.dims) == 2 and t.dims[0] == t.dims[1])
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
    elif how == "wrong op":
        next(n for n in m.graph.node if n.op_type == "Sigmoid").op_type = "Tanh"
    else:  # 1 % noise in the largest conv kernel
        t = max((t for t in m.graph.initializer if len(t.dims) == 4), key=lambda t: int(np.prod(t.dims)))
        w = numpy_helper.to_array(t)
        w = w + np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * np.float32(0.01 * np.sqrt(np.mean(w ** 2)))
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(m, str(dst))


def factor_study(ratios, seeds, sizes) -> dict:
    from lcm_export.builder.components import run_module, sample_inputs, wrappers
    from lcm_export.builder.export import export_component
    from lcm_export.builder.fuse import fuse_into
    from lcm_export.sources.lora import LoraSpec, inspect_lora
    from lcm_export.builder.verify import float64_outputs, rel_l2
    from strong_lora import strong_pipeline, write_strong_loras

    rows, bugs = [], []
    work = Path(tempfile.mkdtemp(prefix="fp64-gate-"))
    try:
        for ratio in ratios:
            pipe = strong_pipeline()
            paths = write_strong_loras(pipe, work / f"loras-{ratio}", ratio)
            fuse_into(pipe, [(LoraSpec(p, w), inspect_lora(p)) for p, w in paths])
            module = wrappers(pipe)["unet"]
            graph = export_component("unet", pipe, work / f"onnx-{ratio}", (64, 64))
            engines = _engines(graph)
            planted = {}
            if ratio == max(ratios):
                for how in ("transposed weight", "wrong op", "1% noise in one conv"):
                    dst = graph.with_name(how.replace(" ", "_") + ".onnx")
                    _corrupt(graph, dst, how)
                    planted[how] = _engines(dst)["onnxruntime fp32"]
            for hw in sizes:
                for seed in seeds:
                    feeds = sample_inputs("unet", pipe, 1, hw, seed=seed)
                    exact = float64_outputs(module, feeds)[0]
                    e32 = rel_l2(run_module(module, feeds)[0], exact)
                    norm = float(np.linalg.norm(exact))
                    row = {"ratio": ratio, "resolution": f"{hw[0]}x{hw[1]}", "seed": seed, "timestep": float(feeds["timestep"][0]),
                           "torch_fp32": e32, "norm": norm}
                    for name, run in engines.items():
                        e = rel_l2(run(feeds), exact)
                        row[name] = e
                        row[f"{name} / torch_fp32"] = e / e32
                    rows.append(row)
                    for how, run in planted.items():
                        e = rel_l2(run(feeds), exact)
                        bugs.append({"bug": how, "ratio": ratio, "resolution": row["resolution"], "seed": seed,
                                     "rel_l2": e, "torch_fp32": e32, "ratio_to_torch_fp32": e / e32})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "planted_bugs": bugs, **gate_outcomes(rows)}


def _together(rows, key) -> float:
    """rel-L2 over several inputs together, from each input's rel-L2 and reference norm."""
    return float(np.sqrt(sum((r[key] * r["norm"]) ** 2 for r in rows) / sum(r["norm"] ** 2 for r in rows)))


def gate_outcomes(rows) -> dict:
    """What the gate (verify.gate: first input, then CONFIRM_INPUTS together) decides for every correct
    engine row, and the engine / PyTorch-fp32 ratios it sees (single inputs; CONFIRM_INPUTS together)."""
    from lcm_export.builder.verify import CONFIRM_INPUTS, FP32_FACTOR, FP32_FLOOR

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["ratio"], r["resolution"]), []).append(r)
    out = {"factor": FP32_FACTOR, "floor": FP32_FLOOR, "confirm_inputs": CONFIRM_INPUTS, "engines": {}}
    for name in ("onnxruntime fp32", "openvino fp32"):
        single, together, refused, checks = 0.0, 0.0, [], 0
        for key, g in groups.items():
            g = sorted(g, key=lambda r: r["seed"])
            for start in range(len(g) - CONFIRM_INPUTS + 1):  # each run of CONFIRM_INPUTS seeds as one build's inputs
                first, batch = g[start], g[start:start + CONFIRM_INPUTS]
                checks += 1
                single = max(single, first[name] / first["torch_fp32"])
                e, e32 = _together(batch, name), _together(batch, "torch_fp32")
                together = max(together, e / e32)
                if first[name] > max(FP32_FLOOR, FP32_FACTOR * first["torch_fp32"]) and e > max(FP32_FLOOR, FP32_FACTOR * e32):
                    refused.append({"model_ratio": key[0], "resolution": key[1], "seeds": [r["seed"] for r in batch]})
        out["engines"][name] = {"checks": checks, "refused": refused, "worst_single_input_ratio": single,
                                f"worst_ratio_over_{CONFIRM_INPUTS}_inputs": together}
    return out


def cost_study(sizes) -> dict:
    from lcm_export.sources.demo import build_demo_pipeline
    from lcm_export.builder.verify import References

    pipe = build_demo_pipeline("sd15-full")
    out = []
    for hw in sizes:
        refs = References(pipe)
        for comp in ("text_encoder", "unet", "vae_decoder"):
            if comp == "text_encoder" and hw != sizes[0]:
                continue
            t0 = time.perf_counter()
            refs.get(comp, hw, fp64=False)
            t1 = time.perf_counter()
            refs.get(comp, hw, fp64=True)
            t2 = time.perf_counter()
            out.append({"component": comp, "resolution": f"{hw[0]}x{hw[1]}", "torch_fp32_s": round(t1 - t0, 2),
                        "torch_fp64_s": round(t2 - t1, 2)})
            print(out[-1], flush=True)
    return {"model": "demo:sd15-full", "rows": out, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="256,512", help="sizes of the cost study (sd15-full)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--seeds", type=int, default=8, help="seeded inputs per model and size in the factor study")
    ap.add_argument("--cost-only", action="store_true", help="keep the factor study of an existing --out report; measure the cost")
    a = ap.parse_args()
    import torch

    from lcm_export._util import tool_versions
    from lcm_export.bench.harness import machine_info

    torch.set_num_threads(2)
    out = Path(a.out)
    if a.cost_only:
        report = json.loads((out / "report.json").read_text())
    else:
        report = {"machine": machine_info(2), "versions": tool_versions("openvino"),
                  "factor": factor_study([2.0, 4.0, 6.0, 8.0], range(a.seeds), [(64, 64), (64, 96)])}
        print(json.dumps(report["factor"]["engines"]), flush=True)
    if not a.skip_cost:
        report["cost"] = cost_study([(int(s), int(s)) for s in a.sizes.split(",")])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    f = report["factor"]
    n = f["confirm_inputs"]
    lines = [f"# fp32 gate: factor and cost ({report['machine'].get('cpu')}, {report['machine'].get('cores')} cores)", "",
             f"Rule: rel-L2(engine, fp64) <= max({f['floor']:g}, {f['factor']:g} x rel-L2(PyTorch fp32, fp64)); one seeded input "
             f"first, {n} together when it fails. Strong-LoRA UNets (tests/strong_lora.py, deltas 2x to 8x the base weights), "
             "sizes 64x64 and 64x96, seeded inputs; each run of consecutive seeds stands for one build's inputs.", "",
             f"| correct engine | checks | refused by the rule | worst ratio, one input | worst ratio, {n} inputs together |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['checks']} | {len(v['refused'])} | {v['worst_single_input_ratio']:.1f} | {v[f'worst_ratio_over_{n}_inputs']:.1f} |"
              for k, v in f["engines"].items()]
    lines += ["", "| planted bug (ONNX Runtime, most ill-conditioned model) | smallest ratio to PyTorch fp32 | largest |", "|---|---|---|"]
    for how in dict.fromkeys(b["bug"] for b in f["planted_bugs"]):
        rs = [b["ratio_to_torch_fp32"] for b in f["planted_bugs"] if b["bug"] == how]
        lines.append(f"| {how} | {min(rs):.2g} | {max(rs):.2g} |")
    if "cost" in report:
        lines += ["", f"Cost on {report['cost']['model']} (peak RSS {report['cost']['peak_rss_gb']} GB):", "",
                  "| component | size | PyTorch fp32 s | float64 s |", "|---|---|---|---|"]
        lines += [f"| {r['component']} | {r['resolution']} | {r['torch_fp32_s']} | {r['torch_fp64_s']} |" for r in report["cost"]["rows"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
