"""Tiny VAE decoders (``build-engine --vae-decoder SRC``): a diffusers ``AutoencoderTiny`` (the TAESD family)
in place of the base's VAE decoder.

SRC is a hub id (``madebyollin/taesd`` for SD 1.5, ``madebyollin/taesdxl`` for SDXL / SSD-1B), a local
diffusers folder (``config.json`` of class AutoencoderTiny + ``diffusion_pytorch_model.safetensors``),
or ``demo:taesd`` / ``demo:taesdxl`` (seeded random weights, for tests).

Latent scaling, as diffusers' pipelines feed an AutoencoderTiny: ``StableDiffusionPipeline`` decodes
``latents / vae.config.scaling_factor`` and ``StableDiffusionXLPipeline`` the same (it applies
``latents_mean/std`` only where the config has them; AutoencoderTiny's has not), neither applies
``shift_factor``. TAESD's ``scaling_factor`` is 1.0: it decodes the UNet's latents as they are (its
decoder clamps them with ``tanh(x / 3) * 3`` and maps its [0, 1] output to [-1, 1] itself). The entry
records the tiny decoder's scaling (``vae`` in the manifest), so the runtime's decoder input is exactly
diffusers'.

Family: TAESD and TAESDXL have the same architecture and config, only their weights differ, so the
family is known from the demo name or the hub id / folder name (``taesdxl`` -> SDXL latents, ``taesd``
-> SD 1.5; ``taesd3`` / ``taef1`` decode SD3 / FLUX latents, 16 channels). A mismatch with the base is
refused; a name that says nothing is accepted with a note (the latent channels are still checked).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .demo import TINY_VAE_DEMOS
from ..errors import UserError
from .lora import PICKLE_SUFFIXES

FLAG = "--vae-decoder"
TINY_CLASS = "AutoencoderTiny"
FAMILY_DECODER = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl", "ssd1b": "madebyollin/taesdxl"}
"""The tiny decoder ``--preset fast`` takes for a real base of each family (SSD-1B uses SDXL's latent space)."""
DEMO_DECODER = {"sd15": "demo:taesd", "sdxl": "demo:taesdxl", "ssd1b": "demo:taesdxl"}
"""... and for a demo base."""
LATENT_FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "ssd1b": "sdxl"}
"""The latent space each base family's UNet works in (what a tiny decoder must be trained for)."""
_NAMES = (("taesdxl", "sdxl"), ("taesd3", "sd3"), ("taef1", "flux"), ("taeflux", "flux"), ("taesd", "sd15"))
_LABEL = {"sd15": "SD 1.5", "sdxl": "SDXL / SSD-1B", "sd3": "SD3", "flux": "FLUX"}
WEIGHTS = "diffusion_pytorch_model"
"""diffusers' weights file name (``.safetensors``, or shards of it): what ``from_pretrained`` loads and we hash."""


@dataclass(frozen=True)
class DecoderSource:
    """A resolved ``--vae-decoder``: ``kind`` is demo, local or hub; ``path`` the folder (not for demos)."""

    spec: str
    kind: str
    path: Path | None = None
    demo: str | None = None
    family: str | None = None
    """The latent family it decodes (sd15, sdxl, sd3, flux), None where its name does not say."""
    family_from: str = ""


def family_from_name(name: str) -> str | None:
    """The latent family a TAESD-style name says (``madebyollin/taesdxl`` -> sdxl), or None."""
    last = re.split(r"[/\\]", name.strip().rstrip("/\\"))[-1].lower()
    for key, fam in _NAMES:
        if key in last:
            return fam
    return None


