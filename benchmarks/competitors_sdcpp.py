"""stable-diffusion.cpp's inputs for the side-by-side benchmark (`competitors.py`), from a fused diffusers folder.

stable-diffusion.cpp reads one checkpoint file in the original (CompVis / "ldm") layout: ``model.diffusion_model.*``
(UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP text encoder). This module
renames the fused folder's weights to that layout — the logic of diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``, written for any SD 1.x-style UNet / VAE
config (number of levels, layers per block and which levels have attention come from the configs, so the
tiny demo models map too) — and writes one safetensors file (fp32: the fused weights as they are). For the
benchmark only: lcm-export itself never writes this layout.

- ``unet_key_map(config)``, ``vae_key_map(config)``: {diffusers key: checkpoint key} for every weight;
- ``convert(fused, out)``: the single file (+ ``out.json``: sizes, counts);
- ``gguf(ckpt, out, wtype)`` (run in stable-diffusion-cpp-python's venv): sd.cpp's own converter (what
  ``sd -M convert --type q8_0`` does), so the q8_0 / f16 modes load weights already in their type. q8_0 is
  made from the f16 file, as users make it from the fp16 checkpoints SD 1.5 is shipped in: the tensors q8_0
  cannot hold (3x3 convolutions, norms, biases) then stay f16 — from the fp32 file they stay f32, and the
  q8_0 file came out larger than the f16 one (3.23 GB vs 2.21 GB on SD 1.5).

The inverse direction is diffusers' own single-file reader (``diffusers.loaders.single_file_utils``): the
tests convert a demo model there and back and compare every tensor.

Usage: python benchmarks/competitors_sdcpp.py convert FUSED OUT.safetensors
       python benchmarks/competitors_sdcpp.py gguf CKPT.safetensors OUT.gguf --type q8_0|f16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

# (checkpoint name, diffusers name): whole keys
_UNET_FIXED = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
]
# parts of a resnet's keys
_UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
_VAE_PARTS = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def _has_attn(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_prefixes(config: dict) -> list[tuple[str, str]]:
    """[(checkpoint prefix, diffusers prefix)] of the UNet's blocks, as the ldm ``openaimodel`` numbers them:
    input_blocks 0 = conv_in, then per level ``layers_per_block`` (resnet[, attention]) and a downsampler
    except at the last level; output_blocks per level ``layers_per_block + 1``, the upsampler in the last of
    them (after the attention where the level has one); middle_block = resnet, attention, resnet."""
    down, up = config["down_block_types"], config["up_block_types"]
    lpb = config["layers_per_block"]
    n = len(down)
    out = []
    for i in range(n):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            out.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}."))
            if _has_attn(down[i]):
                out.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            out.append((f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            out.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}."))
            if _has_attn(up[i]):
                out.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            k = i * (lpb + 1) + lpb
            out.append((f"output_blocks.{k}.{2 if _has_attn(up[i]) else 1}.", f"up_blocks.{i}.upsamplers.0."))
    out.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        out.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return out


def unet_key_map(config: dict, keys) -> dict[str, str]:
    """{diffusers UNet key: checkpoint key (with ``model.diffusion_model.``)} for ``keys``."""
    fixed = {hf: sd for sd, hf in _UNET_FIXED}
    prefixes = unet_prefixes(config)
    out = {}
    for key in keys:
        if key in fixed:
            out[key] = UNET_PREFIX + fixed[key]
            continue
        new = key
        for sd_pre, hf_pre in prefixes:
            if new.startswith(hf_pre):
                rest = new[len(hf_pre):]
                if ".resnets." in hf_pre:
                    for sd_part, hf_part in _UNET_RESNET:
                        rest = rest.replace(hf_part, sd_part)
                new = sd_pre + rest
                break
        else:
            raise KeyError(f"UNet weight {key!r} has no place in the original layout")
        out[key] = UNET_PREFIX + new
    return out


def vae_prefixes(config: dict) -> list[tuple[str, str]]:
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    out = []
    for i in range(n):
        for j in range(lpb):
            out.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(lpb + 1):
            out.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            out.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            out.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            out.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
    return out


def vae_key_map(config: dict, keys) -> dict[str, str]:
    """{diffusers VAE key: checkpoint key (with ``first_stage_model.``)}; attention weights are marked for a
    reshape to 1x1 convolutions by ``is_vae_attn_matrix``."""
    prefixes = vae_prefixes(config)
    out = {}
    for key in keys:
        new = key
        for sd_pre, hf_pre in prefixes:
            if new.startswith(hf_pre):
                new = sd_pre + new[len(hf_pre):]
                break
        for sd_part, hf_part in _VAE_PARTS:
            new = new.replace(hf_part, sd_part)
        if "attn_1." in new:
            head, tail = new.split("attn_1.", 1)
            for sd_part, hf_part in _VAE_ATTN:
                if tail.startswith(hf_part):
                    tail = sd_part + tail[len(hf_part):]
                    break
            new = head + "attn_1." + tail
        out[key] = VAE_PREFIX + new
    return out


def is_vae_attn_matrix(ckpt_key: str, ndim: int) -> bool:
    """The VAE mid-block attention's q/k/v/proj_out weights: Linear in diffusers, 1x1 Conv2d in the original."""
    return ".mid.attn_1." in ckpt_key and ckpt_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and ndim == 2


