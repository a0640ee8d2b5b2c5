"""Checks of ``LCMPipeline.__call__``'s arguments, in one place: each bad value becomes one
``UserError`` naming the argument and what it must be, before any engine runs.

numpy only (the runtime stays lean).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import UserError

OUTPUT_TYPES = ("pil", "np")


def is_whole(v) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_scalars(prompt, negative_prompt, steps, guidance, seed, batch, height, width, output_type, max_steps: int):
    """Validate the plain arguments; return (steps, guidance, seed, batch, height, width) as Python numbers."""
    if isinstance(prompt, list):  # one prompt per image (a server merging requests into one batch)
        if not all(isinstance(p, str) for p in prompt):
            raise UserError("prompt: a list of prompts must hold strings only")
        if is_whole(batch) and len(prompt) != batch:
            raise UserError(f"prompt: a list of {len(prompt)} prompts for batch {batch}; give one prompt per image")
    elif not isinstance(prompt, str):
        raise UserError(f"prompt must be a string (it may be empty), not {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise UserError(f"negative_prompt must be a string or None, not {type(negative_prompt).__name__}")
    if not is_whole(steps) or not 1 <= steps <= max_steps:
        raise UserError(f"steps {steps!r}: must be an integer from 1 to {max_steps}")
    if not (isinstance(guidance, numbers.Real) and not isinstance(guidance, (bool, np.bool_))
            and math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"guidance {guidance!r}: must be a finite number >= 0 (1.0 = no classifier-free guidance)")
    if not is_whole(seed) or seed < 0:
        raise UserError(f"seed {seed!r}: must be a whole number >= 0")
    if not is_whole(batch) or batch < 1:
        raise UserError(f"batch {batch!r}: must be at least 1 (a whole number)")
    if (height is None) != (width is None):
        raise UserError("give both height and width, or neither")
    if height is not None and not (is_whole(height) and is_whole(width)):
        raise UserError(f"height {height!r} and width {width!r}: must be whole numbers (int), e.g. height=512, width=512")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type {output_type!r}: choose 'pil' or 'np'")
    hw = (int(height), int(width)) if height is not None else (None, None)
    return int(steps), float(guidance), int(seed), int(batch), *hw


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
