"""Competitors side by side, in one run, on the same weights (issues 20 and 21).

One fused diffusers folder (``lcm-export fuse``; with ``--base demo:NAME`` this script makes it with the
demo's LCM-LoRA) is the source of every path:
- lcm-export's entries (``--entry LABEL=DIR``, built with ``lcm-export build-engine --base FUSED``), through the
  lean runtime;
- OpenVINO GenAI ``Text2ImagePipeline`` on optimum-intel IRs of the folder: fp32 weights run fp32 and bf16
  (INFERENCE_PRECISION_HINT; bf16 also with static shapes: ``reshape`` to the size, then ``compile``), and an
  int8-weight IR (``--weight-format int8``, GenAI's fastest documented mode) at the plugin's default precision;
- optimum-intel ``OVStableDiffusionPipeline`` (+ the folder's LCMScheduler) and ``OVLatentConsistencyModelPipeline``
  (made for LCM-distilled UNets with a guidance embedding: on an LCM-LoRA model it fails, and the report says so);
- diffusers, every module in bf16;
- the competitors' fastest modes (issue 29), each with the TAESD tiny decoder (``--taesd``; demo bases: demo:taesd):
  GenAI on the int8-weight IR (``genai-int8-taesd``) and on optimum-intel's hybrid int8 IR (``genai-hybrid-taesd``),
  optimum-intel ``OVStableDiffusionPipeline`` on the hybrid int8 IR (``optimum-hybrid-taesd``: FastSD CPU's path;
  ``competitors_prep.py``), stable-diffusion.cpp through stable-diffusion-cpp-python on the fused weights in its
  single-file layout as q8_0 and f16 gguf files (``sdcpp-q8_0-taesd``, ``sdcpp-f16-taesd``; ``competitors_sdcpp.py``).
Same prompt, 4 LCM steps, guidance 1, the same thread count for each. Every measurement is a fresh process
(``competitors_worker.py``, in its own venv where needed): cold start (process start to its first image),
peak RSS to the first image, then ``--warmup`` images (the first included) and ``--repeats`` timed ones;
``--rounds`` rounds with the competitors interleaved (each round starts one further along the list); medians.
A competitor that fails keeps its one-line error in the report and is not tried again. Disk: the files each loads.

Image check (unless ``--no-image-check``): a PyTorch fp32 reference (diffusers, fp32) runs once on torch's CPU noise
for the seed and decodes its final latents with the VAE and with the TAESD; each competitor's first image of round 1
is compared (PSNR, SSIM) with the reference of its decoder. Same noise: lcm-export (``latents``/``step_noise``),
GenAI (a ``Generator`` replaying the arrays), optimum-intel and diffusers (the seeded torch generator);
stable-diffusion.cpp draws its own (``rng_type="cpu"``, its port of torch's CPU randn, and its k-diffusion form
of the LCM sampler), so its images are compared with PyTorch fp32 and, as the issue allows, with its own f32 mode
(``sdcpp-f32-taesd``, run once, untimed).

With ``--adapters`` (issue 20), the style-adapter switches, each competitor in a fresh process: lcm-export's
adapter entry (``--adapter-entry``, adapters added from the same files), GenAI with ``AdapterConfig`` (every
adapter registered at construction, chosen per call), diffusers with ``load_lora_weights`` + ``fuse_lora``
and with ``set_adapters`` unfused. Switch cost = (the switch's own calls +) the first image after the switch
minus the next image with the same setting. LoRA files: ``competitors_loras.py`` (two rank-8, one rank-64).

Setup: ``bash benchmarks/competitors_setup.sh`` (optimum-intel's venv; openvino-genai; stable-diffusion-cpp-python's venv).
Usage:  python benchmarks/competitors.py --base demo:sd15-full --work WORK --resolution 256x256 \\
            --entry default=ENTRY [--adapter-entry ENTRY] [--adapters] --out OUT
Writes OUT/report.json and OUT/report.md; WORK keeps the fused folder, LoRAs and IRs between runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from competitors_report import aggregate_adapters, aggregate_plain, write_markdown  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
COMPETITORS = {  # name: (kind, IR or folder, precision hint, python)
    "genai-fp32": ("genai", "ir-fp32", "f32", "genai"),
    "genai-bf16": ("genai", "ir-fp32", "bf16", "genai"),
    "genai-bf16-static": ("genai", "ir-fp32", "bf16", "genai"),
    "genai-int8": ("genai", "ir-int8", None, "genai"),
    "optimum-sd-bf16": ("optimum-sd", "ir-fp32", "bf16", "optimum"),
    "optimum-lcm-bf16": ("optimum-lcm", "ir-fp32", "bf16", "optimum"),
    "diffusers-bf16": ("diffusers", "fused", None, "main"),
    # the fastest modes (issue 29): int8 + TAESD; precision None = the plugin's default for the CPU
    "genai-int8-taesd": ("genai", "ir-int8-taesd", None, "genai"),
    "genai-hybrid-taesd": ("genai", "ir-hybrid-taesd", None, "genai"),
    "optimum-hybrid-taesd": ("optimum-sd", "ir-hybrid-taesd", None, "optimum"),
    "sdcpp-q8_0-taesd": ("sdcpp", "sdcpp-q8_0", None, "sdcpp"),
    "sdcpp-f16-taesd": ("sdcpp", "sdcpp-f16", None, "sdcpp"),
}
TAESD_SOURCES = {"ir-int8-taesd": "ir-int8", "ir-hybrid-taesd": "ir-hybrid"}  # IR with the TAESD decoder: from which IR
SDCPP_FILES = {"sdcpp-q8_0": "model-q8_0.gguf", "sdcpp-f16": "model-f16.gguf", "sdcpp-f32": "model-f32.safetensors"}
ADAPTER_COMPETITORS = ("lcm", "genai-bf16", "diffusers-fuse", "diffusers-set_adapters")
ADAPTER_NAMES = {"a": "style_a", "b": "style_b", "c": "style_c_r64"}
SEQUENCE = [  # (label of the switch that leads to the setting, setting)
    ("none (start)", {}),
    ("none → A", {"a": 0.8}),
    ("A → B", {"b": 0.8}),
    ("λ change (B 0.8 → 0.5)", {"b": 0.5}),
    ("B → none", {}),
    ("none → A+B", {"a": 0.8, "b": 0.8}),
    ("A+B → C (rank 64)", {"c": 0.8}),
    ("C → none", {}),
]


def log(msg: str) -> None:
    print(f"[competitors {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed")[:400]


def run_cmd(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[float, str | None]:
    """(seconds, None) or (seconds, one-line error) for a preparation command."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:400]
    dt = time.perf_counter() - t0
    return dt, None if r.returncode == 0 else one_line(r.stderr or r.stdout)


