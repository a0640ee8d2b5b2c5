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
    from lcm_export.components import run_module, sample_inputs, wrappers
    from lcm_export.export import export_component
    from lcm_export.fuse import fuse_into
    from lcm_export.lora import LoraSpec, inspect_lora
    from lcm_export.verify import float64_outputs, rel_l2
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
                    row = {"ratio": ratio, "resolution": f"{hw[0]}x{hw[1]}", "seed": seed, "timestep": float(feeds["timestep"][0]),
                           "torch_fp32": e32}
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
    ill = [r for r in rows if r["torch_fp32"] >= 2e-5]
    worst = {n: max(r[f"{n} / torch_fp32"] for r in ill) for n in ("onnxruntime fp32", "openvino fp32")} if ill else {}
    return {"rows": rows, "planted_bugs": bugs, "ill_conditioned_rows": len(ill), "worst_correct_ratio": worst}


def cost_study(sizes) -> dict:
    from lcm_export.demo import build_demo_pipeline
    from lcm_export.verify import References

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
    a = ap.parse_args()
    import torch

    from lcm_export._util import tool_versions
    from lcm_export.bench import machine_info

    torch.set_num_threads(2)
    report = {"machine": machine_info(2), "versions": tool_versions("openvino"), "factor": factor_study([2.0, 4.0, 6.0, 8.0], range(5), [(64, 64), (64, 96)])}
    print(json.dumps(report["factor"]["worst_correct_ratio"]), flush=True)
    if not a.skip_cost:
        report["cost"] = cost_study([(int(s), int(s)) for s in a.sizes.split(",")])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    f = report["factor"]
    lines = [f"# fp32 gate: factor and cost ({report['machine'].get('cpu')})", "",
             f"Correct engines on ill-conditioned strong-LoRA UNets (PyTorch fp32 >= 2e-5 from fp64; {f['ill_conditioned_rows']} "
             "input/size/model rows): worst engine / PyTorch-fp32 ratio of rel-L2 to the float64 answer: "
             + ", ".join(f"{k} {v:.2f}" for k, v in f["worst_correct_ratio"].items()), "",
             "| planted bug | smallest ratio to PyTorch fp32 | largest |", "|---|---|---|"]
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
