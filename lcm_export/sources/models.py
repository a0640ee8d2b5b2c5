"""Where base weights come from (hub id, local diffusers folder, built-in demo) and model families.

Families differ in text encoders, conditioning and default resolution: ``sd15`` (one CLIP text
encoder, 512²), ``sdxl`` and ``ssd1b`` (two text encoders, pooled + time-id conditioning, 1024²).
SD 2.x is detected and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .demo import DEMO_NAMES
from ..errors import UserError

SUPPORTED_FAMILIES = ("sd15", "sdxl", "ssd1b")
XL_FAMILIES = ("sdxl", "ssd1b")
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"), "ssd1b": ("text_encoder", "text_encoder_2")}
DEFAULT_RESOLUTION = {"sd15": (512, 512), "sdxl": (1024, 1024), "ssd1b": (1024, 1024)}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class BaseSource:
    """A resolved ``--base``: ``kind`` is ``demo``, ``local`` or ``hub``; ``path`` the local folder."""

    spec: str
    kind: str
    path: Path | None = None
    demo: str | None = None
    flag: str = "--base"
    """The flag it came from, for messages (``--base``, or ``--model`` for ``export``)."""


def detect_family(unet_config: dict) -> str:
    """Model family from a UNet config: sd15, sd2 (unsupported), sdxl or ssd1b."""
    if unet_config.get("addition_embed_type") == "text_time":
        # SSD-1B (and Segmind Vega) are SDXL with transformer layers pruned: an asymmetric UNet
        # (nested per-layer counts, reverse_transformer_layers_per_block for the up path), or
        # SDXL's channel layout with fewer than its 1+2+10 transformer layers per block.
        tl = unet_config.get("transformer_layers_per_block") or 1
        tl = [tl] if isinstance(tl, int) else list(tl)
        if unet_config.get("reverse_transformer_layers_per_block") is not None or any(isinstance(t, (list, tuple)) for t in tl):
            return "ssd1b"
        if list(unet_config.get("block_out_channels", [])) == [320, 640, 1280] and len(tl) == 3 and sum(tl) < 13:
            return "ssd1b"
        return "sdxl"
    cad = unet_config.get("cross_attention_dim")
    if cad in (1024,):
        return "sd2"
    return "sd15"


def check_supported(family: str, what: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        label = {"sdxl": "SDXL", "ssd1b": "SSD-1B", "sd2": "SD 2.x"}.get(family, family)
        raise UserError(
            f"{what} is an {label} model ({family}); not supported yet — this release handles SD 1.5 (sd15), SDXL (sdxl) and SSD-1B (ssd1b) models"
        )


def resolve_base(spec: str, flag: str = "--base") -> BaseSource:
    """Turn ``--base`` (or ``flag``) into a local source, downloading hub ids (honours HF_HUB_OFFLINE and the cache)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{flag} {spec!r}: give a hub id (owner/name), a local diffusers folder or demo:NAME")
    if spec.startswith("demo:"):
        name = spec.split(":", 1)[1]
        if name not in DEMO_NAMES:
            raise UserError(f"unknown demo model {spec!r}; choose one of: " + ", ".join(f"demo:{n}" for n in DEMO_NAMES))
        return BaseSource(spec, "demo", demo=name, flag=flag)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
            raise UserError(f"{flag} {spec}: not a diffusers pipeline folder (needs model_index.json and unet/)")
        return BaseSource(spec, "local", path=p.resolve(), flag=flag)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"{flag} {spec!r}: no such folder, and not a hub id (owner/name) or demo:NAME")
    try:
        from diffusers import DiffusionPipeline

        folder = DiffusionPipeline.download(
            spec, local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        )
    except Exception as exc:  # network, auth, offline cache miss — one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{flag} {spec}: could not get it from the Hugging Face Hub or the local cache ({first}); "
            "check the id, your network / HF_TOKEN, or pass a local diffusers folder"
        ) from None
    return BaseSource(spec, "hub", path=Path(folder), flag=flag)


def read_unet_config(src: BaseSource) -> dict:
    if src.kind == "demo":
        from .demo import demo_configs

        return dict(demo_configs(src.demo, vocab_size=0)["unet"])
    cfg = src.path / "unet" / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{src.flag} {src.spec}: cannot read {cfg}: {str(exc).splitlines()[0]}") from None
    problem = unet_config_problem(data)
    if problem:
        raise UserError(f"{src.flag} {src.spec}: {cfg} {problem}; is it a Stable Diffusion UNet config?")
    return data