def resolve_vae_decoder(spec: str, family: str, demo_base: bool = False) -> DecoderSource:
    """Check ``--vae-decoder SRC`` against the base's ``family`` before anything heavy is loaded; a hub id is
    fetched (config + safetensors: ~10 MB). One-line UserError for anything wrong; ``demo_base``: the base is a
    built-in demo (a wrong decoder's message then names the demo decoder, not a hub download)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{FLAG} {spec!r}: give a hub id (e.g. madebyollin/taesd), a local AutoencoderTiny folder or demo:taesd")
    want = LATENT_FAMILY.get(family, family)
    if spec.startswith("demo:"):
        name = spec.split(":", 1)[1]
        if name not in TINY_VAE_DEMOS:
            raise UserError(f"{FLAG} {spec!r}: unknown demo decoder; choose " + " or ".join(f"demo:{n}" for n in TINY_VAE_DEMOS))
        src = DecoderSource(spec, "demo", demo=name, family=TINY_VAE_DEMOS[name], family_from="demo name")
        _check_family(src, family, want, demo_base)
        return src
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file():
            hint = " (loading pickle files can run code)" if p.suffix.lower() in PICKLE_SUFFIXES else ""
            raise UserError(f"{FLAG} {spec}: is a file{hint}; give a diffusers AutoencoderTiny folder (config.json + "
                            "diffusion_pytorch_model.safetensors) or a hub id such as madebyollin/taesd")
        fam = family_from_name(str(p.resolve()))
        src = DecoderSource(spec, "local", path=p.resolve(), family=fam, family_from="folder name" if fam else "")
        _check_family(src, family, want, demo_base)
        _check_folder(src)
        return src
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"{FLAG} {spec!r}: no such folder, and not a hub id (owner/name) or demo:taesd / demo:taesdxl")
    fam = family_from_name(spec)
    src = DecoderSource(spec, "hub", family=fam, family_from="hub id" if fam else "")
    _check_family(src, family, want, demo_base)  # before any download
    src = DecoderSource(spec, "hub", path=_download(spec), family=fam, family_from=src.family_from)
    _check_folder(src)
    return src


def _check_family(src: DecoderSource, family: str, want: str, demo_base: bool = False) -> None:
    if src.family is not None and src.family != want:
        right = DEMO_DECODER.get(family) if src.kind == "demo" or demo_base else FAMILY_DECODER.get(family)
        raise UserError(f"{FLAG} {src.spec} decodes {_LABEL.get(src.family, src.family)} latents but the base is "
                        f"{_LABEL.get(want, family)} ({family}); use {right}")


def _download(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["config.json", f"{WEIGHTS}*.safetensors"],
                                   local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"))
    except Exception as exc:  # network, auth, offline cache miss — one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{FLAG} {spec}: could not get it from the Hugging Face Hub or the local cache ({first[:200]}); "
                        "check the id and your network, or pass a local AutoencoderTiny folder") from None
    return Path(folder)


def _config(src: DecoderSource) -> dict:
    cfg = src.path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{FLAG} {src.spec}: no config.json in {src.path}; give a diffusers AutoencoderTiny folder "
                        "(config.json + diffusion_pytorch_model.safetensors)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{FLAG} {src.spec}: cannot read {cfg} ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{FLAG} {src.spec}: {cfg} is not a JSON object")
    return data


def _check_folder(src: DecoderSource) -> None:
    data = _config(src)
    cls = data.get("_class_name")
    if cls != TINY_CLASS:
        raise UserError(f"{FLAG} {src.spec}: its config is a {cls or 'model of unknown class'}, not an {TINY_CLASS} "
                        "(the TAESD family, e.g. madebyollin/taesd); the base's own VAE is used without this flag")
    if not _weights(src.path):
        raise UserError(f"{FLAG} {src.spec}: no {WEIGHTS}.safetensors in {src.path} (pickle .bin weights are refused: "
                        "loading them can run code)")


def _weights(folder: Path) -> list[Path]:
    try:
        return sorted(f for f in folder.iterdir() if f.name.startswith(WEIGHTS) and f.suffix == ".safetensors")
    except OSError as exc:
        raise UserError(f"{FLAG} {folder}: cannot be read ({exc.strerror or exc})") from None


def check_latent_channels(src: DecoderSource, channels: int) -> None:
    """The decoder must take the UNet's latent channels (SD 1.5 / SDXL: 4; SD3 / FLUX decoders: 16)."""
    raw = 4 if src.kind == "demo" else _config(src).get("latent_channels", 4)
    if not (isinstance(raw, int) and not isinstance(raw, bool)):
        raise UserError(f"{FLAG} {src.spec}: its config's latent_channels is {raw!r}, not a whole number (a damaged config?)")
    got = raw
    if got != channels:
        raise UserError(f"{FLAG} {src.spec}: it decodes {got}-channel latents but the base's UNet makes {channels}; "
                        "use the TAESD decoder of the base's family")


def load_vae_decoder(src: DecoderSource):
    """The AutoencoderTiny module (fp32, eval)."""
    if src.kind == "demo":
        from .demo import build_demo_tiny_vae

        return build_demo_tiny_vae(src.demo)
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(str(src.path), use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{FLAG} {src.spec}: cannot load it as an {TINY_CLASS} ({first})") from None
    return vae.eval()


def decoder_identity(src: DecoderSource) -> dict:
    """What identifies the decoder's weights (the weights key), computed without loading it."""
    from .._util import sha256_file, tool_versions

    if src.kind == "demo":
        v = tool_versions()
        return {"demo": src.demo, "lcm_export": v["lcm_export"], "torch": v.get("torch")}
    return {"files": {f.name: sha256_file(f) for f in _weights(src.path)}}


def decoder_architecture(src: DecoderSource) -> dict:
    """What fixes the decoder's graph (the graph key): its config."""
    if src.kind == "demo":
        return {"demo": src.demo, "class": TINY_CLASS}
    cfg = {k: v for k, v in _config(src).items() if not k.startswith("_")}
    return {"class": TINY_CLASS, "config": cfg}


def decoder_record(src: DecoderSource, module=None) -> dict:
    """The manifest's ``vae_decoder`` section: which decoder, its source, family and sha256."""
    from .models import state_dict_sha256

    rec = {"kind": "tiny", "class": TINY_CLASS, "source": src.spec, "source_kind": src.kind,
           "family": src.family, "family_from": src.family_from or "unknown: the name does not say"}
    if src.kind == "demo":
        rec["note"] = "built-in demo: seeded random weights (images are noise)"
        if module is not None:
            rec["state_dict_sha256"] = state_dict_sha256(module)
    else:
        rec["path"] = str(src.path)
        rec["sha256"] = decoder_identity(src)["files"]
    return rec


def family_note(src: DecoderSource, family: str) -> str | None:
    """A line for the build's output where the decoder's family could not be checked."""
    if src.family is None:
        return (f"note: {FLAG} {src.spec}: its name does not say which latents it decodes (taesd: SD 1.5, taesdxl: "
                f"SDXL); it is used for this {family} base unchecked — compare its images with the base's VAE")
    return None
