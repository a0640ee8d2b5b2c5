"""FLOPs of the SD 1.5 / SDXL VAE decoder and of the tiny decoder (diffusers AutoencoderTiny, TAESD's layout) at
a given image size, counted by torch's FlopCounterMode on meta tensors (no weights, no compute):

    python benchmarks/decoder_flops.py [--size 512]

Counts matrix products and convolutions (2 FLOPs per multiply-add), as torch's counter does.
"""

from __future__ import annotations

import argparse


def decoder_flops(size: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny
    from torch.utils.flop_counter import FlopCounterMode

    from lcm_export.sources.demo import demo_configs

    with torch.device("meta"):
        full = AutoencoderKL(**demo_configs("sd15-full", 49408)["vae"])
        tiny = AutoencoderTiny()
    z = torch.empty(1, 4, size // 8, size // 8, device="meta")
    out = {}
    for name, module in (("vae_decoder (SD 1.5 / SDXL configs)", full), ("tiny decoder (AutoencoderTiny, TAESD layout)", tiny)):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            module.decode(z)
        out[name] = fc.get_total_flops() / 1e9
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    for name, gflop in decoder_flops(a.size).items():
        print(f"{name} at {a.size}x{a.size}: {gflop:.0f} GFLOP")
