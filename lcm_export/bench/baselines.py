"""The PyTorch side of ``bench``: the reference pipeline (same fused weights), per-stage timers,
the paper's solvers, the UNet FLOP count and the matrix-product peaks measured on this machine."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import UserError

SOLVERS = {"lcm": "LCMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolver", "dpmpp": "DPMSolver++"}
PROMPT = "a photo of an astronaut riding a horse on mars"


def stats(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"median_s": float(np.median(a)), "p90_s": float(np.percentile(a, 90)), "mean_s": float(a.mean()),
            "min_s": float(a.min()), "n": int(a.size)}



def reference_pipeline(manifest: dict, engine_dir: Path):
    """The fused model the engine was built from, rebuilt in diffusers (same LoRA files, same λ)."""
    from .._util import sha256_file
    from ..builder.fuse import LoraSpec, fuse_into, inspect_lora
    from ..sources.models import load_pipeline, resolve_base

    items = []
    for l in manifest["fusion"]["loras"]:
        p = Path(l["path"])
        if not p.is_file() or sha256_file(p) != l["sha256"]:
            raise UserError(f"LoRA file {p} is missing or changed since {engine_dir} was built; the baselines need the same fused model")
        items.append((LoraSpec(p, l["weight"]), inspect_lora(p)))
    pipe = load_pipeline(resolve_base(manifest["base_source"]))
    fuse_into(pipe, items)
    tiny = manifest.get("vae_decoder")
    if isinstance(tiny, dict) and tiny.get("kind") == "tiny":  # the entry decodes with a tiny decoder: so does the baseline
        from ..sources.tiny_vae import load_vae_decoder, resolve_vae_decoder

        pipe.vae = load_vae_decoder(resolve_vae_decoder(tiny["source"], manifest["family"]))
    return _lcm(pipe, json.loads((engine_dir / manifest["scheduler"]["file"]).read_text()))


def base_pipeline(base: str):
    """A base model without LoRAs, with an LCMScheduler made from its own scheduler config (as a build's entry
    holds it): the PyTorch side when no engine entry is built."""
    from diffusers import LCMScheduler

    from ..sources.models import load_pipeline, resolve_base

    pipe = load_pipeline(resolve_base(base))
    cfg = dict(LCMScheduler.from_config(pipe.scheduler.config).config)
    return _lcm(pipe, {k: v for k, v in cfg.items() if not k.startswith("_")})


def _lcm(pipe, sched_cfg: dict):
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(sched_cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sched_cfg


class StageTimer:
    """Wraps callables on the pipeline's modules and records each call's wall time."""

    def __init__(self, sync=None):
        self.times = defaultdict(list)
        self.sync = sync or (lambda: None)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            self.sync()
            self.times[name].append(time.perf_counter() - t0)
            return r

        setattr(obj, attr, timed)

    def reset(self):
        self.times.clear()


def scheduler_for(name: str, cfg: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    if name == "lcm":
        return LCMScheduler.from_config(cfg)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if name == "dpm":  # DPM-Solver (not ++) cannot step to sigma 0: its last step ends at sigma_min
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")


BASELINES = ("eager", "compile", "reduce-overhead", "bf16")
NO_NATIVE_BF16 = ("this CPU has no native bf16 (neither AMX nor AVX512_BF16): torch would emulate bf16, far slower than "
                  "fp32, so a bf16 timing would mean nothing (the build refuses --precision bf16 here too)")
"""Why bf16 is neither timed nor peak-measured on such a CPU: emulated bf16 matrix products run ~70x slower
than fp32 (0.9 against 65 GFLOP/s on an AMD EPYC Zen 3)."""


def bf16_emulated(device: str, cpu_bf16: bool | None = None) -> bool:
    """Whether bf16 on ``device`` would be emulated: a CPU without AMX or AVX512_BF16 (``cpu_bf16``, or this
    CPU's flags by ``_cpu.native_bf16`` when None). CUDA counts as native."""
    if device != "cpu":
        return False
    if cpu_bf16 is None:
        from .._cpu import native_bf16

        cpu_bf16 = native_bf16()
    return not cpu_bf16


def baseline_setup(base: str, device: str, cpu_bf16: bool | None = None) -> dict:
    """How one PyTorch baseline runs on ``device`` ("cpu" | "cuda"). Pure, given ``cpu_bf16`` (None: this CPU's flags).

    {"dtype": torch dtype name, "precision", "compile": None | torch.compile mode, "skip": reason or None,
    "label"}. eager/compile/reduce-overhead run in the device's native precision (fp16 on CUDA, fp32 on
    CPU); bf16 casts every module to bf16. reduce-overhead (CUDA graphs) needs CUDA: skipped elsewhere; bf16
    needs native bf16 on a CPU (``bf16_emulated``): skipped on CPUs without it."""
    precision = "fp16" if device == "cuda" else "fp32"
    if base == "bf16":
        precision = "bf16"
    dtype = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}[precision]
    mode = {"compile": "default", "reduce-overhead": "reduce-overhead"}.get(base)
    skip = None
    if base == "reduce-overhead" and device != "cuda":
        skip = "needs a CUDA GPU: torch.compile(mode='reduce-overhead') is CUDA graphs, which CPUs do not have"
    if base == "bf16" and bf16_emulated(device, cpu_bf16):
        skip = NO_NATIVE_BF16
    what = {"eager": "eager", "compile": "torch.compile", "reduce-overhead": "torch.compile reduce-overhead (CUDA graphs)",
            "bf16": "eager, modules cast to bf16"}[base]
    return {"dtype": dtype, "precision": precision, "compile": mode, "skip": skip,
            "label": f"diffusers {what} ({precision} {device})"}


