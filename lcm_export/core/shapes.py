"""Resolutions -> engine input shapes (min/opt/max) per component. Pure functions, no TensorRT.

Latents are image/8. SD UNets halve the latent once per down block after the first, so an image
side must be a multiple of 8·2^(n_down-1) (64 for SD 1.5/SDXL) for skip connections to line up.
The UNet runs at batch B without guidance and 2B with classifier-free guidance (uncond + cond);
the text encoder encodes both prompts in one call, so it follows the UNet's batch range.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

LATENT_FACTOR = 8
MAX_SIDE = 4096
"""Largest image side accepted (SD 1.5 is trained at 512, SDXL at 1024; 4096 is 4x the largest)."""
MAX_BATCH = 64
"""Most images in one call (engine builds and runtime calls): a call holds every image's latents,
step noise and decoded pixels at once, and a build's shapes grow with it. Checked before anything
is allocated (a batch of 10^12 once asked numpy for 58 PiB)."""
TEXT_LEN = 77
GUIDANCE_MODES = ("auto", "on", "off")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapePlan:
    """What one engine (per component) covers: image sizes and batch sizes as (min, opt, max)."""

    name: str
    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]
    unet_batch: tuple[int, int, int]
    vae_batch: tuple[int, int, int]

    @property
    def static(self) -> bool:
        return self.min_hw == self.max_hw

    def covers(self, h: int, w: int) -> bool:
        return self.min_hw[0] <= h <= self.max_hw[0] and self.min_hw[1] <= w <= self.max_hw[1]


def size_multiple(n_down_blocks: int) -> int:
    """Image sides must be multiples of this: 8 (latent) × 2 per downsampling block."""
    return LATENT_FACTOR * 2 ** max(n_down_blocks - 1, 0)


def validate_resolution(h: int, w: int, multiple: int = LATENT_FACTOR) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise UserError(f"resolution {h!r}x{w!r}: height and width must be whole numbers (int)")
    if h <= 0 or w <= 0:
        raise UserError(f"resolution {h}x{w}: height and width must be positive")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise UserError(f"resolution {h}x{w}: sides above {MAX_SIDE} are not supported (memory grows with the square "
                        f"of the pixel count); choose a smaller --resolution")
    if h % LATENT_FACTOR or w % LATENT_FACTOR:
        raise UserError(f"resolution {h}x{w}: height and width must be multiples of 8 (latent = image/8)")
    if h % multiple or w % multiple:
        raise UserError(
            f"resolution {h}x{w}: this UNet needs multiples of {multiple} (latent = image/8, halved at each down block); "
            f"try {round(h / multiple) * multiple or multiple}x{round(w / multiple) * multiple or multiple}"
        )


def attention_bytes(hw: tuple[int, int], unet_batch: int, unet_config: dict) -> int:
    """A lower bound on the memory one UNet call needs at ``hw``: the fp32 score matrix of the
    largest self-attention (batch × heads × S² with S latent positions at that level), which ONNX
    Runtime on CPU materializes in full. Weights and feature maps come on top."""
    types = list(unet_config.get("down_block_types") or ["CrossAttnDownBlock2D"])
    level = next((i for i, t in enumerate(types) if "Attn" in str(t)), None)
    if level is None:
        return 0
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    heads = heads[level] if isinstance(heads, (list, tuple)) else heads
    seq = (hw[0] // LATENT_FACTOR >> level) * (hw[1] // LATENT_FACTOR >> level)
    return int(unet_batch) * int(heads) * seq * seq * 4


def machine_memory() -> int | None:
    """Physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(plans: list["ShapePlan"], unet_config: dict, available: int | None = None) -> None:
    """Refuse, before anything is loaded, a plan whose largest size cannot fit this machine's memory."""
    available = machine_memory() if available is None else available
    if not available:
        return
    for p in plans:
        need = attention_bytes(p.max_hw, p.unet_batch[2], unet_config)
        if need > available:
            h, w = p.max_hw
            raise UserError(f"resolution {h}x{w}: building and checking it needs at least {need / 2**30:.0f} GiB "
                            f"(attention over {(h // 8) * (w // 8)} latent positions), more than this machine's "
                            f"{available / 2**30:.0f} GiB; choose a smaller --resolution")


