"""Refit against a full build: time and fidelity (the LoRA hot-swap issue's targets).

On a base (default demo:sd15-full, the real SD 1.5 configs) at one resolution with the default
backend: a full build with an LCM-LoRA-shaped and a style LoRA; then, as refits of that entry, a λ
change and a style-LoRA swap, each timed; then a fresh full build (--no-refit) with the final
inputs, and the refitted entry against it: UNet output rel-L2 on seeded inputs and the 4-step image
PSNR (same latents and step noise). Writes report.json and report.md.

Usage: python benchmarks/refit_bench.py [--base demo:sd15-full] [--resolution 512x512] --work DIR --out DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="demo:sd15-full")
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--work", required=True, help="folder for the LoRAs and the two entries (~25 GB for SD 1.5)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases-only", action="store_true",
                    help="one more λ refit of the existing WORK/entry; add its per-phase times to OUT's report")
    a = ap.parse_args()

    from safetensors.numpy import load_file, save_file

    from lcm_export._util import tool_versions, write_json, write_text
    from lcm_export.bench.harness import machine_info
    from lcm_export.builder.build_engine import BuildOptions, build_engine
    from lcm_export.sources.demo import build_demo_pipeline, write_demo_loras
    from lcm_export.builder.verify import psnr, seeded_inputs
    from lcm_export.runtime import LCMPipeline

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hw = tuple(int(v) for v in a.resolution.split("x"))
    name = a.base.split(":", 1)[1] if a.base.startswith("demo:") else "base"
    (lcm, _), (style, _) = write_demo_loras(build_demo_pipeline(name), work / "loras", name)
    style2 = work / "loras" / "style2.safetensors"
    if not style2.exists():  # another style LoRA: the same layers, other values
        sd = load_file(str(style))
        rng = np.random.default_rng(7)
        import safetensors

        with safetensors.safe_open(str(style), "np") as f:
            meta = f.metadata()
        save_file({k: (v * rng.uniform(0.5, 1.5)).astype(v.dtype) for k, v in sd.items()}, str(style2), metadata=meta)

    def build(d, loras, **kw):
        t0 = time.perf_counter()
        r = build_engine(BuildOptions(base=a.base, loras=tuple(loras), resolutions=(hw,), engine_dir=str(d), backend=a.backend,
                                      precision=a.precision, show_progress=False, **kw))
        print(r.summary().splitlines()[0], flush=True)
        return r, time.perf_counter() - t0

    entry, fresh = work / "entry", work / "fresh"
    if a.phases_only:
        import json

        r, t = build(entry, [f"{lcm}:1.0", f"{style2}:0.4"])
        assert r.refit, "the entry was not refit"
        rep = json.loads((Path(a.out) / "report.json").read_text())
        rep["phases_run"] = {"seconds": t, "refit": r.manifest["refit"]}
        write_json(Path(a.out) / "report.json", rep)
        rows = "\n".join(f"| {k} | {v:.1f} | {v / rep['full_build_s'] * 100:.1f} % |" for k, v in r.manifest["refit"]["phases_s"].items())
        md = (Path(a.out) / "report.md").read_text()
        write_text(Path(a.out) / "report.md", md + "\nWhere a refit's time goes (one more refit of the same entry, style2 λ 0.5 → 0.4, "
                   f"{t:.1f} s in all):\n\n| phase | seconds | share of the full build |\n|---|---|---|\n{rows}\n")
        print(r.manifest["refit"]["phases_s"])
        return
    full, t_full = build(entry, [f"{lcm}:1.0", f"{style}:0.8"], force=True)
    lam, t_lam = build(entry, [f"{lcm}:1.0", f"{style}:0.5"])
    swap, t_swap = build(entry, [f"{lcm}:1.0", f"{style2}:0.5"])
    ref, t_fresh = build(fresh, [f"{lcm}:1.0", f"{style2}:0.5"], no_refit=True, force=True)
    assert lam.refit and swap.refit and not ref.refit

    rng = np.random.default_rng(0)
    m = swap.manifest
    feeds = {"sample": rng.standard_normal((1, m["latent_channels"], hw[0] // 8, hw[1] // 8), dtype=np.float32),
             "timestep": np.array([499.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, m["text_dim"]), dtype=np.float32)}
    outs, imgs = [], []
    for d in (entry, fresh):
        pipe = LCMPipeline.from_engine_dir(d)
        outs.append(pipe.engines["unet"]["*"].run(feeds).astype(np.float64))
        lat, noise = seeded_inputs(pipe.latent_channels, hw, 4, seed=42)
        imgs.append(pipe("a photo of an astronaut riding a horse", steps=4, height=hw[0], width=hw[1], latents=lat,
                         step_noise=noise, output_type="np"))
        del pipe
    rel = float(np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1]))
    p = psnr(imgs[0], imgs[1])
    rep = {"schema": "lcm-export-refit/1", "base": a.base, "resolution": a.resolution, "backend": m["backend"],
           "precision": m["precision"], "machine": machine_info(len(__import__("os").sched_getaffinity(0))),
           "versions": tool_versions("openvino"),
           "full_build_s": t_full, "refit_lambda_s": t_lam, "refit_swap_s": t_swap, "fresh_build_s": t_fresh,
           "refit_lambda_share": t_lam / t_full, "refit_swap_share": t_swap / t_full,
           "refit_records": [lam.manifest["refit"], swap.manifest["refit"]],
           "unet_rel_l2_refit_vs_fresh": rel, "image_psnr_db_refit_vs_fresh": p,
           "note": "each figure is one run (a build is minutes); wall time of build_engine() in this process"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", rep)
    lines = [f"# Refit vs full build — {a.base} at {a.resolution}, {m['backend']} {m['precision']}", "",
             f"{rep['machine']['cpu']}, {rep['machine']['cores']} cores; one run each (a full build takes minutes).", "",
             "| step | seconds | share of the full build |", "|---|---|---|",
             f"| full build (LCM-LoRA λ=1.0 + style λ=0.8) | {t_full:.1f} | 100 % |",
             f"| refit: style λ 0.8 → 0.5 | {t_lam:.1f} | {t_lam / t_full * 100:.1f} % |",
             f"| refit: style LoRA swapped (style2, λ=0.5) | {t_swap:.1f} | {t_swap / t_full * 100:.1f} % |",
             f"| fresh full build with the final inputs (--no-refit) | {t_fresh:.1f} | {t_fresh / t_full * 100:.0f} % |", "",
             f"Refitted entry against the fresh build: UNet output rel-L2 {rel:.1e} (seeded inputs), "
             f"4-step image PSNR {p:.1f} dB (same latents and step noise).", "",
             f"Components re-derived per refit: {', '.join(lam.manifest['refit']['components'])} "
             f"({lam.manifest['refit']['weights_changed']} weights patched).", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}.", ""]
    write_text(out / "report.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
