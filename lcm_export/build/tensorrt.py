"""TensorRT engines through Polygraphy's API (never a CLI): fp16, optimisation profiles, a timing
cache shared across builds, a refittable option, and an fp32 VAE decoder when fp16 overflows.

Everything that can be decided without TensorRT is a pure function here (``build_plan``) and is
tested on CPU machines; the functions that import TensorRT run only where it and a CUDA GPU exist.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .profiles import ShapePlan, component_profiles

INSTALL_HINT = ("install TensorRT on a machine with an NVIDIA GPU: pip install 'lcm-export[tensorrt]' "
                "--extra-index-url https://pypi.nvidia.com (or use --backend onnxruntime)")
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default: good engines without hour-long builds


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT imports and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        pass
    return True, "ok"


def build_plan(components: list[str], plans: list[ShapePlan], text_dim: int, precision: str,
               vae_fp32: bool = False, refit: bool = False, latent_channels: int = 4,
               pooled_dim: int | None = None) -> list[dict]:
    """What to build: one engine per (component, shape plan) with its profile and flags. Pure.

    Text encoders do not depend on the image size, so each gets one engine (covering every plan's
    batch range). The VAE decoder is fp32 when asked (``vae_fp32``); fp16 overflow is handled after
    the build by ``build_tensorrt`` (checked on real data, rebuilt in fp32).
    """
    out = []
    for comp in components:
        text = comp.startswith("text_encoder")
        comp_plans = plans[:1] if text else plans
        for plan in comp_plans:
            prof = component_profiles(plan, text_dim, latent_channels, pooled_dim)[comp]
            if text:
                lo = min(p.unet_batch[0] for p in plans)
                hi = max(p.unet_batch[2] for p in plans)
                opt = plans[0].unet_batch[1]
                prof = {"input_ids": ((lo, 77), (opt, 77), (hi, 77))}
            fp16 = precision == "fp16" and not (comp == "vae_decoder" and vae_fp32)
            name = "all" if text else plan.name
            out.append({
                "component": comp, "plan": name, "file": f"{comp}/{name}.plan",
                "fp16": fp16, "refittable": refit,
                "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in prof.items()},
                "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL,
            })
    return out


def timing_cache_path(store_root: Path, trt_version: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU architecture, shared by all entries of a store."""
    return store_root / ".timing-cache" / f"trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {}


def build_engine_file(onnx_path: Path, out_path: Path, item: dict, timing_cache: Path) -> None:
    """Build one engine with Polygraphy and save it (TensorRT + CUDA required)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, p in item["profile"].items():
        profile.add(name, min=p["min"], opt=p["opt"], max=p["max"])
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        fp16=item["fp16"], refittable=item["refittable"], profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        builder_optimization_level=item["builder_optimization_level"],
    )
    network = network_from_onnx_path(str(onnx_path))
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    if engine is None:
        raise UserError(f"TensorRT could not build {item['file']} from {onnx_path} (see TensorRT's log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, path=str(out_path))


def engine_outputs_finite(engine_path: Path, feeds: dict) -> bool:
    """Run an engine once on ``feeds`` (numpy) and say whether every output is finite."""
    import numpy as np
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        outputs = runner.infer(feeds)
    return all(np.isfinite(np.asarray(v)).all() for v in outputs.values())


def build_tensorrt(onnx_dir: Path, out_dir: Path, items: list[dict], store_root: Path, vae_feeds: dict | None, bar) -> dict:
    """Build every item of ``build_plan``; rebuild the VAE decoder in fp32 if fp16 gives inf/NaN."""
    import tensorrt as trt

    info = {"tensorrt": trt.__version__, **gpu_info()}
    cache = timing_cache_path(store_root, trt.__version__, info.get("compute_capability", "unknown"))
    for item in items:
        bar.set_description_str(f"TensorRT {item['file']} ({'fp16' if item['fp16'] else 'fp32'})")
        src = onnx_dir / item["component"] / "model.onnx"
        build_engine_file(src, out_dir / item["file"], item, cache)
        if item["component"] == "vae_decoder" and item["fp16"] and vae_feeds is not None:
            if not engine_outputs_finite(out_dir / item["file"], vae_feeds):
                item["fp16"] = False
                item["fp32_reason"] = "fp16 overflow (non-finite output) detected after build"
                build_engine_file(src, out_dir / item["file"], item, cache)
        bar.update()
    info["timing_cache"] = str(cache)
    return info
