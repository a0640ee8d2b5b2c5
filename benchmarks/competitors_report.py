"""Medians and report.md for `competitors.py` (standard library only)."""

from __future__ import annotations

import statistics


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _p90(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, round(0.9 * (len(xs) - 1))))
    return xs[k]


def _stage_medians(images: list[dict]) -> dict:
    steps = [s for im in images for s in (im["stages"].get("unet_steps") or [])]
    return {"unet_step_s": _med(steps), "text_encoder_s": _med([im["stages"].get("text_encoder") for im in images]),
            "vae_decoder_s": _med([im["stages"].get("vae_decoder") for im in images])}


def aggregate_plain(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"error": rows[0]["error"] if rows else "not run"}
    images = [im for r in ok for im in r.get("images", [])]
    warm = [im["seconds"] for im in images]
    out = {"image_s": _med(warm), "image_p90_s": _p90(warm), "image_min_s": min(warm) if warm else None, "n_images": len(warm),
           **_stage_medians(images),
           "load_s": _med([r.get("load_s") for r in ok]), "first_image_s": _med([r.get("first_image_s") for r in ok]),
           "cold_start_s": _med([r.get("cold_start_s") for r in ok]),
           "peak_rss_first_mb": _med([r.get("peak_rss_first_mb") for r in ok]),
           "peak_rss_first_max_mb": max(r.get("peak_rss_first_mb") or 0 for r in ok),
           "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in ok),
           "precision": ok[0].get("precision"), "image": ok[0].get("image"), "n_rounds": len(ok)}
    warnings = sorted({w for r in ok for w in r.get("lora_warnings", [])})
    if warnings:
        out["lora_warnings"] = warnings
    if len(ok) < len(rows):
        out["error_later_round"] = next(r["error"] for r in rows if "error" in r)
    return out


def aggregate_adapters(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"error": rows[0]["error"] if rows else "not run"}
    n_pass = min(len(r["passes"]) for r in ok)
    passes = []
    for p in range(n_pass):
        table = []
        for i, row0 in enumerate(ok[0]["passes"][p]):
            cells = [r["passes"][p][i] for r in ok]
            ops: dict[str, list[float]] = {}
            for c in cells:
                for k, v in c["ops"].items():
                    ops.setdefault(k, []).append(v)
            table.append({"label": row0["label"], "setting": row0["setting"],
                          "switch_s": _med([c["switch_s"] for c in cells]),
                          "first_s": _med([c["first"]["seconds"] for c in cells]),
                          "warm_s": _med([c["warm"]["seconds"] for c in cells]),
                          "ops_s": _med([c["ops_s"] for c in cells]), "ops": {k: _med(v) for k, v in ops.items()},
                          "warm_unet_step_s": _stage_medians([c["warm"] for c in cells])["unet_step_s"],
                          "image_vs_none": row0["image_vs_none"],
                          "first_call_errors": [c["first_call_error"] for c in cells if c.get("first_call_error")]})
        passes.append(table)
    out = {"load_s": _med([r.get("load_s") for r in ok]), "cold_start_s": _med([r.get("cold_start_s") for r in ok]),
           "peak_rss_first_mb": _med([r.get("peak_rss_first_mb") for r in ok]),
           "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in ok), "register_s": ok[0].get("register_s") or {},
           "precision": ok[0].get("precision"), "passes": passes, "n_rounds": len(ok)}
    warnings = sorted({w for r in ok for w in r.get("lora_warnings", [])})
    if warnings:
        out["lora_warnings"] = warnings
    return out


# ----------------------------------------------------------------------------------------------