def text_key_map(keys) -> dict[str, str]:
    """CLIPTextModel keys under ``cond_stage_model.transformer.text_model.`` (transformers 5 saves them without
    ``text_model.``; sd.cpp finds SD 1.x by ``...text_model.embeddings.token_embedding.weight``)."""
    return {k: TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k) for k in keys}


def _component(fused: Path, name: str, weights: str):
    from safetensors.numpy import load_file

    d = fused / name
    cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob(f"{weights}*.safetensors"))
    if not files:
        raise SystemExit(f"{d}: no {weights}*.safetensors")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return cfg, sd


def checkpoint_state(fused: Path) -> dict:
    """The fused folder's UNet, VAE and text encoder as one {checkpoint key: array} (fp32 as stored)."""
    unet_cfg, unet = _component(fused, "unet", "diffusion_pytorch_model")
    vae_cfg, vae = _component(fused, "vae", "diffusion_pytorch_model")
    _, text = _component(fused, "text_encoder", "model")
    out = {}
    for sd, m in ((unet, unet_key_map(unet_cfg, unet)), (vae, vae_key_map(vae_cfg, vae)), (text, text_key_map(text))):
        for k, new in m.items():
            if new in out:
                raise KeyError(f"two weights map to {new!r}")
            v = sd[k]
            out[new] = v.reshape(*v.shape, 1, 1) if is_vae_attn_matrix(new, v.ndim) else v
    return out


def convert(fused: Path, out: Path) -> dict:
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    state = checkpoint_state(Path(fused))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "source": str(fused), "made_by": "lcm-export benchmarks"})
    tmp.replace(out)
    rec = {"file": str(out), "bytes": out.stat().st_size, "tensors": len(state),
           "by_part": {p: sum(k.startswith(p) for k in state) for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)},
           "seconds": time.perf_counter() - t0}
    out.with_name(out.name + ".json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def gguf(ckpt: Path, out: Path, wtype: str) -> dict:
    """sd.cpp's converter (stable-diffusion-cpp-python's ``StableDiffusion.convert``), tensor names converted."""
    from stable_diffusion_cpp import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion.__new__(StableDiffusion)  # convert() needs no loaded model
    sd.verbose = False
    tmp = out.with_name(out.name + ".tmp")
    if not StableDiffusion.convert(sd, str(ckpt), output_path=str(tmp), output_type=wtype):
        raise SystemExit(f"sd.cpp convert {ckpt} -> {wtype} failed")
    tmp.replace(out)
    rec = {"file": str(out), "bytes": out.stat().st_size, "wtype": wtype, "seconds": time.perf_counter() - t0}
    out.with_name(out.name + ".json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="fused diffusers folder -> one original-layout safetensors (fp32)")
    c.add_argument("fused")
    c.add_argument("out")
    g = sub.add_parser("gguf", help="checkpoint -> sd.cpp gguf of one weight type (in stable-diffusion-cpp-python's venv)")
    g.add_argument("ckpt")
    g.add_argument("out")
    g.add_argument("--type", required=True, help="q8_0, f16, ...")
    a = ap.parse_args(argv)
    rec = convert(Path(a.fused), Path(a.out)) if a.cmd == "convert" else gguf(Path(a.ckpt), Path(a.out), a.type)
    print(json.dumps(rec))


if __name__ == "__main__":
    sys.exit(main())