def main_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ----------------------------------------------------------------------------------------------
# Preparation: fused folder, LoRA files, IRs, adapters in the adapter entry (each kept in WORK once made)

def _cli(py: str, *args: str) -> list[str]:
    return [py, "-c", "import sys; from lcm_export.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def prepare(a, py: dict, env: dict) -> dict:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict] = {}

    def step(name: str, done: Path, cmd: list[str], penv=None, timeout=None) -> None:
        if done.exists():
            steps[name] = {"cached": True, "path": str(done.parent if done.name.endswith(".done") else done)}
            return
        log(f"prepare: {name} ...")
        dt, err = run_cmd(cmd, env=penv or env, timeout=timeout)
        steps[name] = {"seconds": dt, **({"error": err} if err else {})}
        if err:
            log(f"prepare: {name} failed: {err}")
        else:
            log(f"prepare: {name} done in {dt:.1f} s")

    if a.model:
        fused = Path(a.model).resolve()
        steps["fused"] = {"given": str(fused)}
    else:
        fused = work / "fused"
        if not a.base.startswith("demo:"):
            raise SystemExit("--base other than demo:NAME: fuse it yourself (lcm-export fuse) and pass --model")
        name = a.base.split(":", 1)[1]
        script = ("import sys; from lcm_export.sources.demo import build_demo_pipeline, write_demo_loras; "
                  "p = write_demo_loras(build_demo_pipeline(sys.argv[1]), name=sys.argv[1]); print(p[0][0])")
        t0 = time.perf_counter()
        if not (fused / "model_index.json").exists():
            log(f"prepare: the demo LCM-LoRA of {a.base} and the fused folder ...")
            r = subprocess.run([py["main"], "-c", script, name], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"demo LoRA for {a.base}: {one_line(r.stderr)}")
            lcm_lora = r.stdout.strip().splitlines()[-1]
            dt, err = run_cmd(_cli(py["main"], "fuse", "--base", a.base, "--lora", f"{lcm_lora}:1.0", "--out", str(fused), "--quiet"))
            if err:
                raise SystemExit(f"fuse: {err}")
            steps["fused"] = {"seconds": time.perf_counter() - t0, "lcm_lora": lcm_lora}
        else:
            steps["fused"] = {"cached": True}
        steps["fused"]["path"] = str(fused)
    step("loras", work / "loras" / "loras.json",
         [py["main"], str(HERE / "competitors_loras.py"), "--model", str(fused), "--out", str(work / "loras")])
    for ir, fmt in (("ir-fp32", "fp32"), ("ir-int8", "int8")):
        if (not any(COMPETITORS[c][1] in (ir, ir + "-taesd") for c in a.competitors)
                and not (ir == "ir-fp32" and a.adapters)):
            continue
        out = work / ir
        step(ir, out / "export.done", [py["optimum"], "-c",
             f"import sys, pathlib; from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli'] + sys.argv[1:]; "
             f"main(); pathlib.Path({str(out / 'export.done')!r}).write_text('ok')",
             "export", "openvino", "--model", str(fused), "--task", "text-to-image", "--weight-format", fmt, str(out)])
    prepare_fast(a, py, env, work, fused, step)
    if a.adapter_entry and a.adapters:
        steps["adapter_add"] = add_adapters(py["main"], env, Path(a.adapter_entry), work / "loras")
    return {"fused": str(fused), "steps": steps}


def prepare_fast(a, py: dict, env: dict, work: Path, fused: Path, step) -> None:
    """The fastest modes' inputs (issue 29): TAESD folder and IR, the IRs with it as their decoder, optimum-intel's
    hybrid int8 IR, stable-diffusion.cpp's single file and its gguf files."""
    srcs = {COMPETITORS[c][1] for c in a.competitors}
    taesd_needed = a.image_check or any(s in TAESD_SOURCES or s.startswith("sdcpp") for s in srcs)
    prep = [py["main"], str(HERE / "competitors_prep.py")]
    if taesd_needed:
        if not a.taesd:
            raise SystemExit("the TAESD modes and the image check need --taesd (a local AutoencoderTiny folder, e.g. madebyollin/taesd's)")
        step("taesd", work / "taesd" / "config.json", prep + ["taesd", str(work / "taesd"), "--source", a.taesd])
    if any(s in TAESD_SOURCES for s in srcs):
        step("taesd-ir", work / "taesd-ir" / "openvino_model.xml",
             prep + ["taesd-ir", str(work / "taesd"), str(work / "taesd-ir"), "--vae-config", str(fused / "vae" / "config.json")])
    if "ir-hybrid-taesd" in srcs:
        step("ir-hybrid", work / "ir-hybrid" / "model_index.json",
             [py["optimum"], str(HERE / "competitors_prep.py"), "hybrid", str(fused), str(work / "ir-hybrid"),
              "--num-samples", str(a.hybrid_samples)])
    for out, src in TAESD_SOURCES.items():
        if out in srcs:
            step(out, work / out / "model_index.json", prep + ["swap-decoder", str(work / src), str(work / "taesd-ir"), str(work / out)])
    if any(s.startswith("sdcpp") for s in srcs):
        sdir = work / "sdcpp"
        step("sdcpp-f32", sdir / SDCPP_FILES["sdcpp-f32"],
             [py["main"], str(HERE / "competitors_sdcpp.py"), "convert", str(fused), str(sdir / SDCPP_FILES["sdcpp-f32"])])
        for s, frm in (("sdcpp-f16", "sdcpp-f32"), ("sdcpp-q8_0", "sdcpp-f16")):  # q8_0 from f16: competitors_sdcpp.py
            if s in srcs or (s == "sdcpp-f16" and "sdcpp-q8_0" in srcs):
                step(s, sdir / SDCPP_FILES[s], [py["sdcpp"], str(HERE / "competitors_sdcpp.py"), "gguf",
                                                 str(sdir / SDCPP_FILES[frm]), str(sdir / SDCPP_FILES[s]),
                                                 "--type", s.split("-", 1)[1]])


def add_adapters(py: str, env: dict, entry: Path, loras: Path) -> dict:
    """``lcm-export adapter add`` of the three files as a, b, c where the entry lacks them (timed)."""
    r = subprocess.run(_cli(py, "adapter", "list", "--engine-dir", str(entry), "--json"), capture_output=True, text=True, env=env)
    have = {}
    if r.returncode == 0:
        try:
            data = json.loads(r.stdout)
            have = data.get("adapters", data) if isinstance(data, dict) else {}
        except ValueError:
            have = {}
    out = {}
    for name, stem in ADAPTER_NAMES.items():
        if name in have:
            out[name] = {"cached": True}
            continue
        log(f"prepare: lcm-export adapter add {name} ...")
        dt, err = run_cmd(_cli(py, "adapter", "add", "--engine-dir", str(entry), str(loras / f"{stem}.safetensors"), "--name", name))
        out[name] = {"seconds": dt, **({"error": err} if err else {})}
    return out


@functools.lru_cache(maxsize=None)
def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def same_weights(entry: Path, fused: Path) -> bool | None:
    """Whether an entry was built from exactly the fused folder's weight files (sha256 in its manifest)."""
    try:
        files = json.loads((entry / "manifest.json").read_text())["fusion"]["base"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bool(files) and all((fused / rel).is_file() and _sha256(fused / rel) == digest for rel, digest in files.items())


# ----------------------------------------------------------------------------------------------

def run_worker(python: str, spec: dict, env: dict, timeout: float) -> dict:
    """One fresh process; its result with ``cold_start_s`` (process start -> first image) added."""
    t_spawn = time.time()
    try:
        r = subprocess.run([python, str(HERE / "competitors_worker.py"), json.dumps(spec)], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": one_line(r.stderr) if r.stderr.strip() else f"exit code {r.returncode}, no result"}
    res = json.loads(lines[-1][len("RESULT "):])
    if "first_done_at" in res:
        res["cold_start_s"] = res["first_done_at"] - t_spawn
    warnings = sorted({ln.strip() for ln in r.stderr.splitlines() if "WARNING" in ln and "LoRA" in ln})
    if warnings:
        res["lora_warnings"] = warnings[:5]
    return res


def entry_shapes(label: str, default: str) -> str:
    """An entry's ``shapes`` (LCMPipeline): a label's ``@static`` / ``@dynamic`` / ``@auto`` suffix, else ``default``."""
    tail = label.rpartition("@")[2] if "@" in label else default
    if tail not in ("auto", "static", "dynamic"):
        raise SystemExit(f"--entry {label}=…: the suffix after @ must be auto, static or dynamic")
    return tail


def plan(a, prep: dict) -> list[dict]:
    """The plain competitors: [{"name", "python", "spec", "disk_bytes", "reference"}]. ``reference``: the
    image-check reference(s) of the competitor's decoder."""
    work = Path(a.work)
    base = {"threads": a.threads, "prompt": a.prompt, "steps": a.steps, "guidance": a.guidance, "seed": a.seed,
            "height": a.hw[0], "width": a.hw[1], "warmup": a.warmup, "repeats": a.repeats}
    noise = str(Path(a.out) / "images" / "noise.npz") if a.image_check else None
    out = []
    for label, d in a.entry:
        tiny = bool(_read_json(Path(d) / "manifest.json").get("vae_decoder"))
        out.append({"name": f"lcm-export {label}", "python": "main", "disk_bytes": disk_bytes(Path(d)),
                    "reference": ["taesd" if tiny else "vae"], "spec": {**base, "kind": "lcm", "path": d, "noise": noise, "shapes": entry_shapes(label, a.lcm_shapes)}})
    for name in a.competitors:
        kind, src, prec, pyname = COMPETITORS[name]
        spec = {**base, "kind": kind, "precision": prec, "static": name.endswith("-static")}
        if kind == "sdcpp":
            spec.update(path=str(work / "sdcpp" / SDCPP_FILES[src]), taesd=str(work / "taesd" / "diffusion_pytorch_model.safetensors"))
            files = [Path(spec["path"]), Path(spec["taesd"])]
            ref = ["taesd", "sdcpp-f32-taesd"]
        else:
            spec["path"] = prep["fused"] if src == "fused" else str(work / src)
            files = [Path(spec["path"])]
            ref = ["taesd" if src.endswith("-taesd") else "vae"]
            if kind == "genai":
                spec["noise"] = noise
        out.append({"name": name, "python": pyname, "spec": spec, "prep_error": _prep_error(prep, src),
                    "disk_bytes": sum(disk_bytes(f) for f in files), "reference": ref})
    return out


def reference_jobs(a, prep: dict) -> list[dict]:
    """Run once, untimed, before the rounds: PyTorch fp32 (noise + VAE and TAESD images), and stable-diffusion.cpp's
    own f32 mode where an sd.cpp competitor runs."""
    work, images = Path(a.work), Path(a.out) / "images"
    base = {"threads": a.threads, "prompt": a.prompt, "steps": a.steps, "guidance": a.guidance, "seed": a.seed,
            "height": a.hw[0], "width": a.hw[1], "warmup": 1, "repeats": 0}
    jobs = [{"name": "reference torch-fp32", "python": "main", "prep_error": _prep_error(prep, "taesd"),
             "spec": {**base, "kind": "reference", "path": prep["fused"], "taesd": str(work / "taesd"),
                      "noise": str(images / "noise.npz"), "image_dir": str(images)}}]
    if any(COMPETITORS[c][0] == "sdcpp" for c in a.competitors):
        jobs.append({"name": "reference sdcpp-f32-taesd", "python": "sdcpp", "prep_error": _prep_error(prep, "sdcpp-f32"),
                     "spec": {**base, "kind": "sdcpp", "path": str(work / "sdcpp" / SDCPP_FILES["sdcpp-f32"]), "wtype": "f32",
                              "taesd": str(work / "taesd" / "diffusion_pytorch_model.safetensors"),
                              "image_out": str(images / "reference-sdcpp-f32-taesd.npy")}})
    return jobs


def disk_bytes(p: Path) -> int:
    """Bytes of the files a competitor loads from ``p`` (a file, or a folder without its VAE encoder: no
    text-to-image path reads it)."""
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if d != "vae_encoder" and not d.endswith(".tmp")]
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def image_checks(jobs: list[dict], images: Path) -> dict[str, list[dict]]:
    """{competitor: [{"vs", "psnr_db", "ssim"}]} for each reference of its decoder that exists."""
    import numpy as np

    from lcm_export.builder.verify import psnr, ssim

    labels = {"vae": "PyTorch fp32, same noise, VAE", "taesd": "PyTorch fp32, same noise (sd.cpp: its own), TAESD",
              "sdcpp-f32-taesd": "stable-diffusion.cpp f32 (wtype f32), TAESD"}
    out = {}
    for j in jobs:
        got = j["spec"].get("image_out")
        if not got or not Path(got).is_file():
            continue
        img = np.load(got).astype(np.float64) / 255.0
        rows = []
        for ref in j.get("reference", []):
            rp = images / f"reference-{ref}.npy"
            if not rp.is_file():
                continue
            r = np.load(rp).astype(np.float64) / 255.0
            if r.shape != img.shape:
                rows.append({"vs": labels[ref], "error": f"shapes differ: {img.shape} vs {r.shape}"})
                continue
            rows.append({"vs": labels[ref], "psnr_db": psnr(img, r), "ssim": ssim(img, r) if min(img.shape[:2]) >= 11 else None})
        out[j["name"]] = rows
    return out


def _prep_error(prep: dict, step: str) -> str | None:
    err = prep["steps"].get(step, {}).get("error")
    return f"preparing {step} failed: {err}" if err else None


def adapter_plan(a, prep: dict) -> list[dict]:
    work = Path(a.work)
    files = {n: str(work / "loras" / f"{stem}.safetensors") for n, stem in ADAPTER_NAMES.items()}
    base = {"threads": a.threads, "prompt": a.prompt, "steps": a.steps, "guidance": a.guidance, "seed": a.seed,
            "height": a.hw[0], "width": a.hw[1], "warmup": a.warmup, "scenario": "adapters",
            "passes": a.adapter_passes, "sequence": SEQUENCE, "adapters": files}
    out = []
    for name in a.adapter_competitors:
        if name.split("@")[0] == "lcm":  # lcm@dynamic / lcm@static: the runtime's shapes for this run
            if not a.adapter_entry:
                continue
            errs = [v["error"] for v in prep["steps"].get("adapter_add", {}).values() if v.get("error")]
            label = "lcm-export adapters" + (f" @{name.split('@')[1]}" if "@" in name else "")
            out.append({"name": label, "python": "main", "spec": {**base, "kind": "lcm", "path": a.adapter_entry,
                                                                  "shapes": entry_shapes(name, a.lcm_shapes)},
                        "prep_error": f"lcm-export adapter add failed: {errs[0]}" if errs else None})
        elif name.startswith("genai-"):
            kind, src, prec, pyname = COMPETITORS[name]
            out.append({"name": f"{name} adapters", "python": pyname, "prep_error": _prep_error(prep, src),
                        "spec": {**base, "kind": kind, "path": str(work / src), "precision": prec}})
        elif name.startswith("diffusers-"):
            out.append({"name": name, "python": "main", "spec": {**base, "kind": "diffusers", "path": prep["fused"],
                                                                    "adapter_mode": name.split("-", 1)[1]}})
        else:
            raise SystemExit(f"unknown adapter competitor {name!r}; choose from {', '.join(ADAPTER_COMPETITORS)}")
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_rounds(jobs: list[dict], rounds: int, py: dict, env: dict, timeout: float, what: str,
               images: Path | None = None) -> dict[str, list[dict]]:
    """Each job once per round, interleaved; round r starts r jobs further along. A job that errors is
    not run again (its error is its row). With ``images``, round 1 saves each job's first image there."""
    results: dict[str, list[dict]] = {j["name"]: [] for j in jobs}
    failed: set[str] = set()
    for r in range(rounds):
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)] if jobs else []
        for j in order:
            if j["name"] in failed:
                continue
            log(f"{what} round {r + 1}/{rounds}: {j['name']} ...")
            spec = j["spec"]
            if r == 0 and images is not None and j["spec"].get("kind") != "reference":
                spec = j["spec"] = {**spec, "image_out": str(images / f"{_safe(j['name'])}.npy")}
            elif r > 0:
                spec = {k: v for k, v in spec.items() if k != "image_out"}
            res = {"error": j["prep_error"]} if j.get("prep_error") else run_worker(py[j["python"]], spec, env, timeout)
            res["round"] = r + 1
            results[j["name"]].append(res)
            if "error" in res:
                failed.add(j["name"])
                log(f"  {j['name']}: ERROR {res['error']}")
            else:
                ts = [x["seconds"] for x in res.get("images", [])]
                log(f"  {j['name']}: cold {res.get('cold_start_s', 0):.2f} s, first image {res.get('first_image_s', 0):.2f} s"
                    + (f", warm {min(ts):.3f}-{max(ts):.3f} s" if ts else "") + f", peak RSS to first image "
                    f"{res.get('peak_rss_first_mb', 0):.0f} MB")
    return results


