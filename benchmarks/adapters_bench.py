"""Run-time style adapters: switch cost, speed with and without an active adapter, memory (issue 20's targets).

On demo:sd15-full (the real SD 1.5 configs, random weights), the default CPU backend/precision, at each size:
  P  today's entry: the LCM-LoRA-shaped demo LoRA baked, no adapter branches
  A  the same with adapter branches (--adapters), holding adapters X and Y
  F  the same as P with X fused at λ 0.8 (the "same LoRA fused" reference)
X: rank 64 over every Linear layer and 1x1 convolution of the UNet (every layer the released LCM-LoRA touches
except its 3x3 convolutions, which take no run-time branch); Y: rank 8 over the attention projections.

Per size, interleaved rounds (each: a fresh adapter cache, so a first use includes reading the factors):
  - UNet step and end-to-end time: P; A with no adapter; A with X at 0.8; F.
  - switch cost = first image after a switch minus a warm image with the same settings, for: none -> X (first use),
    λ change (X 0.8 -> 0.5), A -> B (X -> Y), none -> two (X + Y).
  - memory: the bytes the runtime's adapter cache holds after X's first use (Adapters.resident_bytes: every array
    once; the engines take the factors as shared-memory tensors, no copy), against X's factors file. Process RSS
    is not used: OpenVINO's allocator returns and takes memory between images by more than the factors' size.

    python benchmarks/adapters_bench.py --out benchmarks/reports/adapters-sd15 [--sizes 256,512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def write_loras(pipe, out: Path) -> dict[str, Path]:
    """X (rank 64: every UNet Linear layer and 1x1 conv) and Y (rank 8: attention projections), kohya, seeded."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(2024)
    files = {}
    for name, rank, pick in (("X", 64, lambda n, m: isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))),
                             ("Y", 8, lambda n, m: n.endswith(("to_q", "to_k", "to_v", "to_out.0")))):
        sd = {}
        for n, m in pipe.unet.named_modules():
            if not pick(n, m) or n.startswith("time_embedding"):
                continue
            key = "lora_unet_" + n.replace(".", "_")
            w = m.weight
            sd[f"{key}.lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5).contiguous()
            sd[f"{key}.lora_up.weight"] = (torch.randn(w.shape[0], rank, *w.shape[2:], generator=gen) * 0.02).contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
        files[name] = out / f"{name}-rank{rank}.safetensors"
        save_file(sd, str(files[name]))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/adapters-bench", help="entries and LoRA files (large)")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="demo:sd15-full", help="a demo model (demo:sd15 for a smoke test)")
    a = ap.parse_args()

    from lcm_export._util import tool_versions
    from lcm_export.adapters.index import add_adapter
    from lcm_export.bench.harness import machine_info
    from lcm_export.builder.build_engine import BuildOptions, build_engine
    from lcm_export.sources.demo import build_demo_pipeline, demo_lora_dir, write_demo_loras
    from lcm_export.runtime import LCMPipeline
    from lcm_export.runtime.adapters import Adapters

    work = Path(a.work)
    sizes = [(int(s), int(s)) for s in a.sizes.split(",")]
    demo = a.model.split(":", 1)[1]
    pipe = build_demo_pipeline(demo)
    lcm = write_demo_loras(pipe, demo_lora_dir(), demo)[0]
    files = write_loras(pipe, work / "loras")
    del pipe
    common = dict(base=a.model, resolutions=tuple(sizes), show_progress=True)
    builds = {}
    for key, loras, adapters in (("P", (f"{lcm[0]}:1.0",), False), ("A", (f"{lcm[0]}:1.0",), True),
                                 ("F", (f"{lcm[0]}:1.0", f"{files['X']}:0.8"), False)):
        t0 = time.perf_counter()
        res = build_engine(BuildOptions(loras=loras, adapters=adapters, engine_dir=str(work / key), **common))
        builds[key] = {"seconds": round(time.perf_counter() - t0, 1), "reused": res.reused, "backend": res.manifest["backend"],
                       "precision": res.manifest["precision"]}
        print(key, builds[key], flush=True)
    added = {}
    for name in ("X", "Y"):
        t0 = time.perf_counter()
        rec = add_adapter(work / "A", files[name], name, force=True)
        added[name] = {"add_seconds": round(time.perf_counter() - t0, 2), "bytes": rec["bytes"], "ranks": rec["ranks"],
                       "layers": rec["layers"]}
        print(name, added[name], flush=True)

    pipes = {k: LCMPipeline.from_engine_dir(work / k) for k in ("P", "A", "F")}
    prompt = "a papercut fox in a forest"
    report = {"machine": machine_info(2), "versions": tool_versions("openvino"), "model": a.model, "builds": builds,
              "adapters": added, "rounds": a.rounds, "warmup": 1, "sizes": {}}
    for hw in sizes:
        kw = dict(steps=4, guidance=1.0, height=hw[0], width=hw[1], seed=1)

        def run(p, adapters=None):
            t0 = time.perf_counter()
            p(prompt, adapters=adapters, **kw)
            return time.perf_counter() - t0, list(p.last_timings.unet)

        for p in pipes.values():  # warm-up: first inference of this shape
            run(p)
        speed = {k: {"e2e": [], "unet_step": []} for k in ("P", "A none", "A X@0.8", "F")}
        switch = {k: [] for k in ("none -> X (first use: read + assemble)", "λ change X 0.8 -> 0.5", "A -> B (X -> Y)",
                                  "none -> two (X + Y)")}
        held = []
        for _ in range(a.rounds):
            A = pipes["A"]
            A.adapters = Adapters(A.engine_dir, A.manifest)  # fresh cache: a first use reads the factors
            run(A)
            first, _ = run(A, {"X": 0.8})
            held.append(A.adapters.resident_bytes() / 1e6)
            warm, steps = run(A, {"X": 0.8})
            switch["none -> X (first use: read + assemble)"].append(first - warm)
            speed["A X@0.8"]["e2e"].append(warm)
            speed["A X@0.8"]["unet_step"] += steps
            first, _ = run(A, {"X": 0.5})
            warm, _ = run(A, {"X": 0.5})
            switch["λ change X 0.8 -> 0.5"].append(first - warm)
            first, _ = run(A, {"Y": 0.8})
            warm, _ = run(A, {"Y": 0.8})
            switch["A -> B (X -> Y)"].append(first - warm)
            run(A)
            first, _ = run(A, {"X": 0.8, "Y": 0.8})
            warm, _ = run(A, {"X": 0.8, "Y": 0.8})
            switch["none -> two (X + Y)"].append(first - warm)
            for key, p, ad in (("P", pipes["P"], None), ("A none", A, None), ("F", pipes["F"], None)):
                t, steps = run(p, ad)
                speed[key]["e2e"].append(t)
                speed[key]["unet_step"] += steps
            print(f"{hw}: round done", flush=True)
        med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in speed.items()}
        report["sizes"][f"{hw[0]}x{hw[1]}"] = {
            "median_s": med, "runs_s": speed,
            "switch_cost_s": {k: {"median": statistics.median(v), "runs": v} for k, v in switch.items()},
            "no_adapter_vs_plain": med["A none"]["unet_step"] / med["P"]["unet_step"] - 1,
            "adapter_vs_fused": med["A X@0.8"]["unet_step"] / med["F"]["unet_step"] - 1,
            "held_after_first_use_mb": {"median": statistics.median(held), "runs": held},
            "x_factors_mb": added["X"]["bytes"] / 1e6,
        }
        print(json.dumps(report["sizes"][f"{hw[0]}x{hw[1]}"], indent=1, default=str), flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [f"# Run-time adapters on {report['model']} ({m['cpu']}, {m['cores']} cores; {builds['A']['backend']} {builds['A']['precision']})",
             "", f"{a.rounds} interleaved rounds after one warm-up image per entry and size; medians.", "",
             "| size | UNet step P (plain) | A, no adapter | A, X rank 64 at 0.8 | F (X fused) | no adapter vs plain | X vs fused |",
             "|---|---|---|---|---|---|---|"]
    for s, r in report["sizes"].items():
        md = r["median_s"]
        lines.append(f"| {s} | {md['P']['unet_step']:.3f} s | {md['A none']['unet_step']:.3f} s | {md['A X@0.8']['unet_step']:.3f} s | "
                     f"{md['F']['unet_step']:.3f} s | {r['no_adapter_vs_plain']:+.1%} | {r['adapter_vs_fused']:+.1%} |")
    lines += ["", "| size | switch | cost (first image after it minus a warm one) |", "|---|---|---|"]
    for s, r in report["sizes"].items():
        lines += [f"| {s} | {k} | {v['median'] * 1e3:+.0f} ms |" for k, v in r["switch_cost_s"].items()]
    lines += ["", "| size | held by the runtime after X's first use (arrays, each counted once) | X's factors file |", "|---|---|---|"]
    lines += [f"| {s} | {r['held_after_first_use_mb']['median']:.1f} MB | {r['x_factors_mb']:.1f} MB |" for s, r in report["sizes"].items()]
    lines += ["", "Builds: " + "; ".join(f"{k} {v['seconds']} s" for k, v in builds.items()),
              "Adapters: " + "; ".join(f"{k} rank {v['ranks']} over {v['layers']} layers, add {v['add_seconds']} s" for k, v in added.items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
