"""Attention fusion on or off: one UNet step of the stored CPU graph, interleaved A/B.

What it tests: ``onnxruntime.transformers.optimizer`` with ``model_type="unet"`` rewrites the
exported UNet's self-attentions (MatMul, Softmax, MatMul, reshapes, transposes) into
``com.microsoft.Attention`` (packed QKV weights), its cross-attentions into ``MultiHeadAttention``
and residual + LayerNorm into ``SkipLayerNormalization``. Only CPU-capable fusions are on (NhwcConv,
GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and packed-QKV/KV MultiHeadAttention are CUDA
kernels). Two things in ORT 1.32 are worked around: ``FusionAttentionUnet.get_num_heads`` calls
``int()`` on a 1-element array, which numpy >= 2.4 rejects, so out of the box nothing is fused (the
class is swapped for one that reads the element, during the call only); and its loader holds the
model in memory twice (14 GB peak for the SD 1.5 UNet), so the graph is passed without weights and
the fusion reads only the Q/K/V weights it packs, from the data file in place (0.9 GB, 41 s).

Result (benchmarks/reports/attention-fusion*): no measurable gain on SD 1.5 or SDXL at any size, so
build-engine does not fuse (README, "ONNX Runtime").

Usage: python benchmarks/attention_ab.py UNET_ONNX [--resolutions 256x256,512x512] [--runs 2] [--rounds 3]
       [--one-at-a-time] [--out DIR]
UNET_ONNX is the exported, not yet optimized UNet (`lcm-export export --model demo:sd15-full --out DIR`
writes DIR/unet/model.onnx). Both graphs are made as build-engine makes them (ORT_ENABLE_ALL stored,
ORT_DISABLE_ALL at load, spinning off, all cores); "fused" runs fuse_attention() below first. Each round
runs every graph ``runs`` times per resolution after the sessions are warm, the graphs alternating,
so drifts in this shared VM's speed hit both alike. With --one-at-a-time each graph is loaded afresh
in each round (1 warm-up run after each load). Writes OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FUSED_OPS = ("Attention", "MultiHeadAttention")


@contextlib.contextmanager
def _numpy2_safe_num_heads():
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path)

    unet_mod = sys.modules.get("onnx_model_unet")
    if unet_mod is None:
        import onnx_model_unet as unet_mod  # type: ignore[import-not-found]
    base = unet_mod.FusionAttentionUnet

    class FusionAttentionUnetNumpy2(base):
        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            if not is_torch2:
                return super().get_num_heads(reshape_q, is_torch2)
            parent = self.model.get_parent(reshape_q, 1)
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.shape == (1,) and int(value[0]) > 0:
                return int(value[0])
            return 0

    unet_mod.FusionAttentionUnet = FusionAttentionUnetNumpy2
    try:
        yield
    finally:
        unet_mod.FusionAttentionUnet = base


def fusion_options():
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("unet")
    for cuda_only in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                      "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(opts, cuda_only, False)
    return opts


def fuse_attention(src: Path, dst_name: str = "model.fused.onnx", quiet: bool = True) -> tuple[Path, dict[str, int]]:
    """Write ``src`` with attention fused beside it; return its path and the count of each fused op.

    The weights are never loaded as a whole: the graph is read without external data, the
    fusion reads only the Q/K/V weights it packs (from ``src``'s data file), and the fused graph
    keeps pointing at that file for every other weight; new packed weights are stored inline
    (~0.15 GB for SD 1.5, ~1.2 GB for SDXL, under protobuf's 2 GB). So the fusion costs the
    packed weights in memory, not a copy of the model (the optimizer's own loader peaks at ~14 GB
    for the SD 1.5 UNet).
    """
    import io
    import logging
    import os

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    folder = src.parent.resolve()
    model = onnx.load(str(src), load_external_data=False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    mute = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()  # its own tqdm bar
    cwd = os.getcwd()
    # the fusion reads the Q/K/V weights with onnx.numpy_helper.to_array, which resolves external
    # data against the working directory (absolute locations fail onnx's checker in shape inference)
    os.chdir(folder)
    try:
        with _numpy2_safe_num_heads(), mute:
            fused = optimize_model(model, model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=fusion_options(), use_gpu=False, only_onnxruntime=False)
    finally:
        os.chdir(cwd)
    fused.topological_sort()
    counts = {op: sum(1 for n in fused.model.graph.node if n.op_type == op) for op in FUSED_OPS}
    dst = folder / dst_name
    onnx.save(fused.model, str(dst))
    return dst, counts


def _feed(model: Path, h: int, w: int) -> dict:
    """Seeded inputs for every graph input (SD 1.5: sample, timestep, text; SDXL adds pooled text and time ids)."""
    import onnx

    rng = np.random.default_rng(0)
    feed = {}
    for i in onnx.load(str(model), load_external_data=False).graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "sample":
            feed[i.name] = rng.standard_normal((1, dims[1], h // 8, w // 8), dtype=np.float32)
        elif i.name == "timestep":
            feed[i.name] = np.array([999.0], np.float32)
        elif i.name == "time_ids":
            feed[i.name] = np.array([[h, w, 0, 0, h, w]], np.float32)
        else:
            feed[i.name] = rng.standard_normal((1, *dims[1:]), dtype=np.float32)
    return feed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("unet_onnx")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="load one graph at a time, each round (for models that don't fit in memory twice, e.g. SDXL)")
    ap.add_argument("--resolutions", default="256x256,512x512")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/reports/attention-fusion")
    a = ap.parse_args()
    import onnxruntime as ort

    from lcm_export._util import tool_versions, write_json
    from lcm_export.bench.harness import machine_info
    from lcm_export.backends.onnxruntime import optimize_graph
    from lcm_export.backends.onnxruntime import OrtEngine

    src = Path(a.unet_onnx)
    work = Path(tempfile.mkdtemp(prefix="attn-ab-"))
    try:
        t0 = time.perf_counter()
        optimize_graph(src, work / "plain" / "model.onnx", "cpu")
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused_src, counts = fuse_attention(src, dst_name="model.ab-fused.onnx")
        t_fuse = time.perf_counter() - t0
        optimize_graph(fused_src, work / "fused" / "model.onnx", "cpu")
        fused_src.unlink()
        threads = len(os.sched_getaffinity(0))
        paths = {k: work / k / "model.onnx" for k in ("plain", "fused")}
        load = lambda k: OrtEngine(paths[k], ["CPUExecutionProvider"], threads, "ORT_DISABLE_ALL")
        engines = {k: load(k) for k in paths} if not a.one_at_a_time else None
        rows = []
        for res in a.resolutions.split(","):
            h, w = (int(v) for v in res.split("x"))
            feed = _feed(src, h, w)
            outs, times, loads = {}, {k: [] for k in paths}, {k: [] for k in paths}
            for _ in range(a.rounds):
                for k in paths:
                    t0 = time.perf_counter()
                    e = engines[k] if engines else load(k)
                    loads[k].append(time.perf_counter() - t0)
                    out = e.run(feed)  # warm-up, and the output compared
                    outs.setdefault(k, out)
                    for _ in range(a.runs):
                        t0 = time.perf_counter()
                        e.run(feed)
                        times[k].append(time.perf_counter() - t0)
                    del e
            rel = float(np.linalg.norm(outs["fused"] - outs["plain"]) / np.linalg.norm(outs["plain"]))
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append({"resolution": res, "times_s": times, "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
                         "speedup_median": med["plain"] / med["fused"], "rel_l2_fused_vs_plain": rel,
                         **({"session_create_s": loads} if not engines else {})})
            print(f"{res}: plain {med['plain']:.3f} s, fused {med['fused']:.3f} s ({med['plain'] / med['fused']:.2f}x), rel-L2 {rel:.1e}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep = {"schema": "lcm-export-attention-ab/1", "unet": str(src), "fused_nodes": counts, "fusion_s": t_fuse,
           "ort_optimize_s": t_plain, "threads": threads, "runs_per_round": a.runs, "rounds": a.rounds,
           "machine": machine_info(threads), "versions": tool_versions(), "results": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", rep)  # atomic, as every file lcm-export writes
    lines = ["# Attention fusion on the CPU UNet: interleaved A/B", "",
             f"{rep['machine']['cpu']}, {threads} threads, onnxruntime {ort.__version__}. Graphs as build-engine stores them "
             f"(ORT_ENABLE_ALL), with and without the fusion (`fuse_attention` in benchmarks/attention_ab.py; {counts['Attention']} Attention + "
             f"{counts['MultiHeadAttention']} MultiHeadAttention nodes; fusion took {t_fuse:.0f} s). {a.rounds} rounds × "
             f"{a.runs} runs per graph, graphs alternating, after one warm-up each"
             f"{' (each graph loaded afresh in each round: both do not fit in memory together)' if a.one_at_a_time else ''}. This shared VM's timings vary by up to "
             "~30 % between runs; the interleaving makes the two columns comparable with each other.", "",
             "| resolution | without fusion, median / min s | with fusion, median / min s | speed-up (medians) | rel-L2 fused vs not |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['median_s']['plain']:.3f} / {r['min_s']['plain']:.3f} | "
                     f"{r['median_s']['fused']:.3f} / {r['min_s']['fused']:.3f} | {r['speedup_median']:.2f}x | {r['rel_l2_fused_vs_plain']:.1e} |")
    (out / "report.md").write_text("\n".join(lines + [""]))


if __name__ == "__main__":
    main()
