"""Calibration data for post-training quantization: the UNet inputs of the entry's own LCM trajectories.

An int8 UNet is calibrated on what it will see: for each prompt of a small built-in set, diffusers'
PyTorch fp32 pipeline with the entry's fused weights and its LCMScheduler runs the 4 LCM steps
(seeded latents and step noise, guidance 1, no decoding), and the UNet's inputs at every step —
latents, timestep, text embeddings (and, for SDXL / SSD-1B, the pooled embedding and time ids) —
are captured as the exported graph's feeds. The empty prompt is in the set, so the unconditional
embedding that classifier-free guidance feeds the UNet is covered too.

Used by ``build_engine`` and ``refit`` (a refit re-quantizes on the new weights' trajectories);
the quantizer itself lives with the backend (``backends/openvino.py``).
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a portrait of an old man with a beard, studio lighting",
    "a cozy cabin in a snowy forest at night",
    "a bowl of fruit on a wooden table, still life painting",
    "a city street in the rain, neon signs, cinematic",
    "a red sports car on a mountain road",
    "a watercolor illustration of a fox in a meadow",
    "",
)
"""Eight prompts (people, landscape, still life, city, vehicle, animal, a painting style, and the empty
prompt): 8 trajectories x 4 steps = 32 UNet calls to calibrate on."""
CALIBRATION_STEPS = 4
CALIBRATION_VERSION = 1
"""Part of an int8 entry's graph key: bump when the prompts, seeds or capture change."""


def unet_calibration_feeds(pipe, hw: tuple[int, int], prompts=CALIBRATION_PROMPTS, steps: int = CALIBRATION_STEPS,
                           scheduler_config: dict | None = None) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs at every step of each prompt's ``steps``-step LCM trajectory at ``hw``, as
    feeds of the exported UNet graph (``components.component_io``): one dict per UNet call."""
    import torch

    from .components import is_xl
    from .verify import diffusers_images, seeded_inputs

    feeds: list[dict[str, np.ndarray]] = []
    xl = is_xl(pipe)

    def capture(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        emb = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        b = sample.shape[0]
        f = {"sample": sample.detach().float().numpy().copy(),
             "timestep": np.full((b,), float(torch.as_tensor(t).reshape(-1)[0]), np.float32),
             "encoder_hidden_states": emb.detach().float().numpy().copy()}
        if xl:
            added = kwargs.get("added_cond_kwargs") or {}
            f["text_embeds"] = added["text_embeds"].detach().float().numpy().copy()
            f["time_ids"] = added["time_ids"].detach().float().numpy().copy()
        feeds.append(f)

    handle = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        channels = int(pipe.unet.config.in_channels)
        for i, prompt in enumerate(prompts):
            latents, noise = seeded_inputs(channels, hw, steps, seed=1000 + i)
            diffusers_images(pipe, prompt, steps, 1.0, latents, noise, scheduler_config, output_type="latent")
    finally:
        handle.remove()
    return feeds


def smallest_size(plans) -> tuple[int, int]:
    """The smallest built size: where the trajectories are drawn (the cheapest; the image check runs there too)."""
    return min((p.opt_hw for p in plans), key=lambda hw: hw[0] * hw[1])


def calibrate(pipe, plans, bar=None) -> tuple[list, dict]:
    """The int8 UNet's calibration feeds (the entry's own LCM trajectories at the smallest built size; diffusers
    turns the base's scheduler config into the LCMScheduler the entry stores) and their manifest record."""
    if bar is not None:
        bar.set_description_str("int8 calibration: LCM trajectories in PyTorch fp32")
    hw = smallest_size(plans)
    feeds = unet_calibration_feeds(pipe, hw)
    if bar is not None:
        bar.update()
    return feeds, calibration_record(hw, len(feeds))


def calibration_record(hw: tuple[int, int], n_feeds: int, prompts=CALIBRATION_PROMPTS) -> dict:
    """What the manifest says about the calibration data."""
    return {"prompts": len(prompts), "steps": CALIBRATION_STEPS, "samples": n_feeds, "resolution": f"{hw[0]}x{hw[1]}",
            "guidance": 1.0, "version": CALIBRATION_VERSION,
            "source": "UNet inputs of diffusers' PyTorch fp32 pipeline (fused weights, LCMScheduler), seeded latents"}
