"""Footprint of engine-store entries (issue 28): bytes on disk per file against the weights at their compute
precision, peak RSS of a fresh `lcm-export generate`, cold start (fresh process to first image) against a warm image.

For each entry (`--entry DIR`, repeatable; or `--build fp32,bf16,fast` builds demo:sd15-full entries of those
kinds under `--store`, at `--resolutions`, reusing what is there):
  - disk: every file of the entry with its size and purpose; the weights at their compute precision (each weight
    constant of each component's IR, at 4 bytes where the component computes in fp32, 2 in bf16, its stored size
    when it is an int8 constant) and the entry's total against them, with and without `onnx/` (the refit source);
  - per resolution, `--runs` times: a fresh `lcm-export generate` (4 steps, guidance 1) as a child process: its
    wall time (interpreter start, imports, loading the entry, one image, the PNG) is the cold start, its peak RSS
    `ru_maxrss` from `os.wait4` (that child alone);
  - per resolution: a warm image, in one more fresh process: load, one untimed image, then the median of
    `--runs` images (that process's peak RSS is reported too).
  - with `--serve`, per entry: `lcm-export serve` on it (one replica, Ray started by it), one request per
    resolution in order (the first image of a size is the one that allocates its buffers), then the replica's
    VmHWM / VmRSS from /proc (its pid from `/health`) — the replica's peak RSS — and the RSS of every process of
    the serve tree (Ray's own processes included), once per entry.
Measurements run one at a time; the machine's load average at the start and end of each is recorded (a shared
machine slows every figure, the ratio less). Files stay in the page cache between runs (no cache drop).
Writes report.json and report.md under `--out` (default benchmarks/reports/footprint-<cpu>-sd15).

Usage: python benchmarks/footprint.py --entry /path/entry [--entry ...] [--resolutions 256x256] [--runs 2]
       python benchmarks/footprint.py --build fp32,bf16,fast --store /tmp/fp --resolutions 256x256,512x512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on mars"
KINDS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"], "fast": ["--preset", "fast"]}

_WARM = """
import json, sys, time
import numpy as np
from lcm_export.runtime import LCMPipeline
h, w, runs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter(); pipe = LCMPipeline.from_engine_dir(sys.argv[1]); load = time.perf_counter() - t0
t0 = time.perf_counter(); pipe(sys.argv[5], steps=4, height=h, width=w, output_type="np"); first = time.perf_counter() - t0
warm = []
for _ in range(runs):
    t0 = time.perf_counter(); pipe(sys.argv[5], steps=4, height=h, width=w, output_type="np"); warm.append(time.perf_counter() - t0)
rss = {}
for line in open("/proc/self/status"):
    k, _, v = line.partition(":")
    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        rss[k] = int(v.split()[0]) * 1024
