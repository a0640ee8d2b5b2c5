"""Where one UNet step's time goes in an lcm-export ONNX Runtime CPU engine, op by op.

Runs the engine's UNet graph with ONNX Runtime's profiler (the settings the runtime uses: stored
graph, ORT_DISABLE_ALL at load, the manifest's thread count), sums kernel time per op type over
the fastest of N profiled runs, counts each Conv/MatMul/Gemm/Attention node's FLOPs from its
shapes (2 per multiply-add) and sets them against an fp32 peak measured in the same process (the
same torch/numpy matrix product ``lcm-export bench`` uses). It answers "how far is this from the
machine's limit, and why": the FLOP/s of the matrix work alone, and the bound on the whole step if
the matrix work ran at the measured peak while everything else (normalization, activations,
softmax, copies) stayed as it is.

Usage: python benchmarks/unet_profile.py --engine-dir engines/demo-sd15-full --resolution 256x256 \
           [--runs 3] --out benchmarks/reports/unet-profile-256
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

MATRIX_OPS = ("Conv", "MatMul", "FusedMatMul", "Gemm", "Attention", "MultiHeadAttention")


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_flops(op: str, node, ins: list, outs: list, inits: dict) -> int:
    """FLOPs of one matrix node from its runtime shapes (initializer shapes from the graph)."""
    if op == "Conv":
        w = inits[node.input[1]]
        o = outs[0]
        return 2 * math.prod(o) * math.prod(w[1:])  # every output: Cin/groups * kh * kw multiply-adds
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        a = ins[0]
        k = a[-1] if not (op == "Gemm" and _attrs(node).get("transA", 0)) else a[0]
        return 2 * math.prod(outs[0]) * k
    if op == "Attention":  # packed QKV projection + scores + weighted sum
        b, s, c = ins[0]
        hidden = inits[node.input[1]][1] // 3
        return 2 * b * s * c * 3 * hidden + 2 * 2 * b * s * s * hidden
    if op == "MultiHeadAttention":  # q [B,S,C], k [B,L,C]: scores + weighted sum
        (b, s, c), kl = ins[0], ins[1][1]
        return 2 * 2 * b * s * kl * c
    return 0


def profile(model: Path, hw, threads: int, runs: int, text_dim: int, latent: int, extra_inputs: dict) -> dict:
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(model), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: list(t.dims) for t in graph.initializer}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="unet-profile-")) / "ort")
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, latent, hw[0] // 8, hw[1] // 8), dtype=np.float32),
            "timestep": np.array([999.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, text_dim), dtype=np.float32), **extra_inputs}
    sess.run(None, feed)  # warm-up
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        walls.append(time.perf_counter() - t0)
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]  # skip warm-up
    best = min(model_runs, key=lambda e: e["dur"])
    t0, t1 = best["ts"], best["ts"] + best["dur"]
    per_op = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0, "nodes": 0})
    per_shape = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0, "nodes": 0})
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not t0 <= e["ts"] <= t1:
            continue
        a = e["args"]
        op = a["op_name"]
        ins = [list(d.values())[0] for d in a.get("input_type_shape", [])]
        outs = [list(d.values())[0] for d in a.get("output_type_shape", [])]
        node = nodes.get(e["name"][: -len("_kernel_time")])
        f = node_flops(op, node, ins, outs, inits) if op in MATRIX_OPS and node is not None else 0
        for table, key in ((per_op, op), (per_shape, f"{op} {ins[0] if ins else ''} -> {outs[0] if outs else ''}")):
            table[key]["ms"] += e["dur"] / 1e3
            table[key]["gflop"] += f / 1e9
            table[key]["nodes"] += 1
    fused = any(n.op_type in ("Attention", "MultiHeadAttention") for n in graph.node)
    return {"wall_s": walls, "profiled_run_ms": best["dur"] / 1e3, "per_op": dict(per_op),
            "attention": "fused (Attention/MultiHeadAttention)" if fused else "as exported (MatMul-Softmax-MatMul)",
            "top_matrix_shapes": dict(sorted(((k, v) for k, v in per_shape.items() if v["gflop"]),
                                             key=lambda kv: -kv[1]["ms"])[:15])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--resolution", default="256x256")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from lcm_export._util import tool_versions, write_json, write_text
    from lcm_export.bench.harness import machine_info
    from lcm_export.bench.baselines import measure_peak
    from lcm_export.store.manifest import read_manifest

    eng = Path(a.engine_dir)
    m = read_manifest(eng)
    if m["backend"] != "onnxruntime" or m["device"] != "cpu":
        raise SystemExit(f"error: {eng} is a {m['backend']}/{m['device']} entry; this profiles ONNX Runtime CPU engines")
    hw = tuple(int(v) for v in a.resolution.lower().split("x"))
    threads = int(m["onnxruntime"]["intra_op_threads"])
    extra = {}
    if m.get("pooled_dim"):
        extra = {"text_embeds": np.zeros((1, m["pooled_dim"]), np.float32),
                 "time_ids": np.array([[hw[0], hw[1], 0, 0, hw[0], hw[1]]], np.float32)}
    prof = profile(eng / m["components"]["unet"]["engines"]["*"], hw, threads, a.runs, m["text_dim"], m["latent_channels"], extra)
    peak = measure_peak(threads)
    p = peak["best_flops_per_s"] / 1e9
    total_ms = sum(v["ms"] for v in prof["per_op"].values())
    gflop = sum(v["gflop"] for v in prof["per_op"].values())
    mat_ms = sum(v["ms"] for k, v in prof["per_op"].items() if k in MATRIX_OPS)
    other_ms = total_ms - mat_ms
    bound_ms = gflop / p * 1e3 + other_ms  # matrix work at the measured peak, the rest unchanged
    rep = {"schema": "lcm-export-unet-profile/1", "engine": str(eng), "model": m["base_source"], "resolution": a.resolution,
           "threads": threads, "runs": a.runs,
           "machine": machine_info(threads), "versions": tool_versions(), "peak": peak, **prof,
           "summary": {"kernel_ms": total_ms, "gflop": gflop, "matrix_ms": mat_ms, "other_ms": other_ms,
                       "step_gflops_per_s": gflop / total_ms * 1e3, "matrix_gflops_per_s": gflop / mat_ms * 1e3,
                       "bound_ms_if_matrix_at_peak": bound_ms, "bound_fraction_of_peak": gflop / bound_ms * 1e3 / p}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", rep)  # atomic, as every file lcm-export writes
    s = rep["summary"]
    lines = [f"# Where a UNet step's time goes — {m['base_source']} at {a.resolution}, ONNX Runtime CPU engine", "",
             f"{rep['machine']['cpu']}, {threads} threads, onnxruntime {rep['versions'].get('onnxruntime')}. "
             f"ONNX Runtime's profiler, fastest of {a.runs} runs after 1 warm-up (wall times: "
             f"{', '.join(f'{w:.2f}' for w in prof['wall_s'])} s). Attention: {rep['attention']}. "
             f"Measured fp32 peak in the same process: {p:.0f} GFLOP/s (best of a {peak['matrix_size']}² matrix product).", "",
             f"- kernel time {total_ms:,.0f} ms for {gflop:,.1f} GFLOP: **{s['step_gflops_per_s']:.0f} GFLOP/s, "
             f"{s['step_gflops_per_s'] / p * 100:.0f} % of the peak**",
             f"- matrix work (Conv, MatMul, Gemm, attention) {mat_ms:,.0f} ms at {s['matrix_gflops_per_s']:.0f} GFLOP/s "
             f"({s['matrix_gflops_per_s'] / p * 100:.0f} % of peak); everything else {other_ms:,.0f} ms "
             f"({other_ms / total_ms * 100:.0f} % of the time, ~0 FLOP)",
             f"- bound: with every matrix op at the measured peak and the rest unchanged, the step would take "
             f"{bound_ms:,.0f} ms = {s['bound_fraction_of_peak'] * 100:.0f} % of peak", "",
             "| op type | ms | share | nodes | GFLOP | GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|"]
    for op, v in sorted(prof["per_op"].items(), key=lambda kv: -kv[1]["ms"]):
        if v["ms"] < 0.005 * total_ms:
            continue
        rate = v["gflop"] / v["ms"] * 1e3 if v["gflop"] else 0
        lines.append(f"| {op} | {v['ms']:,.1f} | {v['ms'] / total_ms * 100:.1f} % | {v['nodes']} | {v['gflop']:.1f} | "
                     + (f"{rate:.0f} | {rate / p * 100:.0f} % |" if rate else "— | — |"))
    lines += ["", "Op types under 0.5 % of the time are left out of the table (they are in report.json).", "",
              "Slowest matrix shapes (input -> output):", "", "| node | ms | nodes | GFLOP/s | % of peak |", "|---|---|---|---|---|"]
    for k, v in prof["top_matrix_shapes"].items():
        rate = v["gflop"] / v["ms"] * 1e3
        lines.append(f"| `{k}` | {v['ms']:,.1f} | {v['nodes']} | {rate:.0f} | {rate / p * 100:.0f} % |")
    write_text(out / "report.md", "\n".join(lines + [""]))
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
