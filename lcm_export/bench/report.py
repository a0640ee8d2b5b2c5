"""report.json -> report.md tables and PNG charts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

STAGE_LABELS = {"text_encoder": "text encoder", "unet_step": "UNet step", "vae_decoder": "VAE decode", "end_to_end": "end to end (4 steps)"}


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def write_markdown(r: dict) -> str:
    m, mach = r["model"], r["machine"]
    lines = [f"# lcm-export benchmark — {m['family']} at {r['resolution']}", ""]
    if r.get("failures"):
        lines += [f"> **FAILED:** {len(r['failures'])} row(s) errored, so this run is incomplete: "
                  + "; ".join(f"`{f['row']}`: `{f['error']}`" for f in r["failures"]), ""]
    if m.get("note"):
        lines += [f"> {m['note']}", ""]
    lines += [
        f"- model: `{m['base']}` + " + (", ".join(f"{l['file']} (λ={l['weight']:g})" for l in m["loras"]) or "no LoRAs"),
        f"- guidance {r['guidance']:g}, {r['steps']} LCM steps, batch {r['batch']}",
        f"- machine: {mach['cpu']} ({' '.join(mach.get('flags') or ['flags not recorded'])}), {mach['cores']} cores, "
        f"{mach['threads']} threads, GPU: {mach['gpu'] or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- timing: {r['settings']['warmup']} warm-up + {r['settings']['runs']} timed runs per path; "
        f"{r['settings']['statistic']}; solver comparison: {r['settings']['solver_runs']} timed run(s) each, model already warm",
        f"- created {r['created']}" + (f" by `{r['command']}`" if r.get("command") else ""),
        "", "## Latency per stage (median / p90, ms)", "",
    ]
    paths = r["paths"]
    names = list(paths)
    lines.append("| stage | " + " | ".join(paths[n]["label"] for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for s, label in STAGE_LABELS.items():
        cells = []
        for n in names:
            p = paths[n]
            cells.append(f"{_ms(p['stages'][s]['median_s'])} / {_ms(p['stages'][s]['p90_s'])}" if "stages" in p
                         else ("skipped" if "skipped" in p else "failed"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n in names:
        if "error" in paths[n]:
            lines += ["", f"**{paths[n]['label']} failed:** `{paths[n]['error']}`"]
        if "skipped" in paths[n]:
            lines += ["", f"**{paths[n]['label']} skipped:** {paths[n]['skipped']}"]
    ov = paths["engine"]["stages"].get("runtime_overhead")
    if ov:
        lines += ["", f"Lean-runtime overhead outside the engines (tokenize, scheduler, copies, image conversion): "
                      f"median {_ms(ov['median_s'])} ms per image. Engine-path peak RSS: {paths['engine']['peak_rss_mb']:.0f} MB."]
    st = r.get("runtime_overhead_stub")
    if st:
        lines += ["", f"The same overhead at {st['resolution']} with stub engines (fixed arrays, so only host work is left; "
                      f"goal ≤ 2 ms): median {st['median_s'] * 1e3:.2f} ms per image (tokenize {st['tokenize_median_s'] * 1e3:.2f}, "
                      f"scheduler {st['scheduler_median_s'] * 1e3:.2f}, VAE input {st['vae_input_median_s'] * 1e3:.2f}, "
                      f"postprocess {st['postprocess_median_s'] * 1e3:.2f} ms)."]
    if r["ratios"]:
        lines += ["", "## Speed-up of the engine (baseline median / engine median)", "",
                  "| baseline | " + " | ".join(STAGE_LABELS.values()) + " |", "|---|" + "---|" * len(STAGE_LABELS)]
        for n, rat in r["ratios"].items():
            lines.append(f"| {paths[n]['label']} | " + " | ".join(f"{rat[s]:.2f}x" for s in STAGE_LABELS) + " |")
    f = r["flops"]
    peaks = f.get("peaks") or {"fp32": f["peak"]}
    lines += ["", "## Compute", "",
              f"One UNet step at batch {f['unet_batch']}: {f['unet_step_flops'] / 1e9:,.1f} GFLOP (torch FlopCounterMode, attention on SDPA's math backend so it is counted; 2 FLOP per multiply-add).",
              "Matrix-product peaks measured on this machine in this run (each path is compared with the peak of its own precision):", ""]
    for prec, pk in peaks.items():
        extra = ""
        if "numpy_matmul_flops_per_s" in pk:
            size = pk.get("numpy_matrix_size", pk["matrix_size"])
            extra = f", numpy {pk['numpy_matmul_flops_per_s'] / 1e9:,.1f}" + (f" at {size}²" if size != pk["matrix_size"] else "")
        took = f", measured in {pk['seconds']:.1f} s" if "seconds" in pk else ""
        lines.append(f"- {prec}: {pk['best_flops_per_s'] / 1e9:,.1f} GFLOP/s (best of a {pk['matrix_size']}² product on "
                     f"{pk.get('device', 'cpu')}: torch {pk['torch_mm_flops_per_s'] / 1e9:,.1f}{extra}{took})")
    for prec, why in f.get("peaks_skipped", {}).items():
        lines.append(f"- {prec}: not measured — {why}")
    lines += ["", "| path | precision | UNet step GFLOP/s | share of its precision's peak |", "|---|---|---|---|"]
    for n in names:
        if n in f:
            prec = f[n].get("precision", "fp32")
            lines.append(f"| {paths[n]['label']} | {prec} | {f[n]['flops_per_s'] / 1e9:,.1f} | {f[n]['fraction_of_peak'] * 100:.0f}% |")
    lines += ["", "## Solver comparison (the LCM-LoRA paper's Table 2 setting), end to end", "",
              "| solver | steps | path | median s | p90 s |", "|---|---|---|---|---|"]
    for s in r["solvers"]:
        lines.append(f"| {s['solver']} | {s['steps']} | {s['path']} | {s['median_s']:.3f} | {s['p90_s']:.3f} |")
    c = r.get("cold_start") or {}
    if "skipped" in c:
        lines += ["", f"Cold start: skipped — {c['skipped']}."]
    elif c:
        lines += ["", "## Cold start (fresh process → first image)", "", "| stack | seconds | peak RSS MB |", "|---|---|---|"]
        d = c.get("diffusers", {})
        torch_label = f"diffusers (torch, {d['dtype']} {d['device']})" if "dtype" in d else "diffusers (torch)"
        for n, label in (("engine", "lean runtime"), ("diffusers", torch_label)):
            v = c.get(n, {})
            lines.append(f"| {label} | {v['seconds']:.2f} | {v['peak_rss_mb']:.0f} |" if "seconds" in v else f"| {label} | failed: {v.get('error')} | |")
        if "ratio" in c:
            lines.append(f"\nThe lean runtime reaches its first image {c['ratio']:.1f}x sooner.")
    lines += ["", "Charts: `stages.png` (per-stage latency), `solvers.png` (solver comparison).", ""]
    return "\n".join(lines)


def write_charts(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = {n: p for n, p in r["paths"].items() if "stages" in p}
    stages = list(STAGE_LABELS)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(paths), 1)
    x = np.arange(len(stages))
    for i, (n, p) in enumerate(paths.items()):
        vals = [p["stages"][s]["median_s"] * 1e3 for s in stages]
        ax.bar(x + i * width, vals, width, label=p["label"])
    ax.set_xticks(x + width * (len(paths) - 1) / 2, [STAGE_LABELS[s] for s in stages])
    ax.set_ylabel("median latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{r['model']['family']} {r['resolution']}, guidance {r['guidance']:g} — {r['machine']['cores']} cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "stages.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{s['solver']} {s['steps']}\n{'engine' if 'engine' in s['path'] else 'diffusers'}" for s in r["solvers"]]
    vals = [s["median_s"] for s in r["solvers"]]
    colors = ["tab:green" if "engine" in s["path"] else "tab:gray" for s in r["solvers"]]
    ax.barh(labels, vals, color=colors)
    ax.set_xlabel("end-to-end median latency (s)")
    ax.set_title(f"Solver comparison at {r['resolution']} (paper Table 2 setting)")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}s", va="center", fontsize=8)
    fig.tight_layout()
    _save(fig, out / "solvers.png")
    plt.close(fig)


def _save(fig, path: Path) -> None:
    """The chart as PNG, written atomically (rendered in memory, then temp file and rename)."""
    import io

    from .._util import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(path, buf.getvalue())
