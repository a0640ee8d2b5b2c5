"""Which CPU backend, and which components in bf16: the measurements behind ``--precision auto`` and
``backends/openvino.py: BF16_COMPONENTS`` / ``SPEED_RANK``.

For each component of an OpenVINO entry (its IR) and, if given, an ONNX Runtime entry of the same
model: median seconds per call for ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16, and each
one's rel-L2 against the OpenVINO fp32 output on the same seeded inputs. Then the image-level cost of
each bf16 component: the 4-step image (same latents and step noise) with all components bf16, and
with each one in turn kept in fp32, as PSNR against the all-fp32 OpenVINO image (whose own parity
against PyTorch fp32 is recorded by build-engine). One process; the components run one at a time.

Usage: python benchmarks/cpu_backends.py --ov-entry DIR [--ort-entry DIR] --resolution 512x512 [--runs 3] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from lcm_export.bench.harness import median_time


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _feeds(comp: str, m: dict, hw) -> dict:
    rng = np.random.default_rng(0)
    lat = (1, int(m.get("latent_channels", 4)), hw[0] // 8, hw[1] // 8)
    if comp.startswith("text_encoder"):
        return {"input_ids": rng.integers(0, 1000, (1, 77)).astype(np.int32)}
    if comp == "vae_decoder":
        return {"latent": (rng.standard_normal(lat) / m["vae"]["scaling_factor"]).astype(np.float32)}
    f = {"sample": rng.standard_normal(lat, dtype=np.float32), "timestep": np.array([999.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((1, 77, m["text_dim"]), dtype=np.float32)}
    if m.get("pooled_dim"):
        f["text_embeds"] = rng.standard_normal((1, m["pooled_dim"]), dtype=np.float32)
        f["time_ids"] = np.array([[hw[0], hw[1], 0, 0, hw[0], hw[1]]], np.float32)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ov-entry", required=True)
    ap.add_argument("--ort-entry", default=None)
    ap.add_argument("--resolution", default="512x512")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from lcm_export._util import tool_versions, write_json, write_text
    from lcm_export.backends.onnxruntime import OrtEngine
    from lcm_export.backends.openvino import OvEngine
    from lcm_export.bench.harness import machine_info
    from lcm_export.builder.verify import psnr, seeded_inputs
    from lcm_export.runtime import LCMPipeline
    from lcm_export.store.manifest import read_manifest

    hw = tuple(int(v) for v in a.resolution.split("x"))
    ov_dir = Path(a.ov_entry)
    m = read_manifest(ov_dir)
    ort_m = read_manifest(a.ort_entry) if a.ort_entry else None
    rows = {}
    engines = {}
    for comp, rec in m["components"].items():
        xml = ov_dir / rec["engines"]["*"]
        feeds = _feeds(comp, m, hw)
        row = {}
        outs = {}
        paths = [("openvino fp32", lambda: OvEngine(xml, "fp32", a.threads, ov_dir)),
                 ("openvino bf16", lambda: OvEngine(xml, "bf16", a.threads, ov_dir))]
        if ort_m:
            f = Path(a.ort_entry) / ort_m["components"][comp]["engines"]["*"]
            paths.insert(0, ("onnxruntime fp32", lambda: OrtEngine(f, ["CPUExecutionProvider"], a.threads, "ORT_DISABLE_ALL")))
        for name, make in paths:
            t0 = time.perf_counter()
            eng = make()
            load = time.perf_counter() - t0
            med, ts = median_time(lambda e=eng: e.run_all(feeds), a.runs)
            outs[name] = eng.run_all(feeds)[0]
            row[name] = {"median_s": med, "runs_s": ts, "load_s": load}
            if name.startswith("openvino"):
                engines[(comp, name.split()[1])] = eng
            del eng
            import gc

            gc.collect()
            print(f"{comp:15s} {name:17s} {med * 1e3:9.1f} ms", flush=True)
        for name in row:
            row[name]["rel_l2_vs_openvino_fp32"] = _rel(outs[name], outs["openvino fp32"])
        rows[comp] = row

    # image-level: all bf16, and each component kept in fp32 in turn, against all fp32 (the pipeline
    # runs the engines measured above: loading the entry's own would hold every UNet twice in memory)
    from lcm_export.runtime.tokenizer import ClipTokenizer

    toks = {k: ClipTokenizer(ov_dir / m[k]["file"], m[k]["max_length"], m[k]["pad_id"]) for k in ("tokenizer", "tokenizer_2") if k in m}
    sched = json.loads((ov_dir / m["scheduler"]["file"]).read_text())
    pipe = LCMPipeline(m, ov_dir, {c: {} for c in m["components"]}, toks, sched)
    latents, noise = seeded_inputs(pipe.latent_channels, hw, 4, seed=42)

    def image(precisions: dict) -> tuple[np.ndarray, float]:
        for comp in pipe.engines:
            pipe.engines[comp] = {"*": engines[(comp, precisions[comp])]}
        img = pipe("a photo of an astronaut riding a horse", steps=4, height=hw[0], width=hw[1], latents=latents,
                   step_noise=noise, output_type="np")
        return img, pipe.last_timings.total

    comps = list(m["components"])
    ref, t_fp32 = image({c: "fp32" for c in comps})
    image(dict.fromkeys(comps, "bf16"))  # warm
    variants = {"all fp32": {"psnr_db": float("inf"), "end_to_end_s": t_fp32}}
    for keep in [None] + comps:
        prec = {c: ("fp32" if c == keep else "bf16") for c in comps}
        img, t = image(prec)
        label = "all bf16" if keep is None else f"bf16, {keep} fp32"
        variants[label] = {"psnr_db": psnr(img, ref), "end_to_end_s": t}
        print(f"{label:28s} PSNR {variants[label]['psnr_db']:.1f} dB  {t:.2f} s", flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = {"schema": "lcm-export-cpu-backends/1", "model": m.get("base_source"), "resolution": a.resolution, "runs": a.runs,
           "warmup": 1, "threads": a.threads, "machine": machine_info(a.threads), "versions": tool_versions("openvino"),
           "components": rows, "image_variants": variants,
           "note": "end_to_end_s: one 4-step image after a warm-up, single run; rel-L2 and PSNR against OpenVINO fp32"}
    write_json(out / "report.json", rep)
    names = [n for n in ("onnxruntime fp32", "openvino fp32", "openvino bf16") if any(n in r for r in rows.values())]
    lines = [f"# CPU backends and bf16 per component — {rep['model']} at {a.resolution}", "",
             f"{rep['machine']['cpu']}, {a.threads} threads; batch 1; 1 warm-up + {a.runs} timed calls each, median. "
             "rel-L2 against the OpenVINO fp32 output on the same seeded inputs.", "",
             "| component | " + " | ".join(f"{n} ms (rel-L2)" for n in names) + " | bf16 speed-up |",
             "|---|" + "---|" * (len(names) + 1)]
    for comp, r in rows.items():
        cells = [f"{r[n]['median_s'] * 1e3:.1f} ({r[n]['rel_l2_vs_openvino_fp32']:.1e})" for n in names]
        lines.append(f"| {comp} | " + " | ".join(cells) + f" | {r['openvino fp32']['median_s'] / r['openvino bf16']['median_s']:.2f}x |")
    lines += ["", "4-step image (same latents and step noise) against the all-fp32 OpenVINO image:", "",
              "| variant | PSNR dB | end to end s (1 run) |", "|---|---|---|"]
    for k, v in variants.items():
        lines.append(f"| {k} | {v['psnr_db']:.1f} | {v['end_to_end_s']:.2f} |")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}.", ""]
    write_text(out / "report.md", "\n".join(lines))


if __name__ == "__main__":
    main()
