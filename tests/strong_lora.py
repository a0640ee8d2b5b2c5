"""An ill-conditioned model, as a user with strong style LoRAs has one: an SD 1.5-architecture base
(UNet blocks (32, 64), cross-attention 48, 4 heads, GroupNorm 16, conv proj_in) and two LoRAs
(a kohya LoCon at λ 1.0 over every attention, feed-forward and ResNet layer, a PEFT LoRA at λ 0.8 over
the attention projections) with random factors scaled so that each layer's fused delta λ·(alpha/r)·B·A
is as large as the layer's base weight times ``ratio``. PyTorch fp32 is then ~1e-4 from the exact
(float64) answer, far above the 1e-7 of the plain demo model."""

from __future__ import annotations

import json
from pathlib import Path

ARCH = {"unet": dict(block_out_channels=(32, 64), cross_attention_dim=48, attention_head_dim=4, norm_num_groups=16),
        "text_encoder": dict(hidden_size=48, projection_dim=48)}
RANK = 4
LOCON_ALPHA, LOCON_WEIGHT = 2.0, 1.0
PEFT_ALPHA, PEFT_WEIGHT = 4, 0.8
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def strong_pipeline():
    from lcm_export.sources.demo import build_demo_pipeline

    return build_demo_pipeline("sd15", overrides=ARCH)


def _targets(unet):
    import torch

    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name not in ("conv_in", "conv_out") \
                and not name.startswith(("time_embedding", "conv_norm")):
            yield name, mod


def _factors(gen, mod, scale: float, ratio: float):
    """(down, up) with ||scale · up @ down|| = ratio · ||W|| (conv: down [r, in, kh, kw], up [out, r, 1, 1])."""
    import torch

    w = mod.weight.detach()
    down = torch.randn(RANK, *w.shape[1:], generator=gen)
    up = torch.randn(w.shape[0], RANK, *([1, 1] if w.dim() == 4 else []), generator=gen)
    delta = up.flatten(1) @ down.flatten(1)
    up *= ratio * float(w.norm()) / (scale * float(delta.norm()))
    return down.contiguous(), up.contiguous()


def write_strong_loras(pipe, out_dir: Path, ratio: float = 4.0) -> list[tuple[Path, float]]:
    """Write the two LoRA files for ``pipe``'s UNet; return [(path, λ)]."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(77)
    locon, peft = {}, {}
    for name, mod in _targets(pipe.unet):
        key = "lora_unet_" + name.replace(".", "_")
        down, up = _factors(gen, mod, LOCON_WEIGHT * LOCON_ALPHA / RANK, ratio)
        locon.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(LOCON_ALPHA)})
        if name.endswith(ATTENTION):
            a, b = _factors(gen, mod, PEFT_WEIGHT * PEFT_ALPHA / RANK, ratio)
            peft.update({f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b})
    paths = [(out_dir / "strong-locon-kohya.safetensors", LOCON_WEIGHT), (out_dir / "strong-style-peft.safetensors", PEFT_WEIGHT)]
    save_file(locon, str(paths[0][0]), metadata={"ss_network_module": "lycoris.kohya"})
    meta = {"unet.r": RANK, "unet.lora_alpha": PEFT_ALPHA, "unet.target_modules": list(ATTENTION)}
    save_file(peft, str(paths[1][0]), metadata={"lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    return paths
