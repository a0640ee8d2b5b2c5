"""``build-engine --preset quality|fast``: what each preset builds on this machine. Pure.

- ``quality`` (the default): today's default entry — the UNet and the base's own VAE decoder at the
  precision ``--precision auto`` picks (bf16 on CPUs with native bf16, else fp32; fp16 on TensorRT).
- ``fast``: speed for quality. An int8 UNet (``--precision int8``) on the CPU classes where int8 was measured
  no slower than fp32 / bf16 (``_cpu.INT8_MEASURED``: AMX, AVX512_VNNI / AVX_VNNI, AVX2) and a usable backend
  builds int8; elsewhere (AVX-512 without VNNI, not measured; no AVX2) the
  ``auto`` precision, said in one line. And a tiny VAE decoder (TAESD) in place of the base's VAE:
  ``--vae-decoder`` when given, else the family's TAESD on the Hugging Face Hub for a real base
  (``madebyollin/taesd`` / ``madebyollin/taesdxl``; downloaded once, ~10 MB) or ``demo:taesd`` /
  ``demo:taesdxl`` for a demo base (random weights for random weights: no download, tests run offline).

Explicit ``--precision`` / ``--vae-decoder`` flags win over the preset's choices (with a note).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..sources.tiny_vae import DEMO_DECODER, FAMILY_DECODER

PRESETS = ("quality", "fast")
TRADES = {
    "quality": "highest quality this CPU runs fast: the UNet at the auto precision (bf16 with native bf16, else fp32) "
               "and the base's own VAE decoder",
    "fast": "speed for quality: an int8 UNet (post-training quantization; image checked against PyTorch fp32 by PSNR "
            "and SSIM) and a tiny VAE decoder (TAESD: about 1/18 of the SD 1.5 decoder's FLOPs; it approximates the "
            "full decoder, how closely is recorded as fidelity.vs_full_vae)",
}
"""What each preset trades (``inspect`` and the README say this; measured figures are in the benchmark reports)."""


@dataclass(frozen=True)
class PresetChoice:
    preset: str
    precision: str
    vae_decoder: str | None
    notes: tuple[str, ...] = ()


def resolve_preset(preset: str, precision: str, vae_decoder: str | None, family: str, demo: bool, device: str,
                   cpu_int8: bool, int8_builder: bool, cpu_bf16: bool, adapters: bool = False) -> PresetChoice:
    """(precision, vae_decoder) for ``preset`` given the flags and the machine.

    ``device``: where the chosen backend runs (``cpu`` / ``cuda``); ``cpu_int8``: int8 was measured no slower
    than fp32 / bf16 on this CPU's class (``_cpu.int8_pays``); ``int8_builder``: a usable CPU backend builds int8; ``cpu_bf16``: native bf16 (for the notes);
    ``adapters``: ``--adapters`` was given (int8 UNets take no run-time adapters)."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose {' or '.join(PRESETS)}")
    if preset == "quality":
        return PresetChoice(preset, precision, vae_decoder)
    notes = []
    if precision != "auto":
        if precision != "int8":
            notes.append(f"--preset fast: --precision {precision} given, so the UNet is {precision}, not int8")
    elif device != "cpu":
        notes.append(f"--preset fast: int8 is a CPU option; on {device} the UNet is built at the auto precision")
    elif not cpu_int8:
        notes.append("--preset fast: int8 has not been measured faster than fp32 on this CPU class (AVX-512 without VNNI, "
                     f"or no AVX2), so the UNet is {'bf16' if cpu_bf16 else 'fp32'} instead of int8 (the tiny VAE decoder is "
                     "still used)")
    elif not int8_builder:
        notes.append("--preset fast: no usable backend here builds int8 (OpenVINO does: is it installed, or was another "
                     "--backend given?), so the UNet is built at the auto precision (the tiny VAE decoder is still used)")
    elif adapters:
        notes.append("--preset fast with --adapters: an int8 UNet takes no run-time adapters, so the UNet is built at the "
                     "auto precision (the tiny VAE decoder is still used)")
    else:
        precision = "int8"
    if vae_decoder is None:
        vae_decoder = (DEMO_DECODER if demo else FAMILY_DECODER)[family]
    return PresetChoice(preset, precision, vae_decoder, tuple(notes))