def torch_call(pipe, latents, steps, guidance, hw):
    """One diffusers image; the numpy latents follow the pipeline's device and dtype."""
    import torch

    param = next(pipe.unet.parameters())
    lat = torch.from_numpy(latents).to(param.device, param.dtype)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=lat,
                height=hw[0], width=hw[1], output_type="np").images


def time_torch(pipe, timer, latents, hw, guidance, runs, warmup, steps=4, bar=None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        torch_call(pipe, latents, steps, guidance, hw)
        bar and bar.update()
    warm = time.perf_counter() - t0
    e2e, text, unet, vae = [], [], [], []
    for _ in range(runs):
        timer.reset()
        t0 = time.perf_counter()
        torch_call(pipe, latents, steps, guidance, hw)
        e2e.append(time.perf_counter() - t0)
        text.append(sum(timer.times["text_encoder"]))  # per image: every encoder call (cond, uncond, both encoders)
        unet += timer.times["unet"]
        vae.append(sum(timer.times["vae_decoder"]))
        bar and bar.update()
    return {"text_encoder": stats(text), "unet_step": stats(unet), "vae_decoder": stats(vae), "end_to_end": stats(e2e)}, warm


def time_baselines(ref, baselines, device: str, latents, hw, guidance: float, runs: int, warmup: int, bar,
                   cpu_bf16: bool | None = None) -> dict:
    """Each PyTorch baseline on ``ref`` (on ``device``, in the device's native precision): {name: row}, a row
    with "stages", "skipped" (why it cannot run here: ``baseline_setup``, ``cpu_bf16`` passed on) or "error"
    (what failed; the report counts it as a failure). A cast baseline runs on a copy; ``ref`` keeps its
    weights and forwards."""
    import copy

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = {}
    for base in baselines:
        bar.set_description_str(f"PyTorch {base}")
        setup = baseline_setup(base, device, cpu_bf16)
        row = rows[base] = {"label": setup["label"], "precision": setup["precision"]}
        if setup["skip"]:
            row["skipped"] = setup["skip"]
            bar.update(runs + warmup)
            continue
        pipe = ref
        try:
            timer = StageTimer(sync)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if setup["dtype"] != str(ref.unet.dtype).removeprefix("torch."):
                pipe = copy.deepcopy(ref).to(getattr(torch, setup["dtype"]))
            if setup["compile"]:  # instance attributes; removed again below
                pipe.unet.forward = torch.compile(pipe.unet.forward, mode=setup["compile"])
                pipe.vae.decode = torch.compile(pipe.vae.decode, mode=setup["compile"])
            for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                if te is not None:
                    timer.wrap(te, "forward", "text_encoder")
            timer.wrap(pipe.unet, "forward", "unet")
            timer.wrap(pipe.vae, "decode", "vae_decoder")
            with torch.no_grad():
                row["stages"], row["warmup_s"] = time_torch(pipe, timer, latents, hw, guidance, runs, warmup, bar=bar)
            if device == "cuda":
                row["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if setup["compile"]:
                row["note"] = (f"torch.compile(mode={setup['compile']!r}) on unet.forward and vae.decode; "
                               "compile time is inside warm-up")
        except Exception as exc:  # recorded as the row's error; the report lists it under "failures"
            msg = str(exc).strip()
            row.pop("stages", None), row.pop("warmup_s", None)
            row["error"] = f"{type(exc).__name__}: {msg.splitlines()[0][:300] if msg else ''}"
            bar.update(runs + warmup)
        finally:
            mods = [(m, "forward") for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet) if m is not None]
            for mod, attr in mods + [(pipe.vae, "decode")]:
                mod.__dict__.pop(attr, None)  # drop wrappers / compiled forwards
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def time_solvers(ref, sched_cfg: dict, solvers, latents, hw, guidance: float, runs: int, bar) -> list[dict]:
    """The paper's Table 2 on ``ref``: each (solver, steps) end to end, ``runs`` times (the model is warm);
    ``ref`` gets its LCMScheduler back afterwards."""
    import torch

    rows = []
    try:
        with torch.no_grad():
            for name, steps in solvers:
                bar.set_description_str(f"PyTorch {SOLVERS[name]} {steps} steps")
                ref.scheduler = scheduler_for(name, sched_cfg)
                ts = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    torch_call(ref, latents, steps, guidance, hw)  # numpy images: waits for the device
                    ts.append(time.perf_counter() - t0)
                    bar.update()
                rows.append({"solver": SOLVERS[name], "steps": steps, "path": "diffusers eager", **stats(ts)})
    finally:
        ref.scheduler = scheduler_for("lcm", sched_cfg)
    return rows


def unet_flops(pipe, batch: int, hw: tuple[int, int]) -> int:
    """FLOPs of one UNet call (2 per multiply-add), counted by torch's FlopCounterMode.

    Attention runs on SDPA's math backend here: FlopCounterMode has no formula for the fused CPU
    kernel (``_scaled_dot_product_flash_attention_for_cpu``) and would count attention as 0
    (SD 1.5 at 512x512: 677 instead of 803 GFLOP), while the math backend is plain matmuls.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    x = torch.randn(batch, unet.config.in_channels, hw[0] // 8, hw[1] // 8)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim)
    added = None
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: pooled text embedding + time ids
        added = {"text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim),
                 "time_ids": torch.tensor([[hw[0], hw[1], 0, 0, hw[0], hw[1]]], dtype=torch.float32).repeat(batch, 1)}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        unet(x, torch.full((batch,), 999), encoder_hidden_states=e, added_cond_kwargs=added)
    return int(counter.get_total_flops())


PEAK_BUDGET_S = 2.0
"""Seconds one library's peak measurement takes, whatever the machine: the matrix size is calibrated to fit."""


def measure_peak(threads: int, n: int = 4096, repeats: int = 3, precision: str = "fp32", device: str = "cpu",
                 budget_s: float = PEAK_BUDGET_S) -> dict:
    """Matrix-multiply peak measured here in ``precision`` (fp32 | bf16 | fp16) on ``device``: best of square products
    in torch (MKL/oneDNN; AMX for bf16 where the CPU has it; cuBLAS on CUDA) and, for fp32 on CPU, numpy.

    Each library's product is sized by ``calibrated_rate`` to take about ``budget_s`` (``n`` is the largest size
    tried), so a slow CPU measures a smaller product instead of taking minutes. bf16 on a CPU without native bf16
    is refused (``UserError``): emulated, it would be slow and mean nothing (``bench`` skips it with a note)."""
    import torch

    if precision == "bf16" and bf16_emulated(device):
        raise UserError(f"no bf16 peak: {NO_NATIVE_BF16}")
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    sync = torch.cuda.synchronize if device == "cuda" else None

    def torch_product(k: int):
        a, b = (torch.randn(k, k, device=device).to(dtype) for _ in range(2))
        return lambda: torch.mm(a, b)

    out = {"precision": precision, "device": device}
    out["torch_mm_flops_per_s"], out["matrix_size"] = calibrated_rate(torch_product, n, repeats, budget_s, sync)
    out["best_flops_per_s"] = out["torch_mm_flops_per_s"]
    if precision == "fp32" and device == "cpu":
        rng = np.random.default_rng(0)

        def numpy_product(k: int):
            a, b = (rng.standard_normal((k, k), dtype=np.float32) for _ in range(2))
            return lambda: a @ b

        out["numpy_matmul_flops_per_s"], out["numpy_matrix_size"] = calibrated_rate(numpy_product, n, repeats, budget_s)
        out["best_flops_per_s"] = max(out["torch_mm_flops_per_s"], out["numpy_matmul_flops_per_s"])
    out["seconds"] = time.perf_counter() - t0
    return out


def calibrated_rate(product, n_max: int, repeats: int, budget_s: float, sync=None, n_min: int = 256) -> tuple[float, int]:
    """(best FLOP/s, matrix size) of square products ``product(k)()`` (``product(k)`` makes the k x k operands
    and returns the call), in about ``budget_s`` seconds whatever the machine's speed.

    From ``n_min`` the size doubles, up to ``n_max``, while the next size's two calls (the first untimed:
    allocation, kernel selection; the second timed), predicted from the last call by k³ scaling, fit in what is
    left of the budget: the largest product the budget allows, as small sizes understate the peak. At the final
    size: best of up to ``repeats`` timed calls, fewer where the next would overrun the budget. The total stays
    near the budget on any machine (beyond it only by as much as a call is slower than predicted)."""
    t_start = time.perf_counter()
    k = min(n_min, n_max)
    run = product(k)
    _timeit(run, sync)  # first call: allocation, kernel selection
    times = [_timeit(run, sync)]
    while 2 * k <= n_max:
        left = budget_s - (time.perf_counter() - t_start)
        if times[-1] * 8 * 2 > left:
            break
        k *= 2
        run = product(k)
        _timeit(run, sync)
        times = [_timeit(run, sync)]
    while len(times) < repeats and time.perf_counter() - t_start + min(times) <= budget_s:
        times.append(_timeit(run, sync))
    return 2 * k**3 / min(times), k


def _timeit(fn, sync=None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0
