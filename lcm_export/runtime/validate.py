"""Checks of ``LCMPipeline.__call__``'s arguments, in one place: each bad value becomes one
``UserError`` naming the argument and what it must be, before any engine runs or anything is allocated.

Types are strict, and the HTTP API (``serve/api.py``) applies the same rules to JSON: whole numbers
(steps, seed, batch, height, width) must be ints (numpy integers too; not bools, floats or strings),
guidance a real number (an int is fine; not a bool or a string), prompts str holding valid Unicode.

numpy only (the runtime stays lean).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import UserError
from ..core.shapes import MAX_BATCH, machine_memory

OUTPUT_TYPES = ("pil", "np")
MAX_GUIDANCE = 30.0
"""Largest classifier-free guidance scale. LCM-LoRA is used at 1-2, classic SD at ~7.5, and images
saturate well before 30 (the top of the usual UIs' range); beyond it there is nothing to gain, and
a scale of 1e308 overflows float32 in the guidance combine itself (inf, then NaN)."""


def is_whole(v) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_text(name: str, text: str) -> None:
    """A prompt must be encodable as UTF-8: no lone surrogates (JSON's "\\ud800") and, from a command
    line, no bytes that were not UTF-8 (Python keeps them as U+DC80-U+DCFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        cp = ord(text[exc.start])
        what = f"the byte 0x{cp - 0xDC00:02X}, which is not UTF-8," if 0xDC80 <= cp <= 0xDCFF else f"a lone surrogate U+{cp:04X}"
        raise UserError(f"{name} holds {what} at position {exc.start}; send valid UTF-8 text") from None


def check_batch(batch) -> int:
    """``batch`` as an int from 1 to ``MAX_BATCH`` (before anything sized by it exists)."""
    if not is_whole(batch) or not 1 <= batch <= MAX_BATCH:
        raise UserError(f"batch {batch!r}: must be a whole number from 1 to {MAX_BATCH} (images per call)")
    return int(batch)


def check_scalars(prompt, negative_prompt, steps, guidance, seed, batch, height, width, output_type, max_steps: int):
    """Validate the plain arguments; return (steps, guidance, seed, batch, height, width) as Python numbers."""
    if isinstance(prompt, list):  # one prompt per image (a server merging requests into one batch)
        if not all(isinstance(p, str) for p in prompt):
            raise UserError("prompt: a list of prompts must hold strings only")
        if is_whole(batch) and len(prompt) != batch:
            raise UserError(f"prompt: a list of {len(prompt)} prompts for batch {batch}; give one prompt per image")
        for i, p in enumerate(prompt):
            check_text(f"prompt[{i}]", p)
    elif not isinstance(prompt, str):
        raise UserError(f"prompt must be a string (it may be empty), not {type(prompt).__name__}")
    else:
        check_text("prompt", prompt)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise UserError(f"negative_prompt must be a string or None, not {type(negative_prompt).__name__}")
    if negative_prompt is not None:
        check_text("negative_prompt", negative_prompt)
    if not is_whole(steps) or not 1 <= steps <= max_steps:
        raise UserError(f"steps {steps!r}: must be an integer from 1 to {max_steps}")
    if not (isinstance(guidance, numbers.Real) and not isinstance(guidance, (bool, np.bool_))
            and math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise UserError(f"guidance {guidance!r}: must be a finite number from 0 to {MAX_GUIDANCE:g} "
                        "(1.0 = no classifier-free guidance; LCM-LoRA works best at 1-2)")
    if not is_whole(seed) or seed < 0:
        raise UserError(f"seed {seed!r}: must be a whole number >= 0")
    batch = check_batch(batch)
    if (height is None) != (width is None):
        raise UserError("give both height and width, or neither")
    if height is not None and not (is_whole(height) and is_whole(width)):
        raise UserError(f"height {height!r} and width {width!r}: must be whole numbers (int), e.g. height=512, width=512")
    if height is not None and (height < 1 or width < 1):
        raise UserError(f"height {height} and width {width}: image sides must be positive (pixels), e.g. height=512, width=512")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type {output_type!r}: choose 'pil' or 'np'")
    hw = (int(height), int(width)) if height is not None else (None, None)
    return int(steps), float(guidance), int(seed), batch, *hw


def call_bytes(batch: int, steps: int, h: int, w: int, latent_channels: int) -> int:
    """A lower bound on the host memory one call holds: the latents and each step's noise
    ([B, C, H/8, W/8] float32), and the decoded images twice (the decoder's float32 output and the
    post-processing buffer, [B, 3, H, W]). The engines' own activations come on top."""
    latent = batch * latent_channels * (h // 8) * (w // 8) * 4
    return (steps + 1) * latent + 2 * batch * 3 * h * w * 4


def check_call_memory(batch: int, steps: int, h: int, w: int, latent_channels: int, available: int | None = None) -> None:
    """Refuse, before anything is allocated, a call whose arrays alone exceed this machine's memory."""
    available = machine_memory() if available is None else available
    need = call_bytes(batch, steps, h, w, latent_channels)
    if available and need > available:
        raise UserError(f"batch {batch} at {h}x{w} needs at least {need / 2**30:.1f} GiB for its arrays alone, more than "
                        f"this machine's {available / 2**30:.1f} GiB; use a smaller batch")


def _check_array(name: str, a, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray):
        raise UserError(f"{name} must be a numpy array of shape {shape}, not {type(a).__name__}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise UserError(f"{name}: dtype {a.dtype} is not numeric; pass float32")
    if tuple(a.shape) != shape:
        raise UserError(f"{name} shape {tuple(a.shape)}: expected {shape} (batch, latent channels, height/8, width/8)")
    if not np.isfinite(a).all():
        raise UserError(f"{name} holds NaN or inf values; pass finite numbers (e.g. standard normal noise)")


def check_latents(latents, step_noise, steps: int, shape: tuple[int, ...]) -> None:
    """``latents`` (None or an array of ``shape``) and ``step_noise`` (None or a list of at least
    steps-1 such arrays), all finite."""
    if latents is not None:
        _check_array("latents", latents, shape)
    if step_noise is None:
        return
    if not isinstance(step_noise, (list, tuple)):
        raise UserError(f"step_noise must be a list of numpy arrays, not {type(step_noise).__name__}")
    if len(step_noise) < steps - 1:
        raise UserError(f"step_noise: {steps - 1} arrays needed (one per step but the last), got {len(step_noise)}")
    for i, n in enumerate(step_noise[: steps - 1]):
        _check_array(f"step_noise[{i}]", n, shape)
