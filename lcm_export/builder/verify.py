"""Every check of an engine against PyTorch, in one place: ``build-engine``, a refit and ``export``
all call it, so a refit is checked exactly as a fresh build is.

fp32 (the component gate). An fp32 engine is not compared with PyTorch fp32 alone: both are fp32
answers, and on an ill-conditioned model (strong LoRAs fused into small layers) PyTorch fp32 is
itself 1e-4 to 2e-4 away from the exact answer, so two correct fp32 engines can disagree by more
than any fixed limit. Each engine output is compared with a **float64 run of the same fused
module** on the same seeded inputs, at every built size, and passes when

    rel-L2(engine, fp64) <= max(FP32_FLOOR, FP32_FACTOR x rel-L2(PyTorch fp32, fp64))

i.e. the engine is about as accurate as PyTorch fp32. A failure therefore always means the engine
is more than FP32_FACTOR times further from the exact answer than PyTorch fp32 is: the message may
call that a bug. Both figures are recorded per component and size (manifest, ``inspect``).

Reduced precision (bf16, fp16, int8): each component gets a sanity limit against PyTorch fp32 (REDUCED_LIMIT),
and the entry gets the image gate: its 4-step LCM image against diffusers' PyTorch fp32 pipeline,
same fused weights, latents and step noise, as PSNR and SSIM (IMAGE_GATES: bf16 by PSNR,
IMAGE_PSNR_GATE_DB; int8 by PSNR and SSIM). An entry with a tiny VAE decoder gets the same image check
at any precision (against diffusers with that decoder; gated only for reduced precision), plus the
figures against the base's own VAE decoder: what the tiny decoder trades.

PyTorch's answers are computed once per component and size (:class:`References`) and shared by the
exported-graph check and the engine check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .components import run_module, sample_inputs, wrappers
from ..errors import UserError

FP32_FLOOR = 1e-4
"""An fp32 engine within this rel-L2 of the fp64 answer always passes (well-conditioned models: PyTorch
fp32 is 1e-7 to 1e-6 from fp64 there, so the floor decides)."""
FP32_FACTOR = 10.0
"""How much further from fp64 than PyTorch fp32 an fp32 engine may be. Measured (benchmarks/fp64_gate.py,
reports/fp64-gate: strong-LoRA UNets, deltas 2x to 8x the base weights, 8 seeds x 2 sizes): correct engines'
ratio over CONFIRM_INPUTS inputs up to 1.7 (ONNX Runtime) and 6.7 (OpenVINO fp32, whose CPU kernels are
less exact than PyTorch's on such models), one input alone up to 17; planted export bugs (a transposed
weight, a wrong op) 1,200x to 65,000x. 10 refused none of the 96 correct checks and sits two orders of
magnitude below every bug (README, "Fidelity gates")."""
CONFIRM_INPUTS = 3
"""Seeded inputs that decide when the first one fails the fp32 rule."""
REDUCED = ("bf16", "fp16", "int8")
"""Precisions gated by the image check instead of the fp32 rule: OpenVINO bf16 and int8, ONNX Runtime fp16 on its
CUDA provider (checked in the build, on the GPU). TensorRT fp16 is not verified in the build (VERIFY_IN_BUILD
False); benchmarks/gpu_check.py checks it on a GPU."""
REDUCED_LIMIT = 0.5
"""Per-component sanity limit for reduced precision against PyTorch fp32 (measured bf16: 1e-2 to 6e-2;
the tiny demo's int8 UNet: 0.1 on the seeded random inputs, which lie outside its calibrated ranges);
the real gate is the image."""
IMAGE_PSNR_GATE_DB = 30.0
"""Smallest PSNR a bf16 (or ONNX Runtime fp16) entry's 4-step image may have against PyTorch fp32."""
INT8_IMAGE_GATE = {"psnr_db": 25.0, "ssim": 0.90}
"""Smallest PSNR and SSIM an int8 entry's 4-step image may have against PyTorch fp32 (with the same decoder).
Measured on demo:sd15-full (benchmarks/reports/cpu-fast, 3 held-out prompts, 256² and 512²): correct w8a8 /
w8a8-sq / w8 UNets 42.6-48.9 dB worst, SSIM >= 0.999, with SD 1.5's VAE; the fast entry (w8a8 UNet + a
random-weight TAESD, which magnifies the UNet's latent error) 29.2-29.7 dB at worst against diffusers with that
decoder (29.1 dB / SSIM 0.973 in its build-time check). On the tiny demo a UNet calibrated on wrong data (inputs at 1/20 of their scale) measured 23.2 dB /
0.836 and an unrelated image 15.5 dB / 0.24. So 25 dB / 0.90 passes every correct entry measured (the
lowest by 4.1 dB) and refuses a quantization that lost the model, not a slightly different picture."""
IMAGE_GATES = {"bf16": {"psnr_db": IMAGE_PSNR_GATE_DB}, "fp16": {"psnr_db": IMAGE_PSNR_GATE_DB}, "int8": INT8_IMAGE_GATE}
PROMPT = "a photo of an astronaut riding a horse"


def parity_resolutions(plans) -> list[tuple[int, int]]:
    """Sizes every engine is checked at: each plan's optimum, and a dynamic plan's corners."""
    res = [p.opt_hw for p in plans] + [r for p in plans for r in (p.min_hw, p.max_hw) if not p.static]
    return list(dict.fromkeys(res))


def sizes_for(comp: str, plans) -> list[tuple[int, int]]:
    """The sizes ``comp`` is checked at (a text encoder's output does not depend on the image size)."""
    res = parity_resolutions(plans)
    return res[:1] if comp.startswith("text_encoder") else res


# ---------------------------------------------------------------------------------------------
# PyTorch references

def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got64.shape != want64.shape:
        return float("inf")
    return float(np.linalg.norm(got64 - want64) / max(np.linalg.norm(want64), 1e-30))


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    """rel-L2, max-abs and finiteness of ``got`` against ``want``."""
    if got.shape != want.shape:
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "finite": False}
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return {"rel_l2": rel_l2(got, want), "max_abs": float(np.max(diff)) if diff.size else 0.0,
            "finite": bool(np.isfinite(got).all())}