def unet_batch_range(batch: int, guidance: str) -> tuple[int, int, int]:
    """(min, opt, max) UNet batch: B without guidance, 2B with it; ``auto`` covers both, opt at B
    (LCM-LoRA's usual guidance is <= 1, i.e. off)."""
    if not 1 <= batch <= MAX_BATCH:
        raise UserError(f"--batch {batch}: must be from 1 to {MAX_BATCH} (images per engine call)")
    if guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance {guidance!r}: choose auto, on or off")
    return {"off": (batch, batch, batch), "on": (2 * batch,) * 3, "auto": (batch, batch, 2 * batch)}[guidance]


def plan_shapes(
    resolutions: list[tuple[int, int]],
    dynamic: tuple[tuple[int, int], tuple[int, int]] | None,
    batch: int,
    guidance: str,
    multiple: int = LATENT_FACTOR,
) -> list[ShapePlan]:
    """One static plan per resolution, or one dynamic plan over ``dynamic`` (lo, hi).

    With ``dynamic``, requested resolutions must lie inside the range; the first one is the
    optimisation point (else the range's midpoint, rounded down to ``multiple``).
    """
    ub = unet_batch_range(batch, guidance)
    vb = (batch, batch, batch)
    for h, w in resolutions:
        validate_resolution(h, w, multiple)
    if dynamic is None:
        if not resolutions:
            raise UserError("no resolution given (use --resolution HxW)")
        seen = list(dict.fromkeys(resolutions))
        return [ShapePlan(f"{h}x{w}", (h, w), (h, w), (h, w), ub, vb) for h, w in seen]
    (lh, lw), (hh, hw) = dynamic
    validate_resolution(lh, lw, multiple)
    validate_resolution(hh, hw, multiple)
    if lh > hh or lw > hw:
        raise UserError(f"--dynamic {lh}x{lw}-{hh}x{hw}: the first size must not exceed the second in either side")
    plan_name = f"dyn-{lh}x{lw}-{hh}x{hw}"
    for h, w in resolutions:
        if not (lh <= h <= hh and lw <= w <= hw):
            raise UserError(f"resolution {h}x{w} is outside the dynamic range {lh}x{lw}-{hh}x{hw}")
    if resolutions:
        opt = resolutions[0]
    else:
        mid = lambda a, b: max(a, (a + b) // 2 // multiple * multiple)
        opt = (mid(lh, hh), mid(lw, hw))
    return [ShapePlan(plan_name, (lh, lw), opt, (hh, hw), ub, vb)]


def component_profiles(plan: ShapePlan, text_dim: int, latent_channels: int = 4,
                       pooled_dim: int | None = None) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Per component and input: (min, opt, max) shapes — what a TensorRT optimisation profile needs.

    ``pooled_dim`` (SDXL/SSD-1B) adds the second text encoder and the UNet's ``text_embeds`` [B,P]
    and ``time_ids`` [B,6] inputs.
    """
    lat = lambda hw: (hw[0] // LATENT_FACTOR, hw[1] // LATENT_FACTOR)
    hws = (plan.min_hw, plan.opt_hw, plan.max_hw)
    ub, vb = plan.unet_batch, plan.vae_batch
    out = {
        "text_encoder": {"input_ids": tuple((b, TEXT_LEN) for b in ub)},
        "unet": {
            "sample": tuple((b, latent_channels, *lat(hw)) for b, hw in zip(ub, hws)),
            "timestep": tuple((b,) for b in ub),
            "encoder_hidden_states": tuple((b, TEXT_LEN, text_dim) for b in ub),
        },
        "vae_decoder": {"latent": tuple((b, latent_channels, *lat(hw)) for b, hw in zip(vb, hws))},
    }
    if pooled_dim:
        out["text_encoder_2"] = {"input_ids": tuple((b, TEXT_LEN) for b in ub)}
        out["unet"]["text_embeds"] = tuple((b, pooled_dim) for b in ub)
        out["unet"]["time_ids"] = tuple((b, 6) for b in ub)
    return out
