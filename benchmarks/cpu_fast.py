"""The fast preset against the default (quality) entry, and the int8 schemes against each other, on CPU.

Builds (through the library, one entry each, every size in one entry):
  quality           ``--preset quality``: today's default (bf16 on native-bf16 CPUs, else fp32; the base's VAE)
  fast              ``--preset fast``: int8 UNet (DEFAULT_INT8_SCHEME) + the family's tiny VAE decoder
  tiny-vae          the quality UNet + the tiny VAE decoder (what the decoder alone buys)
  int8-<scheme>     ``--precision int8 --int8-scheme <scheme>`` with the base's VAE, one per scheme (the scheme
                    decision: UNet step time and image quality, the decoder unchanged)
then, per size, in interleaved rounds (each round loads each entry in turn, runs one warm-up image and
``--runs`` timed images, and unloads it: one entry in memory at a time), the median UNet step, VAE
decode and end-to-end time over every round. Quality: the 4-step image of every entry against
diffusers' PyTorch fp32 pipeline with the base's own VAE (same weights, latents and step noise) for
``--prompts`` held-out prompts (none of them in the calibration set), PSNR and SSIM (mean and worst);
the fast and tiny-vae entries also against diffusers with the same tiny decoder. Writes report.json and
report.md (machine, versions, CPU flags; the measured scheme choice) under --out.

Random weights (demo:*): the images are noise, so PSNR/SSIM say how far the engine is from PyTorch fp32
on the same weights, not how good a picture is.

Usage (repository root; the sd15-full run takes about 1.5-2 h on 2 cores and ~14 GB peak while building):
  python benchmarks/cpu_fast.py --base demo:sd15-full --resolution 256x256 --resolution 512x512 \\
      --engines-root out/cpu-fast-engines --out benchmarks/reports/cpu-fast
Smoke test (seconds per entry):
  python benchmarks/cpu_fast.py --base demo:sd15 --resolution 64x64 --rounds 2 --prompts 1 \\
      --engines-root /tmp/cpu-fast-engines --out /tmp/cpu-fast-report
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

PROMPTS = ("a lighthouse on a cliff at sunset, oil painting", "a close-up photo of a tabby cat on a sofa",
           "an isometric illustration of a small village")
"""Held-out prompts: none is in calibration.CALIBRATION_PROMPTS (the int8 UNet is calibrated on those)."""


def _hw(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def variants(schemes: list[str], tiny: str | None) -> dict[str, dict]:
    """{label: BuildOptions fields}: the entries this benchmark builds."""
    out = {"quality": {"preset": "quality"}, "fast": {"preset": "fast", "vae_decoder": tiny},
           "tiny-vae": {"preset": "quality", "vae_decoder": tiny}}
    for s in schemes:
        out[f"int8-{s}"] = {"precision": "int8", "int8_scheme": s}
    return out


def build_all(a, labels: dict[str, dict]) -> dict[str, dict]:
    from lcm_export.builder.build_engine import BuildOptions, build_engine
    from lcm_export.errors import UserError

    built, refused = {}, {}
    for label, fields in labels.items():
        d = Path(a.engines_root) / label
        t0 = time.perf_counter()
        print(f"build {label} -> {d}", flush=True)
        try:
            r = build_engine(BuildOptions(base=a.base, loras=tuple(a.lora), resolutions=tuple(a.resolution), engine_dir=str(d),
                                          threads=a.threads, show_progress=not a.quiet,
                                          **{k: v for k, v in fields.items() if v is not None}))
        except UserError as exc:  # e.g. int8 on a CPU without VNNI, or an image gate: recorded, the rest still runs
            refused[label] = str(exc)
            print(f"  refused: {exc}", flush=True)
            continue
        m = r.manifest
        unet = m["components"]["unet"]
        built[label] = {
            "engine_dir": str(d), "reused": r.reused, "build_s": round(time.perf_counter() - t0, 1),
            "precision": m["precision"], "components": {c: rec["precision"] for c, rec in m["components"].items()},
            "int8_scheme": (unet.get("quantization") or {}).get("scheme"),
            "vae_decoder": (m.get("vae_decoder") or {}).get("source"), "preset": (m.get("preset") or {}).get("name"),
            "fidelity": m.get("fidelity"), "disk_bytes": sum(m["file_sizes"].values()),
            "unet_engine_bytes": sum(m["file_sizes"].get(f, 0) for f in unet["files"]),
            "messages": r.messages,
        }
        print(f"  {r.summary()}", flush=True)
        gc.collect()
    return built, refused


def references(a, hws, prompts, tiny: str | None) -> dict:
    """{(hw, prompt index): {"full": image, "tiny": image}}: diffusers PyTorch fp32 with the base's VAE (and with
    the tiny decoder), the same fused weights, latents and step noise as the entries get."""
    from lcm_export.builder.plan import BuildOptions, resolve_loras
    from lcm_export.builder.fuse import fuse_into
    from lcm_export.sources.models import base_family, load_pipeline, resolve_base
    from lcm_export.builder.verify import diffusers_images, seeded_inputs

    src = resolve_base(a.base)
    pipe = load_pipeline(src)
    fuse_into(pipe, resolve_loras(BuildOptions(base=a.base, loras=tuple(a.lora)), src, False))
    tiny_vae = None
    if tiny:
        from lcm_export.sources.tiny_vae import load_vae_decoder, resolve_vae_decoder

        tiny_vae = load_vae_decoder(resolve_vae_decoder(tiny, base_family(src)))
    refs = {}
    for hw in hws:
        for i, prompt in enumerate(prompts):
            latents, noise = seeded_inputs(4, hw, 4, seed=100 + i)
            t0 = time.perf_counter()
            full = diffusers_images(pipe, prompt, 4, 1.0, latents, noise)
            entry = {"full": full, "latents": latents, "noise": noise, "torch_fp32_s": time.perf_counter() - t0}
            if tiny_vae is not None:
                own, pipe.vae = pipe.vae, tiny_vae
                try:
                    entry["tiny"] = diffusers_images(pipe, prompt, 4, 1.0, latents, noise)
                finally:
                    pipe.vae = own
            refs[(hw, i)] = entry
            print(f"reference {hw[0]}x{hw[1]} prompt {i}: {entry['torch_fp32_s']:.1f} s", flush=True)
    del pipe
    gc.collect()
    return refs


def measure(a, built: dict, hws, prompts, refs) -> dict:
    """Interleaved rounds: per round, each entry loaded, warmed up and timed at each size, then unloaded."""
    from lcm_export.runtime import LCMPipeline
    from lcm_export.builder.verify import psnr, seeded_inputs, ssim

    times = {label: {hw: {"unet_step": [], "vae": [], "e2e": [], "text": []} for hw in hws} for label in built}
    quality = {label: {} for label in built}
    for rnd in range(a.rounds):
        for label, info in built.items():
            t0 = time.perf_counter()
            pipe = LCMPipeline.from_engine_dir(info["engine_dir"], threads=a.threads)
            load_s = time.perf_counter() - t0
            for hw in hws:
                latents, noise = seeded_inputs(4, hw, 4, seed=7)
                for _ in range(a.warmup):
                    pipe(prompts[0], height=hw[0], width=hw[1], latents=latents, step_noise=noise, output_type="np")
                for _ in range(a.runs):
                    pipe(prompts[0], height=hw[0], width=hw[1], latents=latents, step_noise=noise, output_type="np")
                    t = pipe.last_timings
                    rec = times[label][hw]
                    rec["unet_step"] += list(t.unet)
                    rec["vae"].append(t.vae_decoder)
                    rec["e2e"].append(t.total)
                    rec["text"].append(t.text_encoder)
                if rnd == 0:  # quality once (deterministic)
                    rows = []
                    for i, prompt in enumerate(prompts):
                        ref = refs[(hw, i)]
                        img = pipe(prompt, height=hw[0], width=hw[1], latents=ref["latents"], step_noise=ref["noise"],
                                   output_type="np")
                        row = {"psnr_db": psnr(img, ref["full"]), "ssim": ssim(img, ref["full"])}
                        if "tiny" in ref and info["vae_decoder"]:
                            row.update(psnr_same_decoder_db=psnr(img, ref["tiny"]), ssim_same_decoder=ssim(img, ref["tiny"]))
                        rows.append(row)
                    quality[label][hw] = rows
            print(f"round {rnd + 1}/{a.rounds} {label}: load {load_s:.1f} s, " + ", ".join(
                f"{hw[0]}x{hw[1]} e2e {times[label][hw]['e2e'][-1]:.2f} s" for hw in hws), flush=True)
            del pipe
            gc.collect()
    out = {}
    for label in built:
        out[label] = {}
        for hw in hws:
            t = times[label][hw]
            q = quality[label][hw]
            agg = {k: {"mean": float(np.mean([r[k] for r in q])), "worst": float(np.min([r[k] for r in q]))} for k in q[0]}
            out[label][f"{hw[0]}x{hw[1]}"] = {
                "unet_step_s": float(np.median(t["unet_step"])), "vae_decode_s": float(np.median(t["vae"])),
                "end_to_end_s": float(np.median(t["e2e"])), "text_encoder_s": float(np.median(t["text"])),
                "runs": {k: [round(x, 4) for x in v] for k, v in t.items()}, "quality": agg, "quality_per_prompt": q}
    return out


def decide(results: dict, schemes: list[str], hws) -> dict:
    """The measured scheme choice: the fastest int8 scheme (UNet step at the largest size) whose worst image
    over the prompts passes the int8 gate (verify.INT8_IMAGE_GATE) at every size."""
    from lcm_export.builder.verify import INT8_IMAGE_GATE

    big = f"{max(hws, key=lambda hw: hw[0] * hw[1])[0]}x{max(hws, key=lambda hw: hw[0] * hw[1])[1]}"
    rows = []
    for s in schemes:
        r = results.get(f"int8-{s}")
        if not r:
            continue
        ok = all(r[k]["quality"]["psnr_db"]["worst"] >= INT8_IMAGE_GATE["psnr_db"] and
                 r[k]["quality"]["ssim"]["worst"] >= INT8_IMAGE_GATE["ssim"] for k in r)
        rows.append({"scheme": s, "unet_step_s": r[big]["unet_step_s"], "passes_gate": ok})
    passing = [r for r in rows if r["passes_gate"]]
    best = min(passing, key=lambda r: r["unet_step_s"])["scheme"] if passing else None
    return {"at": big, "gate": INT8_IMAGE_GATE, "candidates": rows, "choice": best}


def write_report(a, out: Path, built, refused, results, decision, hws, prompts, refs) -> dict:
    from lcm_export._util import tool_versions, write_json, write_text
    from lcm_export.backends.openvino import DEFAULT_INT8_SCHEME
    from lcm_export.bench.harness import machine_info

    threads = a.threads or len(os.sched_getaffinity(0))
    rep = {"schema": "lcm-export-cpu-fast/1", "base": a.base, "loras": list(a.lora), "resolutions": [f"{h}x{w}" for h, w in hws],
           "rounds": a.rounds, "runs_per_round": a.runs, "warmup_per_round": a.warmup, "prompts": list(prompts),
           "machine": machine_info(threads), "versions": tool_versions("openvino", "nncf"),
           "default_int8_scheme_at_run": DEFAULT_INT8_SCHEME, "entries": built, "refused": refused, "results": results,
           "scheme_decision": decision,
           "torch_fp32_reference_s": {f"{hw[0]}x{hw[1]}": float(np.median([refs[(hw, i)]["torch_fp32_s"] for i in range(len(prompts))]))
                                      for hw in hws},
           "note": "medians over every timed run of every round; UNet step = one UNet call; PSNR/SSIM of the 4-step image "
                   "against diffusers PyTorch fp32 with the base's own VAE (same weights, latents, step noise), mean and "
                   "worst over the prompts; random-weight models make noise images: the figures measure distance to "
                   "PyTorch fp32, not picture quality"}
    write_json(out / "report.json", rep)
    m = rep["machine"]
    lines = [f"# CPU fast preset and int8 schemes — {a.base}", "",
             f"- machine: {m['cpu']} ({' '.join(m['flags'])}), {threads} threads",
             f"- versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}",
             f"- {a.rounds} interleaved rounds x ({a.warmup} warm-up + {a.runs} timed) images per entry and size; medians",
             f"- quality: 4-step image vs diffusers PyTorch fp32 with the base's VAE, {len(prompts)} held-out prompts (mean / worst)",
             "- random weights: PSNR/SSIM measure the distance to PyTorch fp32 on the same weights, not picture quality", ""]
    for hw in hws:
        k = f"{hw[0]}x{hw[1]}"
        q0 = results["quality"][k]
        lines += [f"## {k}", "", "| entry | UNet | VAE decoder | UNet step s | VAE decode s | end to end s | vs quality | "
                  "PSNR dB (worst) | SSIM (worst) | same-decoder PSNR dB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            x, e = r[k], built[label]
            unet = e["components"]["unet"] + (f" ({e['int8_scheme']})" if e["int8_scheme"] else "")
            same = x["quality"].get("psnr_same_decoder_db")
            lines.append(f"| {label} | {unet} | {e['vae_decoder'] or 'base VAE'} ({e['components']['vae_decoder']}) | "
                         f"{x['unet_step_s']:.3f} | {x['vae_decode_s']:.3f} | {x['end_to_end_s']:.3f} | "
                         f"{q0['end_to_end_s'] / x['end_to_end_s']:.2f}x | {x['quality']['psnr_db']['mean']:.1f} "
                         f"({x['quality']['psnr_db']['worst']:.1f}) | {x['quality']['ssim']['mean']:.3f} "
                         f"({x['quality']['ssim']['worst']:.3f}) | {'' if same is None else format(same['mean'], '.1f')} |")
        lines.append("")
    lines += ["## int8 scheme decision", "",
              f"Fastest scheme at {decision['at']} whose worst image passes the int8 gate (PSNR >= {decision['gate']['psnr_db']} dB, "
              f"SSIM >= {decision['gate']['ssim']}): **{decision['choice'] or 'none passes'}** "
              f"(DEFAULT_INT8_SCHEME at this run: {DEFAULT_INT8_SCHEME}).", "",
              "| scheme | UNet step s | passes gate |", "|---|---|---|"]
    lines += [f"| {c['scheme']} | {c['unet_step_s']:.3f} | {'yes' if c['passes_gate'] else 'no'} |" for c in decision["candidates"]]
    lines += ["", "## Entries", "", "| entry | precision | build s | disk GB | UNet engine MB | build-time image check |", "|---|---|---|---|---|---|"]
    for label, e in built.items():
        f = e["fidelity"] or {}
        fid = f"PSNR {f['image_psnr_db']:.1f} dB, SSIM {f.get('image_ssim', float('nan')):.3f}" if "image_psnr_db" in f else "-"
        lines.append(f"| {label} | {e['precision']} | {e['build_s']}{' (reused)' if e['reused'] else ''} | "
                     f"{e['disk_bytes'] / 1e9:.2f} | {e['unet_engine_bytes'] / 1e6:.0f} | {fid} |")
    lines += [f"| {label} | refused: {why} | | | | |" for label, why in refused.items()]
    lines.append("")
    write_text(out / "report.md", "\n".join(lines))
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="demo:sd15-full")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    ap.add_argument("--resolution", action="append", type=_hw, default=[], metavar="HxW")
    ap.add_argument("--schemes", default=None, help="comma list of int8 schemes to compare (default: all of INT8_SCHEMES; '' for none)")
    ap.add_argument("--variants", default=None,
                    help="comma list of entries to build and compare (default: all: quality,fast,tiny-vae,int8-<scheme>...); "
                         "quality is always included (the baseline)")
    ap.add_argument("--vae-decoder", default=None, help="tiny decoder for fast / tiny-vae (default: the preset's for the base)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="timed images per entry, size and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images per entry, size and round (after each load)")
    ap.add_argument("--prompts", type=int, default=3, help=f"held-out prompts for the quality figures (at most {len(PROMPTS)})")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--engines-root", required=True, help="where the entries are built (kept: a rerun reuses them)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()

    from lcm_export.backends.openvino import INT8_SCHEMES
    from lcm_export.sources.models import base_family, resolve_base
    from lcm_export.builder.presets import resolve_preset

    hws = list(dict.fromkeys(a.resolution or [(256, 256), (512, 512)]))
    a.resolution = hws
    schemes = list(INT8_SCHEMES) if a.schemes is None else [s for s in a.schemes.split(",") if s]
    src = resolve_base(a.base)
    tiny = a.vae_decoder or resolve_preset("fast", "auto", None, base_family(src), src.kind == "demo", "cpu", True, True, True).vae_decoder
    prompts = PROMPTS[:max(1, min(a.prompts, len(PROMPTS)))]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    labels = variants(schemes, tiny)
    if a.variants:
        want = ["quality"] + [v for v in a.variants.split(",") if v and v != "quality"]
        unknown = [v for v in want if v not in labels]
        if unknown:
            raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(labels)}")
        labels = {k: labels[k] for k in want}
        schemes = [s for s in schemes if f"int8-{s}" in labels]
    todo = [k for k in labels if not (Path(a.engines_root) / k / "manifest.json").is_file()]
    Path(a.engines_root).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.engines_root).free
    if a.base.endswith("-full") and free < 12e9 * len(todo):
        print(f"warning: {free / 1e9:.0f} GB free for {len(todo)} entries to build (an SD 1.5 bf16 entry takes ~12 GB; "
              "int8 ones less): consider splitting the run with --variants", flush=True)
    built, refused = build_all(a, labels)
    if "quality" not in built:
        raise SystemExit(f"the quality entry did not build: {refused.get('quality')}")
    refs = references(a, hws, prompts, tiny)
    results = measure(a, built, hws, prompts, refs)
    decision = decide(results, schemes, hws)
    write_report(a, out, built, refused, results, decision, hws, prompts, refs)
    print((out / "report.md").read_text())
    print(json.dumps({"scheme_choice": decision["choice"]}))


if __name__ == "__main__":
    main()