print(json.dumps({"load_s": load, "first_image_s": first, "warm_s": warm, "rss": rss}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _child(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, exit status, peak RSS (bytes, that child alone) and output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        load0 = _loadavg()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env())
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"wall_s": wall, "rc": p.returncode, "peak_rss": rss, "stdout": out.read(), "stderr": err.read()[-2000:],
                "loadavg": [load0, _loadavg()]}


def _cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from lcm_export.cli import main; sys.exit(main())"]


PURPOSE = [(r"^manifest\.json$", "manifest"), (r"^onnx/", "exported ONNX graph (refit source)"),
           (r"\.bin$", "IR weights"), (r"\.xml$", "IR graph"), (r"\.blob$", "compiled blob (recipe 6)"),
           (r"^adapters/", "style adapters"), (r"tokenizer", "tokenizer"), (r"scheduler", "scheduler config")]


def _purpose(rel: str) -> str:
    return next((what for pat, what in PURPOSE if re.search(pat, rel)), "other")


def weights_at_compute_precision(entry: Path, manifest: dict) -> dict:
    """{component: bytes}: each weight constant of the component's IR at the precision it computes in."""
    import openvino as ov

    from lcm_export.backends.openvino import run_precision

    out = {}
    core = ov.Core()
    for comp, rec in manifest["components"].items():
        xml = entry / rec["engines"]["*"]
        model = core.read_model(str(xml))
        per = 2 if run_precision(rec) == "bf16" else 4
        total = 0
        for op in model.get_ops():
            if op.get_type_name() != "Constant":
                continue
            et = op.get_output_element_type(0)
            n = int(np.prod(list(op.get_output_shape(0)))) if len(op.get_output_shape(0)) else 1
            if n < 16:  # shapes, axes, scalars: not weights
                continue
            total += n * per if et.is_real() else op.get_byte_size()
        out[comp] = total
        del model
    return out


def disk(entry: Path, manifest: dict) -> dict:
    files = sorted((p.relative_to(entry).as_posix(), p.stat().st_size) for p in entry.rglob("*") if p.is_file())
    weights = weights_at_compute_precision(entry, manifest) if manifest.get("backend") == "openvino" else {}
    total = sum(s for _, s in files)
    onnx = sum(s for f, s in files if f.startswith("onnx/"))
    w = sum(weights.values())
    return {"files": [{"path": f, "bytes": s, "purpose": _purpose(f)} for f, s in files], "total_bytes": total,
            "onnx_bytes": onnx, "without_onnx_bytes": total - onnx, "weights_at_compute_precision": weights,
            "weights_bytes": w, "ratio": total / w if w else None, "ratio_without_onnx": (total - onnx) / w if w else None}


def measure(entry: Path, resolutions: list[str], runs: int) -> dict:
    manifest = json.loads((entry / "manifest.json").read_text())
    row = {"entry": str(entry), "precision": manifest.get("precision"), "backend": manifest.get("backend"),
           "recipe": manifest.get("graph_inputs", {}).get("recipe"),
           "components": {c: {"precision": r.get("precision"), "inference_precision": r.get("inference_precision")}
                          for c, r in manifest["components"].items()},
           "vae_decoder": manifest.get("vae_decoder"), "disk": disk(entry, manifest), "sizes": []}
    built = {str(x) for x in manifest.get("resolutions", [])} if isinstance(manifest.get("resolutions"), list) else None
    row["built"] = sorted(built) if built else None
    for res in resolutions:
        if built is not None and built and res not in built:
            continue
        h, w = (int(v) for v in res.split("x"))
        cold = []
        with tempfile.TemporaryDirectory() as d:
            for _ in range(runs):
                r = _child([*_cli(), "generate", "--engine-dir", str(entry), "--prompt", PROMPT, "--resolution", res,
                            "--out", f"{d}/o.png"])
                if r["rc"] != 0:
                    cold.append({"error": r["stderr"].strip().splitlines()[-1:]})
                    continue
                cold.append({"seconds": r["wall_s"], "peak_rss": r["peak_rss"], "loadavg": r["loadavg"]})
        r = _child([sys.executable, "-c", _WARM, str(entry), str(h), str(w), str(runs), PROMPT])
        warm = json.loads(r["stdout"].strip().splitlines()[-1]) if r["rc"] == 0 else {"error": r["stderr"][-500:]}
        warm["peak_rss"], warm["loadavg"] = r["peak_rss"], r["loadavg"]
        ok = [c for c in cold if "seconds" in c]
        size = {"resolution": res, "cold": cold, "warm": warm}
        if ok and "warm_s" in warm:
            size["cold_median_s"] = float(np.median([c["seconds"] for c in ok]))
            size["warm_median_s"] = float(np.median(warm["warm_s"]))
            size["cold_over_warm"] = size["cold_median_s"] / size["warm_median_s"]
            size["generate_peak_rss"] = max(c["peak_rss"] for c in ok)
            size["peak_over_weights"] = size["generate_peak_rss"] / row["disk"]["weights_bytes"] if row["disk"]["weights_bytes"] else None
        row["sizes"].append(size)
        print(f"{entry.name} {res}: {json.dumps({k: v for k, v in size.items() if k not in ('cold', 'warm')})}", flush=True)
    return row


def _proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat's parent field)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def measure_serve(entry: Path, resolutions: list[str], port: int = 8765) -> dict:
    """`lcm-export serve` on ``entry`` (1 replica): one image per resolution, then the replica's peak RSS."""
    from lcm_export.serve.client import Client, wait_ready

    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen([*_cli(), "serve", "--engine-dir", str(entry), "--port", str(port)], stdout=log, stderr=log,
                             env=_env(), start_new_session=True)
        try:
            info = wait_ready(url, 600)
            ready = time.perf_counter() - t0
            pid = info["replica"]["pid"]
            c = Client(url, timeout=600)
            images = []
            for res in resolutions:
                h, w = (int(v) for v in res.split("x"))
                r = c.generate(prompt=PROMPT, height=h, width=w)
                images.append({"resolution": res, "status": r.status, "seconds": r.seconds})
            replica = _proc_status(pid)
            tree = {}
            for q in _tree(p.pid):
                try:
                    tree[q] = _proc_status(q)["VmRSS"]
                except (OSError, KeyError):
                    pass
            return {"ready_s": ready, "images": images, "replica": replica, "tree_rss": sum(tree.values()),
                    "tree_processes": len(tree), "loadavg": _loadavg()}
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            log.seek(0)
            return {"error": f"{type(exc).__name__}: {exc}", "log": log.read()[-1500:]}
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def build(kind: str, store: Path, resolutions: list[str]) -> tuple[Path, dict]:
    d = store / f"sd15full-{kind}"
    cmd = [*_cli(), "build-engine", "--base", "demo:sd15-full", "--backend", "openvino", *KINDS[kind],
           *[x for r in resolutions for x in ("--resolution", r)], "--engine-dir", str(d), "--quiet"]
    r = _child(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"build {kind} failed: {r['stderr'][-800:]}")
    return d, {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"], "loadavg": r["loadavg"]}


def machine() -> dict:
    sys.path.insert(0, str(ROOT))
    from lcm_export._cpu import cpu_name, recorded_flags, usable_cores
    from lcm_export._util import tool_versions

    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), None)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu_name(), "flags": recorded_flags(), "cores": usable_cores(), "ram_bytes": mem,
            "versions": {**tool_versions("openvino"), "lcm-export commit": commit}}


