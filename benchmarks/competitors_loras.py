"""Seeded random style LoRAs for the side-by-side benchmark (`competitors.py`), for any SD-family UNet.

Three kohya files (diffusers block names: ``lora_unet_down_blocks_0_attentions_0_..._to_q``; diffusers,
OpenVINO GenAI and ``lcm-export adapter add`` all read them), alpha = rank in each file so that the scale
is the λ each caller gives for every reader (the issue's case: λ 0.8): diffusers and lcm-export apply
λ·alpha/rank, OpenVINO GenAI 2026.4 ignores the file's alpha and applies its AdapterConfig alpha alone:

- ``style_a.safetensors``, ``style_b.safetensors``: rank 8 over the UNet's attention Linear layers (every
  ``nn.Linear`` inside ``*.attentions.*``: attn1/attn2 q, k, v, out and the feed-forward; 160 in SD 1.5),
  seeds 1 and 2;
- ``style_c_r64.safetensors``: rank 64 over those Linear layers and every 1x1 convolution of the UNet
  (proj_in/proj_out, resnet shortcuts), seed 3. The shortcuts' keys say ``skip_connection`` (``kohya_key``).

Factors: down ~ N(0, 1/in), up ~ N(0, 0.25/(rank·in)), so each ΔW = up·down has entries of std 0.5/in,
1.4-2.8 % of a 1/sqrt(in)-scaled weight at SD 1.5's widths (320-1280): the image changes, nothing overflows in bf16.
Writes ``loras.json`` beside them (layers, ranks, seeds, sha256). Needs torch, diffusers, safetensors.

Usage: python benchmarks/competitors_loras.py --model FUSED_DIFFUSERS_FOLDER --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

SPECS = (  # (file stem, rank, seed, targets)
    ("style_a", 8, 1, "attention_linear"),
    ("style_b", 8, 2, "attention_linear"),
    ("style_c_r64", 64, 3, "attention_linear+conv1x1"),
)


def target_layers(unet, targets: str) -> list[tuple[str, object]]:
    """[(module name, module)] of ``unet`` a LoRA of kind ``targets`` covers, in module order."""
    import torch

    out = []
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attentions." in f".{name}":
            out.append((name, mod))
        elif "conv1x1" in targets and isinstance(mod, torch.nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) \
                and mod.groups == 1:
            out.append((name, mod))
    return out


def kohya_key(module: str) -> str:
    """kohya key of a diffusers UNet module. Resnet shortcuts are spelled ``skip_connection`` as in kohya's
    original-SD names: OpenVINO GenAI 2026.4 maps only that spelling to ``conv_shortcut`` (it drops
    ``..._conv_shortcut`` keys with an "unused LoRA tensors" warning); diffusers maps both."""
    return "lora_unet_" + module.replace("conv_shortcut", "skip_connection").replace(".", "_")


def make_lora(unet, rank: int, seed: int, targets: str) -> tuple[dict, int]:
    """(kohya state dict, layer count) for ``unet``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    layers = target_layers(unet, targets)
    for name, mod in layers:
        key = kohya_key(name)
        conv = isinstance(mod, torch.nn.Conv2d)
        n_in = mod.in_channels if conv else mod.in_features
        n_out = mod.out_channels if conv else mod.out_features
        down = torch.randn(rank, n_in, generator=gen) / n_in ** 0.5
        up = torch.randn(n_out, rank, generator=gen) * (0.5 / (rank * n_in) ** 0.5)
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd, len(layers)


def load_unet_skeleton(model: Path):
    """The UNet of a diffusers folder with its config and no real weights (shapes are all we need)."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config(str(Path(model) / "unet"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


def write_loras(model: Path, out: Path) -> dict:
    """Write the three files for ``model`` into ``out`` (kept when already there with the same
    record); return the record also written to ``out/loras.json``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    unet = load_unet_skeleton(model)
    record = {"model": str(Path(model).resolve()), "format": "kohya (diffusers block names), alpha = rank", "files": {}}
    for stem, rank, seed, targets in SPECS:
        path = out / f"{stem}.safetensors"
        sd, n = make_lora(unet, rank, seed, targets)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(sd, str(tmp), metadata={"ss_network_module": "networks.lora"})
        os.replace(tmp, path)
        record["files"][stem] = {"path": str(path.resolve()), "rank": rank, "seed": seed, "targets": targets, "layers": n,
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (out / "loras.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers folder (the fused model) whose UNet the LoRAs are for")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rec = write_loras(Path(a.model), Path(a.out))
    for stem, f in rec["files"].items():
        print(f"{f['path']}: rank {f['rank']}, {f['layers']} layers ({f['targets']}), {f['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
