"""Image-level fidelity: an entry's 4-step LCM image against diffusers' PyTorch pipeline with the same
fused weights, latents and per-step noise, as PSNR (images in [0, 1])."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def seeded_inputs(latent_channels: int, hw: tuple[int, int], steps: int = 4, seed: int = 42, batch: int = 1):
    """Latents and the noise of every step but the last, from one seeded numpy generator."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, latent_channels, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    return latents, [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps - 1)]


def diffusers_images(pipe, prompt: str, steps: int, guidance: float, latents: np.ndarray, noise: list[np.ndarray],
                     scheduler_config: dict | None = None) -> np.ndarray:
    """diffusers' pipeline with LCMScheduler, our latents and step noise injected; NHWC floats in [0, 1].

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
                       height=latents.shape[2] * 8, width=latents.shape[3] * 8, output_type="np").images
    finally:
        pipe.scheduler, lcm_mod.randn_tensor = original_sched, original_randn
    if queue:
        raise RuntimeError(f"diffusers used {len(noise) - len(queue)} of {len(noise)} step-noise tensors")
    return np.asarray(out, np.float32)


def image_psnr(pipe, engine_dir: Path, hw: tuple[int, int], steps: int = 4, guidance: float = 1.0, seed: int = 42) -> float:
    """PSNR of the entry at ``engine_dir`` (lean runtime) against ``pipe`` (PyTorch), same inputs."""
    from .runtime import LCMPipeline

    runtime = LCMPipeline.from_engine_dir(engine_dir)
    latents, noise = seeded_inputs(runtime.latent_channels, hw, steps, seed)
    ours = runtime(PROMPT, steps=steps, guidance=guidance, height=hw[0], width=hw[1], latents=latents,
                   step_noise=noise, output_type="np")
    del runtime
    sched = json.loads((Path(engine_dir) / "scheduler" / "scheduler_config.json").read_text())
    ref = diffusers_images(pipe, PROMPT, steps, guidance, latents, noise, sched)
    return psnr(ours, ref)
