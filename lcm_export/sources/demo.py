"""Built-in demo models: SD 1.5, SDXL and SSD-1B architecture pipelines with seeded random weights, fully offline.

Images from these models are noise: the weights are random. They exist so that every stage (fuse,
export, build, runtime, bench) can run and be tested without downloading anything.

- ``demo:sd15``       tiny (a few MB): the whole demo flow runs in seconds on 2 CPU cores.
- ``demo:sd15-full``  the real SD 1.5 UNet / VAE / CLIP-L text-encoder configs (860M-parameter UNet),
                      random weights: for speed measurements only.
- ``demo:sdxl``       tiny SDXL architecture: two text encoders (CLIPTextModel +
                      CLIPTextModelWithProjection), a UNet with ``addition_embed_type="text_time"``.
- ``demo:ssd1b``      tiny SSD-1B-style SDXL: the same, with an asymmetric (reduced) transformer
                      layout described by ``reverse_transformer_layers_per_block``.
- ``demo:sdxl-full``  the real SDXL-base UNet / VAE / text-encoder configs, random weights (speed only).

Tiny VAE decoders (``build-engine --vae-decoder``), diffusers ``AutoencoderTiny`` with seeded random weights:

- ``demo:taesd``      for SD 1.5 latents (stands in for ``madebyollin/taesd``)
- ``demo:taesdxl``    for SDXL / SSD-1B latents (stands in for ``madebyollin/taesdxl``)

Both use TAESD's real layout (64 channels, 3+3+3+1 decoder blocks, x8 upsampling) except where a
``-full`` base is not in play: they are small (about 1.2 M parameters each, as the real ones), so the
same configs serve tests and speed measurements.

Also the two demo LoRAs ``make demo`` fuses: an LCM-LoRA-shaped kohya LoCon file (linear + conv
layers, alpha != rank) and a small diffusers/PEFT style LoRA (UNet attention + text encoder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_NAMES = ("sd15", "sd15-full", "sdxl", "ssd1b", "sdxl-full")
TINY_VAE_DEMOS = {"taesd": "sd15", "taesdxl": "sdxl"}
"""Demo tiny VAE decoders and the latent family each decodes."""
DEMO_NOTICE = "demo model with random weights: its images are noise, not pictures"
# The demo prompt's words get BPE merges so the tokenizer exercises merging, not just bytes.
_MERGE_WORDS = ("a", "photo", "of", "an", "astronaut", "riding", "horse", "cat", "dog", "the", "in", "style")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (written from the published scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def demo_vocab() -> tuple[dict[str, int], list[str]]:
    """A small byte-level CLIP vocabulary: 256 bytes, 256 bytes + ``</w>``, a few merges, 2 specials."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    known = set(vocab_list)
    for word in _MERGE_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: deterministic, valid BPE merges
            a, b = symbols[0], symbols[1]
            merged = a + b
            if merged not in known:
                merges.append(f"{a} {b}")
                vocab_list.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def demo_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` over the demo vocabulary (no download)."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = demo_vocab()
    with tempfile.TemporaryDirectory() as d:  # the vocab.json + merges.txt layout every version reads
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77, pad_token=pad_token)


def demo_configs(name: str, vocab_size: int) -> dict:
    if name == "sd15":
        unet = dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
        )
    elif name == "sd15-full":  # runwayml/stable-diffusion-v1-5 configs
        unet = dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        )
    elif name in ("sdxl", "ssd1b"):
        unet = dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        )
        if name == "ssd1b":  # asymmetric: fewer transformer layers on the way up, as SSD-1B prunes them
            unet.update(transformer_layers_per_block=((1, 1), (2, 1)), reverse_transformer_layers_per_block=((1, 1, 1), (1, 1, 1)))
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
        )
        text2 = dict(text, hidden_act="gelu", num_hidden_layers=3)
        return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2}
    elif name == "sdxl-full":  # stabilityai/stable-diffusion-xl-base-1.0 configs
        unet = dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        )
        text2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
        return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2}
    else:
        raise KeyError(name)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def tiny_vae_config() -> dict:
    """The AutoencoderTiny config of madebyollin/taesd and /taesdxl (both the same architecture; their weights
    differ): 64 channels per block, encoder 1+3+3+3 and decoder 3+3+3+1 blocks, latents / 1.0."""
    return dict(in_channels=3, out_channels=3, encoder_block_out_channels=(64, 64, 64, 64),
                decoder_block_out_channels=(64, 64, 64, 64), act_fn="relu", latent_channels=4, upsampling_scaling_factor=2,
                num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), latent_magnitude=3, latent_shift=0.5,
                scaling_factor=1.0)


def build_demo_tiny_vae(name: str):
    """``demo:taesd`` / ``demo:taesdxl``: a diffusers AutoencoderTiny with seeded random weights (its images are noise)."""
    import torch
    from diffusers import AutoencoderTiny

    if name not in TINY_VAE_DEMOS:
        raise KeyError(name)
    with torch.random.fork_rng():
        torch.manual_seed(10 + list(TINY_VAE_DEMOS).index(name))
        vae = AutoencoderTiny(**tiny_vae_config()).eval()
        # PyTorch's default init fades to a constant through the decoder's 35 convolutions (images all
        # black): LeCun-normal weights instead, then the last convolution scaled so that N(0, 1) latents
        # decode to images centred in [-1, 1] (per channel mean 0, std 0.4) — noise, but with contrast
        convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        for m in convs:
            torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        with torch.no_grad():
            probe = torch.randn(4, int(vae.config.latent_channels), 32, 32)
            raw = vae.decoder.layers(torch.tanh(probe / 3) * 3)
            mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3)).clamp_min(1e-6)
            k = 0.2 / std
            convs[-1].weight.mul_(k.view(-1, 1, 1, 1))
            convs[-1].bias.copy_(0.5 - mean * k)
    return vae


# diffusers' LCMScheduler config as shipped with the LCM-LoRA-accelerated SD 1.5 pipelines.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    original_inference_steps=50, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
    prediction_type="epsilon", timestep_spacing="leading", timestep_scaling=10.0,
)


def build_demo_pipeline(name: str, overrides: dict | None = None):
    """Build ``demo:<name>`` as a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
    (deterministic: fixed seeds per component). ``overrides`` ({"unet": {...}, "text_encoder": {...},
    "vae": {...}}) changes config fields, for tests of other architectures of the same family."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = demo_tokenizer()
    cfg = demo_configs(name, vocab_size=len(tokenizer))
    for part, fields in (overrides or {}).items():
        cfg[part] = {**cfg[part], **fields}
    text_cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **cfg["text_encoder"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(1)
        vae = AutoencoderKL(**cfg["vae"])
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(text_cfg)
        if "text_encoder_2" in cfg:
            from transformers import CLIPTextModelWithProjection

            tokenizer_2 = demo_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
            torch.manual_seed(3)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id, **cfg["text_encoder_2"]))
    for m in (unet, vae, text_encoder):
        m.eval()
    if "text_encoder_2" in cfg:
        from diffusers import StableDiffusionXLPipeline

        text_encoder_2.eval()
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=LCMScheduler(**SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=LCMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------------------------
# Demo LoRAs (what `make demo` / `build-engine` without --base fuses)

def demo_lora_dir() -> Path:
    root = os.environ.get("LCM_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lcm-export"
    )
    return Path(root) / "demo-loras"


def _lcm_like_targets(unet) -> list[str]:
    """LCM-LoRA (SD 1.5) touches attention, feed-forward, proj_in/out and every resnet/sampler conv."""
    import torch

    names = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if name in ("conv_in", "conv_out") or name.startswith(("time_embedding", "conv_norm")):
            continue
        names.append(name)
    return names


def write_demo_loras(pipe, out_dir: Path | None = None, name: str = "sd15") -> list[tuple[Path, float]]:
    """Write the demo LCM-LoRA (kohya LoCon) and style LoRA (PEFT); return [(path, λ)] with defaults.

    Files are byte-for-byte deterministic, so their sha256 (and so engine cache keys) are stable
    across runs and machines. Each carries one metadata key: safetensors writes its metadata map
    in an order that varies from process to process.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir or demo_lora_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    (lcm_path, lcm_weight), (style_path, style_weight) = demo_lora_paths(out_dir, name)
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape, std=0.05):
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    if not lcm_path.exists():
        sd, rank = {}, 4
        modules = dict(pipe.unet.named_modules())
        for mname in _lcm_like_targets(pipe.unet):
            mod = modules[mname]
            key = "lora_unet_" + mname.replace(".", "_")
            if isinstance(mod, torch.nn.Conv2d):
                kh, kw = mod.kernel_size
                sd[f"{key}.lora_down.weight"] = rnd(rank, mod.in_channels, kh, kw)
                sd[f"{key}.lora_up.weight"] = rnd(mod.out_channels, rank, 1, 1)
            else:
                sd[f"{key}.lora_down.weight"] = rnd(rank, mod.in_features)
                sd[f"{key}.lora_up.weight"] = rnd(mod.out_features, rank)
            sd[f"{key}.alpha"] = torch.tensor(2.0)
        _save_atomic(save_file, sd, lcm_path, {"ss_network_module": "lycoris.kohya"})
    if not style_path.exists():
        sd, rank = {}, 2
        for mname, mod in pipe.unet.named_modules():
            if mname.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_out.0")):
                sd[f"unet.{mname}.lora_A.weight"] = rnd(rank, mod.in_features)
                sd[f"unet.{mname}.lora_B.weight"] = rnd(mod.out_features, rank)
        meta = {"unet.r": rank, "unet.lora_alpha": 4, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
        for comp in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, comp, None) is None:
                continue
            for mname, mod in getattr(pipe, comp).named_modules():
                if mname.endswith(("self_attn.q_proj", "self_attn.v_proj")):
                    sd[f"{comp}.{mname}.lora_A.weight"] = rnd(rank, mod.in_features)
                    sd[f"{comp}.{mname}.lora_B.weight"] = rnd(mod.out_features, rank)
            meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": 4, f"{comp}.target_modules": ["q_proj", "v_proj"]})
        _save_atomic(save_file, sd, style_path, {"lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    return [(lcm_path, lcm_weight), (style_path, style_weight)]


def demo_lora_paths(out_dir: Path, name: str) -> list[tuple[Path, float]]:
    """Where the demo LoRAs of ``demo:<name>`` live, with the paper's default λ (LCM 1.0, style 0.8)."""
    from .lora import DEFAULT_LCM_WEIGHT, DEFAULT_STYLE_WEIGHT

    return [(Path(out_dir) / f"demo-{name}-lcm-lora-kohya.safetensors", DEFAULT_LCM_WEIGHT),
            (Path(out_dir) / f"demo-{name}-style-lora-peft.safetensors", DEFAULT_STYLE_WEIGHT)]


def _save_atomic(save_file, sd, path: Path, metadata: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)