def _gb(b) -> str:
    return "–" if b is None else f"{b / 1e9:.2f}"


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# Footprint — demo:sd15-full (real SD 1.5 configs, random weights), OpenVINO", "",
             f"{m['cpu']} ({m['cores']} cores, {_gb(m['ram_bytes'])} GB RAM; flags: {', '.join(m['flags'])}). "
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.", "",
             "Cold: a fresh `lcm-export generate` (interpreter, imports, loading the entry, one 4-step image, the PNG), "
             "its wall time and peak RSS (`ru_maxrss` of that child, `os.wait4`); median of the runs, files in the page "
             "cache. Warm: one process, median of the images after one untimed image. " + rep["note"], ""]
    lines += ["| entry | resolution | weights at compute precision GB | entry on disk GB (without onnx/) | generate peak RSS GB "
              "(× weights) | cold s | warm image s | cold / warm | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rep["entries"]:
        dk = row["disk"]
        for s in row["sizes"]:
            la = [x for c in s["cold"] if "loadavg" in c for x in c["loadavg"]]
            lines.append(f"| {Path(row['entry']).name} ({row['precision']}) | {s['resolution']} | {_gb(dk['weights_bytes'])} | "
                         f"{_gb(dk['total_bytes'])} ({_gb(dk['without_onnx_bytes'])}) | "
                         + (f"{_gb(s['generate_peak_rss'])} ({s['peak_over_weights']:.2f}×) | {s['cold_median_s']:.1f} | "
                            f"{s['warm_median_s']:.1f} | {s['cold_over_warm']:.2f} |" if "cold_over_warm" in s else "failed | | | |")
                         + f" {min(la) if la else '–'}–{max(la) if la else '–'} |")
    for row in rep["entries"]:
        dk = row["disk"]
        lines += ["", f"## {Path(row['entry']).name}: files", "", "| file | purpose | bytes |", "|---|---|---|"]
        lines += [f"| {f['path']} | {f['purpose']} | {f['bytes']:,} |" for f in dk["files"] if f["bytes"] > 1 << 20]
        lines.append(f"| (files under 1 MiB) | | {sum(f['bytes'] for f in dk['files'] if f['bytes'] <= 1 << 20):,} |")
        lines.append(f"| **total** | weights at compute precision {dk['weights_bytes']:,} "
                     f"({', '.join(f'{c} {b:,}' for c, b in dk['weights_at_compute_precision'].items())}) | {dk['total_bytes']:,} |")
    served = [r for r in rep["entries"] if r.get("serve")]
    if served:
        lines += ["", "## `lcm-export serve`: one replica", "",
                  "One replica per entry; one image per resolution in the order given (each size's first image allocates "
                  "its buffers), then the replica process's VmHWM (peak) and VmRSS from /proc; 'serve tree' is the RSS of "
                  "every process under `lcm-export serve` at that moment (Ray's GCS, raylet, controller, proxy, the "
                  "replica, the CLI).", "",
                  "| entry | images | replica peak RSS GB (× weights) | replica RSS now GB | serve tree RSS GB (processes) | ready s |",
                  "|---|---|---|---|---|---|"]
        for row in served:
            sv, w = row["serve"], row["disk"]["weights_bytes"]
            if "error" in sv:
                lines.append(f"| {Path(row['entry']).name} | failed: {sv['error']} | | | | |")
                continue
            imgs = ", ".join(f"{i['resolution']} {i['seconds']:.1f} s" + ("" if i["status"] == 200 else f" (HTTP {i['status']})")
                             for i in sv["images"])
            hwm = sv["replica"]["VmHWM"]
            lines.append(f"| {Path(row['entry']).name} ({row['precision']}) | {imgs} | {_gb(hwm)}"
                         + (f" ({hwm / w:.2f}×)" if w else "") + f" | {_gb(sv['replica']['VmRSS'])} | "
                         f"{_gb(sv['tree_rss'])} ({sv['tree_processes']}) | {sv['ready_s']:.0f} |")
    if rep.get("builds"):
        lines += ["", "## Builds", "", "| kind | wall s | peak RSS GB |", "|---|---|---|"]
        lines += [f"| {k} | {b['wall_s']:.0f} | {_gb(b['peak_rss'])} |" for k, b in rep["builds"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entry", action="append", default=[], help="an entry to measure (repeatable)")
    ap.add_argument("--build", default="", help="comma-separated kinds to build from demo:sd15-full: " + ",".join(KINDS))
    ap.add_argument("--store", default=None, help="where --build writes its entries")
    ap.add_argument("--resolutions", default="256x256")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="also a `lcm-export serve` replica's peak RSS per entry")
    ap.add_argument("--no-generate", dest="generate", action="store_false",
                    help="skip the generate / warm measurements (e.g. --serve alone)")
    ap.add_argument("--note", default="", help="said in the report (e.g. who else shared the machine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    resolutions = a.resolutions.split(",")
    mach = machine()
    entries, builds = [Path(e) for e in a.entry], {}
    for kind in filter(None, a.build.split(",")):
        if not a.store:
            raise SystemExit("--build needs --store")
        d, builds[kind] = build(kind, Path(a.store), resolutions)
        entries.append(d)
    rep = {"schema": "lcm-export-footprint/1", "machine": mach, "runs": a.runs, "prompt": PROMPT, "note": a.note,
           "builds": builds, "entries": []}
    for e in entries:
        row = measure(e, resolutions if a.generate else [], a.runs)
        if a.serve:
            row["serve"] = measure_serve(e, [r for r in resolutions if r in (row.get("built") or resolutions)])
            print(f"{e.name} serve: {json.dumps(row['serve'])[:400]}", flush=True)
        rep["entries"].append(row)
    cpu = re.sub(r"[^a-z0-9]+", "-", mach["cpu"].lower()).strip("-")
    out = Path(a.out or ROOT / "benchmarks" / "reports" / f"footprint-{cpu}-sd15")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / "report.md").write_text(markdown(rep))
    print(out / "report.md")


if __name__ == "__main__":
    main()
