"""``build-engine``: fuse -> export -> build, into one engine-store entry (atomic, cached)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._cpu import cpu_name, usable_cores
from .._util import atomic_dir, disk_error, progress, tool_versions, write_json
from ..errors import UserError
from ..store import DEFAULT_ROOT, MANIFEST, SCHEMA_VERSION, cache_key, existing_entry
from .profiles import plan_shapes, size_multiple

# Bump when a change to lcm-export alters what a build writes for the same inputs, so existing
# entries rebuild instead of being reported up to date. 2: CPU graphs stored at ORT_ENABLE_ALL.
# 3: CPU UNets with attention fused (withdrawn: no measured gain). 4: graphs failing parity are refused.
BUILD_RECIPE = 4



@dataclass(frozen=True)
class BuildOptions:
    """Everything ``build-engine`` takes. Each field says what it costs."""

    base: str | None = None
    """hub id, local diffusers folder or demo:NAME. None: demo:sd15 with the two demo LoRAs."""
    loras: tuple[str, ...] = ()
    """``PATH[:WEIGHT]`` each; fused in order, W = W0 + Σ λ·(alpha/r)·B·A."""
    resolutions: tuple[tuple[int, int], ...] = ()
    """(H, W) to build for; each is one TensorRT engine per component (a static engine is the
    fastest); ONNX Runtime serves them all from one graph. Default: the family's (512x512)."""
    dynamic: tuple[tuple[int, int], tuple[int, int]] | None = None
    """One dynamic engine over (lo, hi): any size inside, at some speed cost on TensorRT."""
    batch: int = 1
    """Images per call (B). Larger B raises throughput and memory."""
    guidance: str = "auto"
    """off: UNet batch B only; on: 2B only (classifier-free guidance); auto: both."""
    backend: str = "auto"
    """auto | onnxruntime | tensorrt. TensorRT fp16 is the fast path on NVIDIA GPUs."""
    precision: str = "auto"
    """auto: fp16 on TensorRT (2x+ faster, small quality cost), fp32 on ONNX Runtime."""
    vae_fp32: bool = False
    """TensorRT: VAE decoder in fp32 (slower; avoids fp16 overflow, which is detected anyway)."""
    refit: bool = False
    """TensorRT: refittable engines (swap weights without a rebuild; slightly slower engines)."""
    engine_dir: str | None = None
    """Entry folder; default engines/<name>."""
    name: str | None = None
    """Entry name (default from the base)."""
    threads: int | None = None
    """ONNX Runtime intra-op threads recorded as the entry's default (None: all cores)."""
    force: bool = False
    """Replace an entry that holds another model."""
    show_progress: bool = True


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: dict
    reused: bool
    seconds: float
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.manifest
        head = "up to date" if self.reused else f"built in {self.seconds:.1f} s"
        lines = [f"{self.engine_dir}: {head} — {m['family']} {m['backend']} {m['precision']}, "
                 f"resolutions {', '.join(m['resolutions'])}, batch {m['batch']} (guidance {m['guidance']})"]
        if m.get("demo"):
            lines.append("note: demo model with random weights: its images are noise")
        return "\n".join(lines + self.messages)


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, device): TensorRT where it imports and a CUDA GPU exists, else ORT (CUDA, then CPU)."""
    from .onnxruntime import cuda_available
    from .tensorrt import INSTALL_HINT, tensorrt_status

    if requested not in ("auto", "onnxruntime", "tensorrt"):
        raise UserError(f"--backend {requested!r}: choose auto, onnxruntime or tensorrt")
    if requested in ("auto", "tensorrt"):
        ok, why = tensorrt_status()
        if ok:
            return "tensorrt", "cuda"
        if requested == "tensorrt":
            raise UserError(f"--backend tensorrt: {why}; {INSTALL_HINT}")
    return "onnxruntime", "cuda" if cuda_available() else "cpu"


def resolve_precision(requested: str, backend: str) -> str:
    if requested == "auto":
        return "fp16" if backend == "tensorrt" else "fp32"
    if requested == "fp16" and backend == "onnxruntime":
        raise UserError("--precision fp16 needs --backend tensorrt; ONNX Runtime engines are built in fp32 "
                        "(its CPU provider has no fast fp16 kernels)")
    if requested not in ("fp32", "fp16"):
        raise UserError(f"--precision {requested!r}: choose auto, fp32 or fp16")
    return requested


def _resolve_loras(opts: BuildOptions, src, demo_default: bool):
    from ..fuse import LoraSpec, inspect_lora

    if demo_default:
        from ..demo import demo_lora_dir

        d = demo_lora_dir()
        from ..demo import build_demo_pipeline, demo_lora_paths, write_demo_loras

        paths = demo_lora_paths(d, src.demo)
        if not all(p.exists() for p, _ in paths):
            write_demo_loras(build_demo_pipeline(src.demo), d, src.demo)
        specs = [LoraSpec(p, w) for p, w in paths]
    else:
        specs = [LoraSpec.parse(s) for s in opts.loras]
    return [(s, inspect_lora(s.path)) for s in specs]


def build_engine(opts: BuildOptions) -> BuildResult:
    """Fuse, export and build one engine-store entry; reuse it when nothing changed."""
    from ..models import DEFAULT_RESOLUTION, base_family, base_identity, default_entry_name, read_unet_config, resolve_base

    t0 = time.perf_counter()
    base = opts.base or "demo:sd15"
    demo_default = opts.base is None and not opts.loras
    src = resolve_base(base)
    family = base_family(src)
    backend, device = choose_backend(opts.backend)
    precision = resolve_precision(opts.precision, backend)
    unet_cfg = read_unet_config(src)
    multiple = size_multiple(len(unet_cfg["block_out_channels"]))
    resolutions = list(opts.resolutions) or ([] if opts.dynamic else [DEFAULT_RESOLUTION[family]])
    plans = plan_shapes(resolutions, opts.dynamic, opts.batch, opts.guidance, multiple)
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads {opts.threads}: must be at least 1")
    items = _resolve_loras(opts, src, demo_default)

    name = opts.name or default_entry_name(src)
    engine_dir = Path(opts.engine_dir) if opts.engine_dir else DEFAULT_ROOT / name
    versions = tool_versions("tensorrt", "polygraphy")
    key_inputs = {
        "schema": SCHEMA_VERSION, "recipe": BUILD_RECIPE, "base": base_identity(src), "family": family,
        "loras": [{"sha256": i.sha256, "weight": s.weight} for s, i in items],
        "plans": [asdict(p) for p in plans], "batch": opts.batch, "guidance": opts.guidance,
        "backend": backend, "device": device, "precision": precision, "vae_fp32": opts.vae_fp32, "refit": opts.refit,
        "versions": versions,
    }
    key = cache_key(key_inputs)
    found = existing_entry(engine_dir, base, key, opts.force)
    if found is not None:
        return BuildResult(engine_dir, found, True, time.perf_counter() - t0)

    n_comps = 4 if family in ("sdxl", "ssd1b") else 3
    n_steps = 2 + 2 * len(items) + 3 * n_comps + 1
    bar = progress(n_steps, "build", enabled=opts.show_progress)
    try:
        with atomic_dir(engine_dir, force=True, what="engine dir") as tmp:
            manifest = _build_into(tmp, opts, src, family, backend, device, precision, plans, items, key, versions, engine_dir, bar)
    except OSError as exc:
        raise disk_error(exc, engine_dir) from None
    finally:
        bar.close()
    return BuildResult(engine_dir, manifest, False, time.perf_counter() - t0)


def _build_into(tmp: Path, opts, src, family, backend, device, precision, plans, items, key, versions, engine_dir, bar) -> dict:
    from ..export import component_io, components_for, export_pipeline, model_dims
    from ..fuse import fuse_into
    from ..models import DEFAULT_RESOLUTION, base_record, load_pipeline

    bar.set_description_str(f"load {src.spec}")
    pipe = load_pipeline(src)
    bar.update()
    fusion = fuse_into(pipe, items, bar)
    fusion = {"base": base_record(src, pipe), **fusion}

    work = tmp / "_onnx"
    parity_res = [p.opt_hw for p in plans] + [r for p in plans for r in (p.min_hw, p.max_hw) if not p.static]
    parity_res = list(dict.fromkeys(parity_res))
    exported = export_pipeline(pipe, work, plans[0].opt_hw, parity_resolutions=parity_res, bar=bar)
    dims = model_dims(pipe)
    comps = components_for(pipe)
    # SDXL's VAE overflows in fp16: diffusers marks such VAEs force_upcast; TensorRT builds them in fp32
    vae_fp32 = opts.vae_fp32 or bool(getattr(pipe.vae.config, "force_upcast", False))

    components = {}
    extra = {}
    if backend == "onnxruntime":
        for comp in comps:
            bar.set_description_str(f"ONNX Runtime {comp}")
            dst = tmp / comp / "model.onnx"
            res = parity_res if not comp.startswith("text_encoder") else parity_res[:1]
            ort_info, checks = _optimize_and_check(comp, pipe, work / comp / "model.onnx", dst, device, res)
            bad = _parity_failures(checks)
            if bad:
                raise UserError(f"{comp}: the ONNX Runtime graph does not match PyTorch ({bad}); nothing was written. "
                                "This is a bug in the export or in ONNX Runtime: please report it with the base model and versions")
            files = [f"{comp}/{f.name}" for f in sorted(dst.parent.iterdir())]
            components[comp] = {"engines": {"*": f"{comp}/model.onnx"}, "files": files, "precision": "fp32",
                                **component_io(comp, dims), "parity": checks, "export_parity": exported[comp]["parity"]}
            bar.update()
        extra["onnxruntime"] = {**ort_info, "intra_op_threads": opts.threads or usable_cores(),
                                "inter_op_threads": 1, "execution_mode": "sequential"}
    else:
        from .tensorrt import build_plan, build_tensorrt

        plan_items = build_plan(list(comps), plans, dims["text_dim"], precision, vae_fp32, opts.refit,
                                dims["latent_channels"], dims["pooled_dim"])
        from ..export import sample_inputs

        vae_feeds = sample_inputs("vae_decoder", pipe, plans[0].vae_batch[1], plans[0].opt_hw)
        info = build_tensorrt(work, tmp, plan_items, engine_dir.resolve().parent, vae_feeds, bar)
        extra["tensorrt"] = {**info, "builds": plan_items}
        for comp in comps:
            mine = [i for i in plan_items if i["component"] == comp]
            components[comp] = {"engines": {i["plan"]: i["file"] for i in mine}, "files": [i["file"] for i in mine],
                                "precision": "fp16" if all(i["fp16"] for i in mine) else ("fp32" if not any(i["fp16"] for i in mine) else "mixed"),
                                **component_io(comp, dims), "parity": exported[comp]["parity"],
                                "parity_note": "ONNX vs PyTorch fp32; run benchmarks/gpu_check.py for TensorRT fp16 parity"}
    shutil.rmtree(work)

    bar.set_description_str("tokenizer + scheduler")
    for tok_name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, tok_name, None) is not None:
            _copy_tokenizer(getattr(pipe, tok_name), tmp / tok_name)
    sched = _lcm_scheduler_config(pipe)
    (tmp / "scheduler").mkdir()
    write_json(tmp / "scheduler" / "scheduler_config.json", sched)
    vae_cfg = pipe.vae.config
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": engine_dir.name,
        "family": family,
        "backend": backend,
        "device": device,
        "precision": precision,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cache_key": key,
        "base_source": src.spec,
        "demo": src.kind == "demo",
        "resolutions": [f"{h}x{w}" for h, w in dict.fromkeys(list(opts.resolutions) or [p.opt_hw for p in plans])],
        "shape_plans": [{**asdict(p), "static": p.static} for p in plans],
        "batch": opts.batch,
        "guidance": opts.guidance,
        "text_dim": dims["text_dim"],
        "pooled_dim": dims["pooled_dim"],
        "text_encoders": [c for c in comps if c.startswith("text_encoder")],
        "latent_channels": dims["latent_channels"],
        "default_resolution": list(DEFAULT_RESOLUTION[family]),
        "force_zeros_for_empty_prompt": bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
        "vae": {"scaling_factor": float(vae_cfg.scaling_factor),
                "shift_factor": getattr(vae_cfg, "shift_factor", None),
                "latents_mean": getattr(vae_cfg, "latents_mean", None),
                "latents_std": getattr(vae_cfg, "latents_std", None),
                "force_upcast": bool(getattr(vae_cfg, "force_upcast", False)),
                "fp32_on_tensorrt": vae_fp32,
                "scale_factor": 2 ** (len(vae_cfg.block_out_channels) - 1)},
        "tokenizer": _tokenizer_record(pipe.tokenizer, "tokenizer"),
        **({"tokenizer_2": _tokenizer_record(pipe.tokenizer_2, "tokenizer_2")} if getattr(pipe, "tokenizer_2", None) is not None else {}),
        "scheduler": {"file": "scheduler/scheduler_config.json", "class": "LCMScheduler"},
        "components": components,
        **extra,
        "fusion": fusion,
        "versions": versions,
        "hardware": {"cpu": cpu_name(), "machine": platform.machine()},
    }
    if backend == "tensorrt":
        manifest["hardware"].update({k: extra["tensorrt"].get(k) for k in ("gpu", "compute_capability")})
    write_json(tmp / MANIFEST, manifest)
    bar.update()
    return manifest


PARITY_LIMIT = 1e-3
"""Largest rel-L2 an fp32 ONNX Runtime graph may differ from PyTorch by (measured: 1e-7 to 2e-5)."""


def _optimize_and_check(comp, pipe, graph: Path, dst: Path, device: str, resolutions) -> tuple[dict, list[dict]]:
    import onnxruntime as ort

    from ..export import parity
    from .onnxruntime import optimize_graph

    info = optimize_graph(graph, dst, device)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    return info, [parity(comp, pipe, dst, 1, r, session=sess) for r in resolutions]


def _parity_failures(checks: list[dict]) -> str:
    """'' when every check passes, else what failed, e.g. 'rel-L2 3.1e-01 at 64x64 (limit 0.001)'."""
    out = []
    for c in checks:
        if not c["finite"]:
            out.append(f"non-finite output at {c['resolution']}")
        elif not c["rel_l2"] <= PARITY_LIMIT:
            out.append(f"rel-L2 {c['rel_l2']:.1e} at {c['resolution']} (limit {PARITY_LIMIT:g})")
    return "; ".join(out)


def _copy_tokenizer(tok, dst: Path) -> None:
    """Save a tokenizer in the fast (``tokenizer.json``) form the lean runtime reads."""
    tok.save_pretrained(str(dst))
    if not (dst / "tokenizer.json").exists():
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is None:
            raise UserError("the base model's tokenizer has no fast (tokenizers) form; the lean runtime needs tokenizer.json")
        backend.save(str(dst / "tokenizer.json"))


def _tokenizer_record(tok, folder: str) -> dict:
    return {"file": f"{folder}/tokenizer.json", "max_length": int(min(tok.model_max_length, 77)),
            "pad_id": int(tok.pad_token_id), "bos_id": int(tok.bos_token_id), "eos_id": int(tok.eos_token_id)}


def _lcm_scheduler_config(pipe) -> dict:
    """The base's scheduler config as an LCMScheduler config (how LCM-LoRA is used with any SD model)."""
    from diffusers import LCMScheduler

    cfg = dict(LCMScheduler.from_config(pipe.scheduler.config).config)
    return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")} | {"_class_name": "LCMScheduler"}, default=list))