def float64_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``module`` run in float64 on ``feeds``, without a float64 copy of the model.

    Each layer's own parameters are widened to float64 just before its forward and narrowed back
    right after (float32 -> float64 -> float32 is exact), so memory stays at the float32 model plus
    one layer (a float64 copy of the SDXL UNet would be 20 GB)."""
    import torch

    dtypes: dict[int, torch.dtype] = {}

    def widen(m, _args):
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float64:
                dtypes[id(p)] = p.dtype
                p.data = p.data.to(torch.float64)
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != torch.float64:
                m._buffers[name] = b.to(torch.float64)
                dtypes[id(m._buffers[name])] = b.dtype

    def narrow(m, *_):
        for p in m.parameters(recurse=False):
            if id(p) in dtypes:
                p.data = p.data.to(dtypes.pop(id(p)))
        for name, b in m.named_buffers(recurse=False):
            if id(b) in dtypes:
                m._buffers[name] = b.to(dtypes.pop(id(b)))

    owners = [m for m in module.modules()
              if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    hooks = [h for m in owners for h in (m.register_forward_pre_hook(widen), m.register_forward_hook(narrow))]
    try:
        return [np.asarray(o, np.float64) for o in run_module(module, feeds, torch.float64)]
    finally:
        for h in hooks:
            h.remove()
        for m in owners:  # an exception inside a forward skips its narrowing hook
            narrow(m)


@dataclass
class Reference:
    """PyTorch's answers for one component at one size: fp32 always, float64 where fp32 is gated."""

    feeds: dict
    fp32: list
    fp64: list | None
    resolution: str
    batch: int = 1