def machine() -> dict:
    from lcm_export._cpu import cpu_flags, cpu_name, recorded_flags, usable_cores

    import platform

    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu_name(), "flags_speed": recorded_flags(), "flags": sorted(cpu_flags()), "cores": usable_cores(),
            "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="demo:NAME: fuse it with its demo LCM-LoRA into WORK/fused")
    src.add_argument("--model", help="a fused diffusers folder (lcm-export fuse --out)")
    ap.add_argument("--work", required=True, help="folder for the fused model, LoRAs and IRs (kept between runs)")
    ap.add_argument("--out", default=None, help="folder for report.json and report.md (required unless --prepare-only)")
    ap.add_argument("--resolution", default="512x512", help="HxW (default 512x512)")
    ap.add_argument("--entry", action="append", default=[], metavar="LABEL=DIR", help="lcm-export entry to time (repeatable); LABEL@dynamic / LABEL@static "
                    "overrides --lcm-shapes for it (the same entry twice: an A/B)")
    ap.add_argument("--lcm-shapes", choices=("auto", "static", "dynamic"), default="auto",
                    help="how lcm-export's runtime compiles its engines (LCMPipeline shapes=; default auto: what `generate` does)")
    ap.add_argument("--adapter-entry", default=None, help="lcm-export entry built with --adapters (adapters a, b, c are added)")
    ap.add_argument("--competitors", default=",".join(COMPETITORS), help=f"comma list from {', '.join(COMPETITORS)} (default all; '' for none)")
    ap.add_argument("--adapters", action="store_true", help="also the style-adapter switch runs (issue 20)")
    ap.add_argument("--adapter-competitors", default=",".join(ADAPTER_COMPETITORS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed images in each process, the first one (cold) included (min 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed images per process and round")
    ap.add_argument("--adapter-rounds", type=int, default=1)
    ap.add_argument("--adapter-passes", type=int, default=2, help="passes over the switch sequence per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--main-python", default=sys.executable, help="python with lcm-export, diffusers, openvino-genai")
    ap.add_argument("--genai-python", default=None, help="python with openvino-genai (default --main-python)")
    ap.add_argument("--optimum-python", default="/work/venvs/optimum/bin/python", help="python of optimum-intel's venv")
    ap.add_argument("--sdcpp-python", default="/work/venvs/sdcpp/bin/python", help="python of stable-diffusion-cpp-python's venv")
    ap.add_argument("--taesd", default=None, help="the TAESD decoder: a local AutoencoderTiny folder (madebyollin/taesd's) or "
                    "demo:taesd (default for demo bases)")
    ap.add_argument("--hybrid-samples", type=int, default=200,
                    help="UNet inputs optimum-intel's hybrid int8 calibrates on (its default 200; collected at 512x512)")
    ap.add_argument("--no-image-check", dest="image_check", action="store_false",
                    help="skip the PyTorch fp32 reference and the PSNR / SSIM of each competitor's first image")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make WORK's fused folder, LoRAs and IRs, then stop (build the lcm-export entries from WORK/fused next)")
    a = ap.parse_args(argv)
    a.hw = tuple(int(v) for v in a.resolution.lower().split("x"))
    a.work = str(Path(a.work).resolve())
    a.model = str(Path(a.model).resolve()) if a.model else None
    a.adapter_entry = str(Path(a.adapter_entry).resolve()) if a.adapter_entry else None
    a.entry = [tuple(e.split("=", 1)) if "=" in e else (Path(e).name, e) for e in a.entry]
    a.entry = [(label, str(Path(d).resolve())) for label, d in a.entry]
    a.competitors = [c for c in a.competitors.split(",") if c]
    a.adapter_competitors = [c for c in a.adapter_competitors.split(",") if c]
    bad = [c for c in a.competitors if c not in COMPETITORS]
    if bad:
        ap.error(f"unknown competitor(s) {', '.join(bad)}; choose from {', '.join(COMPETITORS)}")
    a.warmup = max(1, a.warmup)
    if a.taesd is None and a.base and a.base.startswith("demo:"):
        a.taesd = "demo:taesd"
    elif a.taesd and not a.taesd.startswith("demo:"):
        a.taesd = str(Path(a.taesd).resolve())
    if not a.out and not a.prepare_only:
        ap.error("--out is required (unless --prepare-only)")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    py = {"main": a.main_python, "genai": a.genai_python or a.main_python, "optimum": a.optimum_python, "sdcpp": a.sdcpp_python}
    env = main_env(a.threads)
    t0 = time.perf_counter()
    prep = prepare(a, py, env)
    fused = Path(prep["fused"])
    if a.prepare_only:
        print(json.dumps(prep, indent=2))
        return
    entries = {label: {"path": str(Path(d).resolve()), "same_weights": same_weights(Path(d), fused)} for label, d in a.entry}
    if a.adapter_entry:
        entries["adapters"] = {"path": str(Path(a.adapter_entry).resolve()), "same_weights": same_weights(Path(a.adapter_entry), fused)}
    for label, e in entries.items():
        if e["same_weights"] is False:
            log(f"warning: entry {label} ({e['path']}) was not built from {fused}'s weights")

    jobs = plan(a, prep)
    images = Path(a.out) / "images"
    refs, checks = {}, {}
    if a.image_check:
        images.mkdir(parents=True, exist_ok=True)
        refs = run_rounds(reference_jobs(a, prep), 1, py, env, a.timeout, "reference")
        if "error" in refs["reference torch-fp32"][0]:  # no noise file: the others draw their own
            for j in jobs:
                j["spec"].pop("noise", None)
    plain = run_rounds(jobs, a.rounds, py, env, a.timeout, "plain", images if a.image_check else None)
    if a.image_check:
        checks = image_checks(jobs, images)
    adapters = {}
    if a.adapters:
        adapters = run_rounds(adapter_plan(a, prep), a.adapter_rounds, py, env, a.timeout, "adapters")

    rep = {
        "schema": "lcm-export-competitors/1",
        "settings": {"prompt": a.prompt, "steps": a.steps, "guidance": a.guidance, "resolution": f"{a.hw[0]}x{a.hw[1]}",
                     "threads": a.threads, "rounds": a.rounds, "warmup": a.warmup, "repeats": a.repeats, "seed": a.seed,
                     "adapter_rounds": a.adapter_rounds, "adapter_passes": a.adapter_passes,
                     "adapter_sequence": SEQUENCE if a.adapters else None},
        "model": {"fused": str(fused), "base": a.base, "fusion": _read_json(fused / "fusion.json").get("loras")},
        "loras": _read_json(Path(a.work) / "loras" / "loras.json"),
        "machine": machine(),
        "pythons": py,
        "prepare": prep["steps"],
        "entries": entries,
        "plain": {name: {"rounds": rows, **aggregate_plain(rows), "disk_bytes": j["disk_bytes"],
                         "image_check": checks.get(name)} for (name, rows), j in zip(plain.items(), jobs)},
        "references": {name: rows[0] for name, rows in refs.items()},
        "adapters": {name: {"rounds": rows, **aggregate_adapters(rows)} for name, rows in adapters.items()},
        "wall_s": time.perf_counter() - t0,
    }
    rep["versions"] = {}
    for group in (rep["plain"], rep["adapters"]):
        for name, row in group.items():
            v = next((r["versions"] for r in row["rounds"] if r.get("versions")), None)
            if v:
                rep["versions"].setdefault(v.get("executable", "?"), v)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(write_markdown(rep))
    log(f"wrote {out / 'report.json'} and {out / 'report.md'} ({rep['wall_s'] / 60:.1f} min)")


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    main()