def unet_config_problem(cfg) -> str:
    """'' when a UNet config has what lcm-export reads, else what is missing or malformed."""
    if not isinstance(cfg, dict):
        return "is not a JSON object"
    boc = cfg.get("block_out_channels")
    if not (isinstance(boc, list) and boc and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in boc)):
        return "lacks 'block_out_channels' (a list of positive integers)"
    for key in ("down_block_types", "up_block_types"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == len(boc) and all(isinstance(t, str) for t in v)):
            return f"has a malformed {key!r} (one block type name per entry of block_out_channels)"
    for key in ("in_channels", "out_channels", "sample_size", "layers_per_block"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return f"has a malformed {key!r} (a positive integer)"
    cad = cfg.get("cross_attention_dim")
    if cad is not None and not (isinstance(cad, (int, list)) and not isinstance(cad, bool)):
        return "has a malformed 'cross_attention_dim'"
    return ""


def base_family(src: BaseSource) -> str:
    family = detect_family(read_unet_config(src))
    check_supported(family, f"{src.flag} {src.spec}")
    return family


def load_pipeline(src: BaseSource):
    """Load the base as a diffusers pipeline (fp32, CPU, eval mode, no safety checker)."""
    if src.kind == "demo":
        from .demo import build_demo_pipeline

        return build_demo_pipeline(src.demo)
    family = base_family(src)
    try:
        if family in XL_FAMILIES:
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_pretrained(str(src.path))
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                str(src.path), safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{src.flag} {src.spec}: cannot load it as a {family} pipeline ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for c in ("unet", "vae") + TEXT_ENCODERS[family]:
        getattr(pipe, c).eval()
    return pipe


def weight_files(src: BaseSource) -> list[Path]:
    """The base's weight files (per component, safetensors preferred) — what fusion.json hashes."""
    files = []
    for comp in COMPONENTS:
        d = src.path / comp
        if d.is_dir():
            found = sorted(f for f in d.iterdir() if f.suffix in WEIGHT_SUFFIXES)
            safe = [f for f in found if f.suffix == ".safetensors"]
            files += safe or found
    return files


def base_record(src: BaseSource, pipe=None) -> dict:
    """Provenance of the base for fusion.json: source, kind, and sha256 of each weight file.

    A demo has no files; its record hashes the generated state dicts instead (deterministic).
    """
    from .._util import sha256_file

    rec = {"source": src.spec, "kind": src.kind}
    if src.kind == "demo":
        rec["note"] = "built-in demo: seeded random weights (images are noise)"
        comps = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        rec["state_dict_sha256"] = {c: state_dict_sha256(getattr(pipe, c)) for c in comps}
    else:
        rec["path"] = str(src.path)
        rec["files"] = {str(f.relative_to(src.path)): sha256_file(f) for f in weight_files(src)}
    return rec


def state_dict_sha256(module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_identity(src: BaseSource) -> dict:
    """What identifies the base weights for cache keys, computed without loading the model.

    Demo models are deterministic functions of (name, lcm_export version, torch version).
    """
    from .._util import sha256_file, tool_versions

    if src.kind == "demo":
        v = tool_versions()
        return {"demo": src.demo, "lcm_export": v["lcm_export"], "torch": v.get("torch")}
    files = weight_files(src) + sorted(src.path.glob("*/config.json")) + sorted(src.path.glob("*/scheduler_config.json"))
    return {"files": {str(f.relative_to(src.path)): sha256_file(f) for f in files}}


def base_architecture(src: BaseSource) -> dict:
    """What fixes the exported graphs' structure (configs, not weights): part of the graph key."""
    from .._util import sha256_file

    if src.kind == "demo":
        return base_identity(src)  # a demo's configs are a function of its name and our version
    files = sorted(src.path.glob("*/config.json"))
    return {"configs": {str(f.relative_to(src.path)): sha256_file(f) for f in files}}


def default_entry_name(src: BaseSource) -> str:
    if src.kind == "demo":
        return f"demo-{src.demo}"
    if src.kind == "hub":
        return src.spec.replace("/", "--")
    return src.path.name