class References:
    """PyTorch's answers for a pipeline's components, each (component, size) computed once."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._mods = wrappers(pipe)
        self._cache: dict[tuple, Reference] = {}

    def get(self, comp: str, hw: tuple[int, int], fp64: bool = True, seed: int = 0) -> Reference:
        key = (comp, tuple(hw), seed)
        ref = self._cache.get(key)
        if ref is None:
            feeds = sample_inputs(comp, self.pipe, 1, hw, seed=seed)
            ref = Reference(feeds, run_module(self._mods[comp], feeds), None, f"{hw[0]}x{hw[1]}")
            self._cache[key] = ref
        if fp64 and ref.fp64 is None:
            ref.fp64 = float64_outputs(self._mods[comp], ref.feeds)
        return ref


# ---------------------------------------------------------------------------------------------
# The component gate

def _stack(arrays: list) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays])


def check_outputs(got: list[list], refs: list[Reference], precision: str = "fp32") -> dict:
    """One parity record: ``got[i]`` (every output of an engine for input i) against ``refs[i]``, rel-L2
    taken over all the inputs together. fp32: against float64, with PyTorch fp32's own distance and the
    limit; reduced precision: against PyTorch fp32."""
    ref0 = refs[0]
    base = {"batch": ref0.batch, "resolution": ref0.resolution, "shape": list(np.shape(got[0][0])), "inputs": len(refs)}
    finite = all(bool(np.isfinite(g).all()) for outs in got for g in outs)
    n_out = len(ref0.fp32)
    per_output = lambda which: [_stack([which(r, g)[k] for r, g in zip(refs, got)]) for k in range(n_out)]  # noqa: E731
    engine = per_output(lambda r, g: g)
    fp32 = per_output(lambda r, g: r.fp32)
    if precision in REDUCED or ref0.fp64 is None:
        worst = max((compare(e, w) for e, w in zip(engine, fp32)), key=lambda c: c["rel_l2"])
        return {**base, **worst, "finite": finite, "reference": "PyTorch fp32", "limit": REDUCED_LIMIT}
    rows = []
    for e, w32, w64 in zip(engine, fp32, per_output(lambda r, g: r.fp64)):
        e32 = rel_l2(w32, w64)
        rows.append({**compare(e, w64), "torch_fp32_rel_l2": e32, "limit": max(FP32_FLOOR, FP32_FACTOR * e32),
                     "vs_torch_fp32_rel_l2": rel_l2(e, w32)})
    worst = max(rows, key=lambda r: r["rel_l2"] / r["limit"])
    return {**base, **worst, "finite": finite, "reference": "PyTorch fp64"}


def passes(c: dict) -> bool:
    return c["finite"] and c["rel_l2"] <= c["limit"]


def gate(run, comp: str, hw, refs: "References", precision: str = "fp32") -> dict:
    """The parity record of ``run`` (feeds -> every output) for ``comp`` at ``hw``. fp32: one seeded input
    first; if that fails, CONFIRM_INPUTS inputs together decide (the rel-L2 of one input is a noisy
    yardstick: on ill-conditioned models PyTorch fp32's own error varies several-fold from input to input)."""
    fp64 = precision not in REDUCED
    first = refs.get(comp, hw, fp64=fp64, seed=0)
    got = [run(first.feeds)]
    c = check_outputs(got, [first], precision)
    if passes(c) or not fp64 or not c["finite"]:
        return c
    more = [refs.get(comp, hw, fp64=True, seed=s) for s in range(1, CONFIRM_INPUTS)]
    return check_outputs(got + [run(r.feeds) for r in more], [first] + more, precision)


def failures(checks: list[dict]) -> str:
    """'' when every check passes, else what failed (figures included)."""
    out = []
    for c in checks:
        if not c["finite"]:
            out.append(f"non-finite output at {c['resolution']}")
        elif not c["rel_l2"] <= c["limit"]:
            if c["reference"] == "PyTorch fp64":
                over = f" over {c['inputs']} inputs" if c.get("inputs", 1) > 1 else ""
                out.append(f"rel-L2 {c['rel_l2']:.1e} to the float64 answer at {c['resolution']}{over}, "
                           f"{c['rel_l2'] / max(c['torch_fp32_rel_l2'], 1e-30):.0f}x PyTorch fp32's {c['torch_fp32_rel_l2']:.1e} "
                           f"(limit {c['limit']:.1e} = max({FP32_FLOOR:g}, {FP32_FACTOR:g} x PyTorch fp32's))")
            else:
                out.append(f"rel-L2 {c['rel_l2']:.1e} to PyTorch fp32 at {c['resolution']} (sanity limit {c['limit']:g})")
    return "; ".join(out)


def graph_checks(comp: str, graph: Path, refs: References, sizes, extra: dict | None = None) -> list[dict]:
    """An exported (or patched) fp32 ONNX graph in ONNX Runtime on the CPU, against the references
    (``extra``: feeds beyond the component's own, e.g. rank-0 adapter factors)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    return [gate(lambda f: session.run(None, {**f, **(extra or {})}), comp, hw, refs) for hw in sizes]


def verify_graph(comp: str, graph: Path, refs: References, plans, what: str) -> list[dict]:
    """:func:`graph_checks` at every size ``comp`` is built for; refuse a graph that fails the fp32 rule."""
    checks = graph_checks(comp, graph, refs, sizes_for(comp, plans))
    bad = failures(checks)
    if bad:
        raise UserError(f"{comp}: {what} does not match PyTorch ({bad}); nothing was written. This is a bug in lcm-export's "
                        "export: please report it with the base model and versions")
    return checks


def verify_engine(mod, section: dict, comp: str, rec: dict, refs: References, plans, entry: Path, threads,
                  graph: Path | None = None, extra: dict | None = None) -> list[dict]:
    """Check the built engine of ``comp`` (record ``rec``, backend module ``mod``) at every built size;
    record ``rec["parity"]`` and refuse an engine that fails. Where the failing engine's exported graph
    ``graph`` is given, it is checked too, to say whether the export or the backend is at fault.
    ``extra``: feeds beyond the component's own (rank-0 adapter factors: no adapter)."""
    precision = rec["precision"]
    engine = mod.load_engine({mod.NAME: section, "components": {comp: rec}}, entry, comp,
                             entry / next(iter(rec["engines"].values())), threads)
    checks = [gate(lambda f: engine.run_all({**f, **(extra or {})}), comp, hw, refs, precision) for hw in sizes_for(comp, plans)]
    engine = None  # the engine's memory goes before the next component is built
    rec["parity"] = checks
    bad = failures(checks)
    if not bad:
        return checks
    culprit = f"{mod.NAME}"
    if graph is not None and precision not in REDUCED:
        graph_bad = failures(graph_checks(comp, graph, refs, sizes_for(comp, plans), extra))
        culprit = "lcm-export's export (the exported graph fails too)" if graph_bad else \
            f"{mod.NAME} (the exported graph itself passes in ONNX Runtime)"
    raise UserError(f"{comp}: the {mod.NAME} engine does not match PyTorch ({bad}); nothing was written. "
                    f"This is a bug in {culprit}: please report it with the base model and versions")


# ---------------------------------------------------------------------------------------------
# The image gate (reduced precision)

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two images in [0, 1] (HWC or NHWC), as Wang et al. 2004 define it: an 11x11 Gaussian
    window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, the window at every position where it fits
    (their reference code's ``filter2(..., 'valid')``), averaged over positions, channels and images.
    1 for equal images; about 0 for unrelated ones."""
    from numpy.lib.stride_tricks import sliding_window_view

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ ({x.shape} vs {y.shape})")
    x, y = (x[None], y[None]) if x.ndim == 3 else (x, y)
    if x.ndim != 4 or min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim: needs HWC or NHWC images at least {SSIM_WINDOW} pixels on a side, got {a.shape}")
    r = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(r ** 2) / (2 * SSIM_SIGMA ** 2))
    g /= g.sum()

    def blur(img):  # separable Gaussian over H then W, 'valid' positions only
        img = sliding_window_view(img, SSIM_WINDOW, axis=1) @ g
        return sliding_window_view(img, SSIM_WINDOW, axis=2) @ g

    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def seeded_inputs(latent_channels: int, hw: tuple[int, int], steps: int = 4, seed: int = 42, batch: int = 1):
    """Latents and the noise of every step but the last, from one seeded numpy generator."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, latent_channels, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    return latents, [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps - 1)]


def diffusers_images(pipe, prompt: str, steps: int, guidance: float, latents: np.ndarray, noise: list[np.ndarray],
                     scheduler_config: dict | None = None, output_type: str = "np") -> np.ndarray:
    """diffusers' pipeline with LCMScheduler, our latents and step noise injected; NHWC floats in [0, 1]
    (``output_type="latent"``: the final latents, NCHW, no decoding).

    The pipeline's scheduler and diffusers' noise function are restored afterwards.
    """
    import diffusers.schedulers.scheduling_lcm as lcm_mod
    import torch
    from diffusers import LCMScheduler

    param = next(pipe.unet.parameters())
    queue = [torch.from_numpy(n).to(param.device, param.dtype) for n in noise]
    original_sched, original_randn = pipe.scheduler, lcm_mod.randn_tensor
    pipe.scheduler = LCMScheduler.from_config(scheduler_config or pipe.scheduler.config)
    lcm_mod.randn_tensor = lambda *a, **k: queue.pop(0)
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.no_grad():
            out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                       latents=torch.from_numpy(latents).to(param.device, param.dtype),
                       height=latents.shape[2] * 8, width=latents.shape[3] * 8, output_type=output_type).images
    finally:
        pipe.scheduler, lcm_mod.randn_tensor = original_sched, original_randn
    if queue:
        raise RuntimeError(f"diffusers used {len(noise) - len(queue)} of {len(noise)} step-noise tensors")
    return np.asarray(out.float().numpy() if hasattr(out, "numpy") else out, np.float32)


def image_fidelity(pipe, entry: Path, hw: tuple[int, int], full_vae=None, steps: int = 4, guidance: float = 1.0,
                   seed: int = 42, release_pipe: bool = False) -> dict:
    """PSNR and SSIM of the entry's 4-step image (lean runtime) against ``pipe`` (diffusers PyTorch fp32, same
    latents and step noise). ``full_vae``: where the entry decodes with a tiny decoder (``pipe.vae`` is it),
    the base's own VAE; the image is then also compared with diffusers decoding through that one.
    PyTorch's images come first; ``release_pipe`` (the caller's last use of ``pipe``) then frees its weights
    before the entry's engines load, so that the two models are never in memory together (SDXL at 1024²: the
    fp32 pipeline's 13.9 GB beside the engines did not fit 24 GB)."""
    from ..runtime import LCMPipeline
    from ..store.manifest import read_manifest

    channels = int(read_manifest(entry, check_files=False).get("latent_channels", 4))  # as the runtime reads it
    latents, noise = seeded_inputs(channels, hw, steps, seed)
    sched = json.loads((Path(entry) / "scheduler" / "scheduler_config.json").read_text())
    ref = diffusers_images(pipe, PROMPT, steps, guidance, latents, noise, sched)
    full = None
    if full_vae is not None:
        tiny, pipe.vae = pipe.vae, full_vae
        try:
            full = diffusers_images(pipe, PROMPT, steps, guidance, latents, noise, sched)
        finally:
            pipe.vae = tiny
    if release_pipe:
        release_weights(pipe, full_vae)
    runtime = LCMPipeline.from_engine_dir(entry)
    ours = runtime(PROMPT, steps=steps, guidance=guidance, height=hw[0], width=hw[1], latents=latents,
                   step_noise=noise, output_type="np")
    del runtime
    rec = {"image_psnr_db": psnr(ours, ref), "image_ssim": ssim(ours, ref), "resolution": f"{hw[0]}x{hw[1]}",
           "steps": steps, "guidance": guidance,
           "reference": "diffusers PyTorch fp32, same fused weights, VAE decoder, latents and step noise"}
    if full is not None:
        rec["vs_full_vae"] = {"image_psnr_db": psnr(ours, full), "image_ssim": ssim(ours, full),
                              "reference": "diffusers PyTorch fp32 decoding with the base's own VAE (what the tiny decoder trades)"}
    return rec


def release_weights(*holders) -> None:
    """Free the parameters and buffers of every torch module held by ``holders`` (a diffusers pipeline's
    components, or modules): each becomes a meta tensor, its memory returned. The modules are unusable after."""
    import gc

    import torch

    for h in holders:
        if h is None:
            continue
        mods = [h] if isinstance(h, torch.nn.Module) else [m for m in getattr(h, "components", {}).values()
                                                           if isinstance(m, torch.nn.Module)]
        for m in mods:
            m.to("meta")
    gc.collect()


def image_gate(pipe, entry: Path, plans, components: dict, precision: str = "bf16", full_vae=None,
               release_pipe: bool = False) -> dict:
    """A 4-step LCM image from the new entry against the PyTorch fp32 pipeline, same latents and step
    noise, as PSNR and SSIM (:func:`image_fidelity`); refuse the entry below IMAGE_GATES[precision]
    (precisions without a gate, e.g. fp32 with a tiny decoder, are recorded, not gated). ``release_pipe``:
    the caller's last use of ``pipe`` (see :func:`image_fidelity`)."""
    hw = min((p.opt_hw for p in plans), key=lambda hw: hw[0] * hw[1])
    rec = image_fidelity(pipe, entry, hw, full_vae, release_pipe=release_pipe)
    gate = IMAGE_GATES.get(precision)
    if gate is None:
        return {**rec, "gate": None}
    rec["gate_db"] = gate["psnr_db"]
    if "ssim" in gate:
        rec["gate_ssim"] = gate["ssim"]
    value, s = rec["image_psnr_db"], rec["image_ssim"]
    if not (value >= gate["psnr_db"] and s >= gate.get("ssim", -1.0)):
        figures = "; ".join(f"{c} {r['precision']} rel-L2 {max(p['rel_l2'] for p in r['parity']):.1e}"
                            for c, r in components.items())
        want = f"gate {gate['psnr_db']:g} dB" + (f", SSIM {gate['ssim']:g}" if "ssim" in gate else "")
        fix = ("Try another --int8-scheme (w8a8-sq, hybrid, w8) or build with --precision bf16 / fp32"
               if precision == "int8" else "Build with --precision fp32")
        raise UserError(f"the entry's 4-step image differs from PyTorch fp32 by PSNR {value:.1f} dB, SSIM {s:.3f} at "
                        f"{hw[0]}x{hw[1]} ({want}; components: {figures}); nothing was written. {fix}")
    return rec