def _s(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def precision_str(p: dict | None) -> str:
    if not p:
        return "?"
    dec = ", TAESD decoder" if p.get("vae_decoder") == "taesd" else ""
    if "sdcpp_weights" in p:  # stable-diffusion.cpp
        return f"sd.cpp {p['sdcpp_weights']} weights ({p.get('file')}){dec}"
    if "entry" in p:  # lcm-export
        comps = sorted({v for k, v in p.items() if k in ("text_encoder", "unet", "vae_decoder")})
        shapes = f", {p['shapes']} shapes" if p.get("shapes") else ""
        return f"{p['entry']} entry ({p.get('backend')}; plugin: {'/'.join(comps) or '?'}{shapes})"
    if "inference_precision" in p:  # GenAI
        types = set(p.get("unet_weights", []))
        w = "int8" if types & {"u8", "i8"} else "int4" if types & {"u4", "i4", "nf4"} else "fp16" if "f16" in types else "fp32"
        static = ", static shapes" if str(p.get("shapes", "")).startswith("static") else ""
        return f"{p['inference_precision']} compute, {w} UNet weights{static}{dec}"
    if "unet" in p and isinstance(p["unet"], str):  # optimum-intel
        types = set(p.get("unet_weights", []))
        w = ", int8 UNet" if types & {"u8", "i8"} else ""
        return f"{p['unet']} compute (OpenVINO){w}, {p.get('scheduler', '')}{dec}"
    if "unet" in p:  # diffusers
        lora = f", LoRA factors {'/'.join(p['lora_factors'])}" if p.get("lora_factors") else ""
        return f"torch {'/'.join(p['unet'])}{lora}"
    return str(p)


def check_str(rows) -> str:
    """"32.1 / 0.981 (a)" per reference; (a) VAE, (b) TAESD, (c) sd.cpp's own f32."""
    if not rows:
        return "—"
    tag = {"VAE": "(a)", "TAESD": "(b)"}
    out = []
    for c in rows:
        t = "(c)" if c["vs"].startswith("stable-diffusion.cpp") else tag.get(c["vs"].rsplit(", ", 1)[-1], "")
        if "error" in c:
            out.append(f"{t} {c['error']}")
        else:
            ss = "—" if c.get("ssim") is None else f"{c['ssim']:.3f}"
            out.append(f"{c['psnr_db']:.1f} / {ss} {t}")
    return "; ".join(out)


def _mb(x) -> str:
    return "—" if not x else f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB"


def adapter_baseline(name: str, ad: dict, plain: dict) -> str | None:
    """The plain run an adapter run is compared with: GenAI's same mode without adapters; for lcm-export's
    adapter entry, the first plain lcm-export entry of the same precision with the full VAE decoder, one that ran
    with the same shapes (static / dynamic) first."""
    if name.startswith("lcm-export adapters"):
        want = ad.get("precision") or {}
        same = [n for n, a in plain.items() if n.startswith("lcm-export") and "error" not in a
                and (a.get("precision") or {}).get("entry") == want.get("entry") and a.get("reference") != ["taesd"]
                and (a.get("precision") or {}).get("vae_decoder") != "taesd"]
        shaped = [n for n in same if (plain[n].get("precision") or {}).get("shapes") == want.get("shapes")]
        return (shaped or same or [None])[0]
    own = name[: -len(" adapters")] if name.endswith(" adapters") else None
    return own if own in plain and "error" not in plain[own] else None


def write_markdown(r: dict) -> str:
    st, m = r["settings"], r["machine"]
    L = [f"# Competitors side by side — {st['resolution']}, {r['model'].get('base') or r['model']['fused']}", "",
         f"{m['cpu']} ({', '.join(m['flags_speed'])}), {m['cores']} cores, {m.get('memory_gib')} GiB. Same fused weights "
         f"(`{r['model']['fused']}`), prompt \"{st['prompt']}\", {st['steps']} LCM steps, guidance {st['guidance']:g}, batch 1, "
         f"{st['threads']} threads each. Each figure: a fresh process per competitor and round, {st['rounds']} rounds "
         f"interleaved; in each process {st['warmup']} untimed image(s) (the first is the cold one), then {st['repeats']} timed; "
         f"medians over all timed images. Cold start: process start to its first image. Peak RSS: VmHWM right after "
         f"the first image.", ""]
    rows = r["plain"]
    ref_name = next((n for n in rows if n.startswith("lcm-export") and "error" not in rows[n]), None)
    L += ["## End to end", "",
          "| path | precision used | image s (median / p90) | UNet step s | text encoder s | VAE decode s | load s | cold start s | "
          f"peak RSS to first image | disk | image check PSNR dB / SSIM | image time / {ref_name or 'ours'} |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for name, a in rows.items():
        if "error" in a:
            L.append(f"| {name} | — | did not run | | | | | | | | | |")
            failed.append((name, a["error"]))
            continue
        ratio = ""
        if ref_name and rows[ref_name].get("image_s") and a.get("image_s"):
            ratio = f"{a['image_s'] / rows[ref_name]['image_s']:.2f}×"
        L.append(f"| {name} | {precision_str(a.get('precision'))} | {_s(a['image_s'])} / {_s(a['image_p90_s'])} | "
                 f"{_s(a['unet_step_s'])} | {_s(a['text_encoder_s'])} | {_s(a['vae_decoder_s'])} | {_s(a['load_s'], 2)} | "
                 f"{_s(a['cold_start_s'], 2)} | {_mb(a['peak_rss_first_mb'])} | {_mb((a.get('disk_bytes') or 0) / 2**20)} | "
                 f"{check_str(a.get('image_check'))} | {ratio} |")
    if failed:
        L += ["", "Did not run (one-line error):", ""] + [f"- **{n}**: `{e}`" for n, e in failed]
    refs = r.get("references") or {}
    if refs or any(a.get("image_check") for a in rows.values()):
        L += ["", "Image check: each competitor's first image (round 1) against the reference of its decoder, from "
              "PyTorch fp32 (diffusers) on the same noise (torch's CPU generator, seed "
              f"{st.get('seed', 0)}): (a) VAE, (b) TAESD. stable-diffusion.cpp draws its own noise (a port of torch's CPU "
              "randn) and samples LCM in k-diffusion form, so (b) also measures how far its sampling is from diffusers'; "
              "(c) is its own f32 mode on the same file. UNet step of sd.cpp: the sampling time / steps (its log, 10 ms units).", ""]
        for name, ref in refs.items():
            L.append(f"- {name}: " + (f"`{ref['error']}`" if "error" in ref else f"ran in {_s(ref.get('first_image_s'), 2)} s (untimed)"))
    for e_label, e in r.get("entries", {}).items():
        if e.get("same_weights") is False:
            L += ["", f"Warning: lcm-export entry `{e_label}` was not built from these fused weights."]

    if r.get("adapters"):
        L += ["", "## Style adapters: switch cost and per-image time", "",
              "Switch cost = the switch's own calls (diffusers: load/fuse/unfuse/set_adapters) + the first image after "
              "the switch − the next image with the same setting. Pass 1 meets each choice of adapters for the first time "
              "in the process; pass 2 has seen it. λ 0.8 unless said; A, B rank 8 over the UNet's attention Linear layers, "
              "C rank 64 over those and every 1x1 conv.", ""]
        ad = r["adapters"]
        names = [n for n in ad if "error" not in ad[n]]
        notes: set[str] = set()
        for n in ad:
            if "error" in ad[n]:
                L.append(f"- **{n}** did not run: `{ad[n]['error']}`")
        if names:
            for p in range(max(len(ad[n]["passes"]) for n in names)):
                L += ["", f"Pass {p + 1}, switch cost s (first image after − warm image; + calls):", "",
                      "| switch | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
                labels = [row["label"] for row in ad[names[0]]["passes"][p]]
                for i, label in enumerate(labels[1:], start=1):
                    cells = []
                    for n in names:
                        rows_n = ad[n]["passes"]
                        if p >= len(rows_n):
                            cells.append("—")
                            continue
                        c = rows_n[p][i]
                        extra = f" (calls {c['ops_s']:.3f})" if c["ops"] else ""
                        if c.get("first_call_errors"):
                            extra += " †"
                            notes.add(f"{n}, {label}: the first call after the switch failed and was tried again "
                                      f"(timed: the retry): `{c['first_call_errors'][0]}`")
                        cells.append(f"{c['switch_s']:+.3f}{extra}")
                    L.append(f"| {label} | " + " | ".join(cells) + " |")
            L += [""] + [f"† {x}" for x in sorted(notes)]
            L += ["", "Warm image s / UNet step s per setting (last pass):", "",
                  "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            last = {n: ad[n]["passes"][-1] for n in names}
            seen = []
            for i, row in enumerate(last[names[0]]):
                key = json_key(row["setting"])
                if key in seen:
                    continue
                seen.append(key)
                cells = [f"{last[n][i]['warm_s']:.3f} / {_s(last[n][i]['warm_unet_step_s'])}" for n in names]
                L.append(f"| {key} | " + " | ".join(cells) + " |")
            base = {n: adapter_baseline(n, ad[n], r["plain"]) for n in names}
            if any(base.values()):
                L += ["", "UNet step against the same runtime's plain path (the `plain` table's UNet step: "
                      + ", ".join(f"{n} → {b or '—'}" for n, b in base.items()) + "):", "",
                      "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
                for key in seen:
                    cells = []
                    for n in names:
                        row = next(x for x in last[n] if json_key(x["setting"]) == key)
                        ref = r["plain"][base[n]]["unet_step_s"] if base[n] else None
                        cells.append(f"{100 * (row['warm_unet_step_s'] / ref - 1):+.1f} %" if ref and row["warm_unet_step_s"] else "—")
                    L.append(f"| {key} | " + " | ".join(cells) + " |")
            L += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            L.append("| precision | " + " | ".join(precision_str(ad[n].get("precision")) for n in names) + " |")
            L.append("| load s (adapters registered) | " + " | ".join(_s(ad[n]["load_s"], 2) for n in names) + " |")
            L.append("| registration calls s | " + " | ".join(
                _s(sum(ad[n]["register_s"].values()), 2) if ad[n]["register_s"] else "—" for n in names) + " |")
            L.append("| peak RSS to first image | " + " | ".join(_mb(ad[n]["peak_rss_first_mb"]) for n in names) + " |")
            L.append("| image change by A (mean abs, 0-255) | " + " | ".join(
                f"{ad[n]['passes'][0][1]['image_vs_none']['mean_abs']:.2f}" for n in names) + " |")
            L.append("| back to none: max abs vs the first none image | " + " | ".join(
                str(ad[n]['passes'][-1][-1]['image_vs_none']['max_abs']) for n in names) + " |")
            add = r["prepare"].get("adapter_add") or {}
            if add:
                L += ["", "lcm-export `adapter add` (once per adapter, before the run): " + ", ".join(
                    f"{k} {v['seconds']:.1f} s" if "seconds" in v else f"{k} (already added)" for k, v in add.items()) + "."]
        for n in ad:
            for w in ad[n].get("lora_warnings", []):
                L.append(f"- {n}: `{w}`")

    L += ["", "## Versions", ""]
    for exe, v in r.get("versions", {}).items():
        L.append(f"- `{exe}`: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "executable"))
    L += ["", "## Preparation", ""]
    for k, v in r.get("prepare", {}).items():
        if k == "adapter_add":
            continue
        L.append(f"- {k}: " + ("cached" if v.get("cached") else f"{v['seconds']:.1f} s" if "seconds" in v else v.get("given", ""))
                 + (f" — error: `{v['error']}`" if v.get("error") else ""))
    L += ["", f"Whole run: {r['wall_s'] / 60:.1f} min.", ""]
    return "\n".join(L)


def json_key(setting: dict) -> str:
    return "none" if not setting else " + ".join(f"{k.upper()} {v:g}" for k, v in setting.items())
