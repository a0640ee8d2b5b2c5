"""``build-engine``: fuse -> export -> build, into one engine-store entry (atomic, cached)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import backends
from ._cpu import cpu_name, recorded_flags
from ._util import atomic_dir, disk_error, link_tree, progress, tool_versions, write_json
from .errors import UserError
from .shapes import check_memory, plan_shapes, size_multiple
from .store import DEFAULT_ROOT, MANIFEST, SCHEMA_VERSION, cache_key, existing_entry, record_file_sizes, reusable_entry

# Bump when a change to lcm-export alters what a build writes for the same inputs, so existing
# entries rebuild instead of being reported up to date. 2: CPU graphs stored at ORT_ENABLE_ALL.
# 3: CPU UNets with attention fused (withdrawn: no measured gain). 4: graphs failing parity are refused.
# 5: backends as plug-ins (OpenVINO added; parity checked through each built engine).
# 6: fp32 engines gated against a float64 PyTorch reference (parity records carry both figures).
BUILD_RECIPE = 6



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
    """auto | onnxruntime | openvino | tensorrt. auto: TensorRT on NVIDIA GPUs; on CPUs the backend that
    measured fastest for the precision (OpenVINO, for bf16 and fp32)."""
    precision: str = "auto"
    """auto | fp32 | fp16 | bf16 | int8. auto: fp16 on NVIDIA GPUs (TensorRT, else ONNX Runtime's CUDA provider; 2x+
    faster on TensorRT, small quality cost; ONNX Runtime fp16 not measured yet, image-gated); on CPUs bf16 where
    the CPU has native bf16 (AMX / AVX512_BF16: UNet 2.05x faster at 512² on an AMD EPYC Zen 4, image PSNR ~50 dB against fp32,
    gated at 30 dB), else fp32. int8 (OpenVINO, CPUs with AVX512_VNNI / AVX_VNNI / AMX-INT8): the UNet
    quantized by NNCF after calibrating on the entry's own LCM trajectories — int8 arithmetic and int8
    weights in the IR, a larger quality cost (image gated by PSNR and SSIM, verify.INT8_IMAGE_GATE); the
    build runs 32 PyTorch fp32 UNet calls and the quantizer on top (minutes for SD 1.5 at 512²)."""
    int8_scheme: str = "auto"
    """int8 only: w8a8 | w8a8-sq | hybrid | w8 (backends/openvino.py: INT8_SCHEMES); auto = the backend's
    DEFAULT_INT8_SCHEME. Fewer int8 products (hybrid, w8) cost less quality and gain less speed."""
    vae_decoder: str | None = None
    """A tiny VAE decoder (diffusers AutoencoderTiny: madebyollin/taesd, /taesdxl, a local folder, demo:taesd)
    in place of the base's: TAESD's decoder counts 141 GFLOP at 512² against 2515 for SD 1.5's (torch
    FlopCounterMode, real configs), and approximates it (how closely: ``fidelity.vs_full_vae``). None: the
    base's own VAE decoder."""
    preset: str = "quality"
    """quality | fast (``presets.py``). fast = int8 UNet where the CPU has int8 dot products + a tiny VAE
    decoder (the family's TAESD, ``demo:taesd*`` for demo bases) unless the flags above say otherwise."""
    vae_fp32: bool = False
    """fp16 GPU entries (TensorRT, ONNX Runtime): VAE decoder in fp32 (slower; avoids fp16 overflow, which
    TensorRT builds detect anyway)."""
    refit: bool = False
    """TensorRT: build refittable engines (slightly slower), so that a change of LoRAs or λ is refit
    into them instead of rebuilt. CPU entries are always refittable (they keep the exported ONNX)."""
    no_refit: bool = False
    """Never refit: a change of LoRAs or λ takes the full fuse -> export -> build path."""
    adapters: bool = False
    """Adapter branches beside every Linear layer and 1x1 convolution of the UNet and text encoder(s), so
    style LoRAs prepared with ``lcm-export adapter add`` apply per call (``generate --adapter``) without a
    rebuild. Costs a little per step even with no adapter active (README, "Style adapters")."""
    engine_dir: str | None = None
    """Entry folder; default engines/<name>."""
    name: str | None = None
    """Entry name (default from the base)."""
    threads: int | None = None
    """CPU threads recorded as the entry's default (None: all cores); $LCM_EXPORT_THREADS overrides at run time."""
    force: bool = False
    """Rebuild even when the entry is up to date, and replace an entry that holds another model."""
    show_progress: bool = True


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: dict
    reused: bool
    seconds: float
    messages: list[str] = field(default_factory=list)
    refit: bool = False

    def summary(self) -> str:
        m = self.manifest
        head = "up to date" if self.reused else (f"refit in {self.seconds:.1f} s" if self.refit else f"built in {self.seconds:.1f} s")
        decoder = m.get("vae_decoder", {}).get("source") if isinstance(m.get("vae_decoder"), dict) else None
        lines = [f"{self.engine_dir}: {head} — {m['family']} {m['backend']} {m['precision']}"
                 + (f", tiny VAE decoder {decoder}" if decoder else "")
                 + f", resolutions {', '.join(m['resolutions'])}, batch {m['batch']} (guidance {m['guidance']})"]
        fid = m.get("fidelity")
        if isinstance(fid, dict) and isinstance(fid.get("image_psnr_db"), (int, float)):
            lines.append(f"image check at {fid.get('resolution')}: PSNR {fid['image_psnr_db']:.1f} dB, SSIM "
                         f"{fid.get('image_ssim', float('nan')):.3f} against PyTorch fp32")
        if m.get("demo"):
            lines.append("note: demo model with random weights: its images are noise")
        return "\n".join(lines + self.messages)


def resolve_loras(opts: BuildOptions, src, demo_default: bool):
    from .lora import LoraSpec, inspect_lora

    if demo_default:
        from .demo import demo_lora_dir

        d = demo_lora_dir()
        from .demo import build_demo_pipeline, demo_lora_paths, write_demo_loras

        paths = demo_lora_paths(d, src.demo)
        if not all(p.exists() for p, _ in paths):
            write_demo_loras(build_demo_pipeline(src.demo), d, src.demo)
        specs = [LoraSpec(p, w) for p, w in paths]
    else:
        specs = [LoraSpec.parse(s) for s in opts.loras]
    return [(s, inspect_lora(s.path)) for s in specs]


def build_engine(opts: BuildOptions) -> BuildResult:
    """Fuse, export and build one engine-store entry; reuse it when nothing changed."""
    from .models import (DEFAULT_RESOLUTION, base_architecture, base_family, base_identity, default_entry_name,
                         read_unet_config, resolve_base)

    t0 = time.perf_counter()
    base = opts.base or "demo:sd15"
    demo_default = opts.base is None and not opts.loras
    src = resolve_base(base)
    family = base_family(src)
    opts, preset_notes = _apply_preset(opts, family, src.kind == "demo")
    choice = backends.choose(opts.backend, opts.precision)
    backend, device, precision = choice.backend, choice.device, choice.precision
    scheme = None
    if precision == "int8":
        scheme = backends.int8_scheme(backend, opts.int8_scheme)
        if opts.adapters:
            raise UserError("--adapters with an int8 UNet is not supported (the quantizer would need the adapter inputs "
                            "calibrated too); use --precision bf16 or fp32 with --adapters, or bake the LoRAs in with --lora")
    elif opts.int8_scheme != "auto":
        raise UserError(f"--int8-scheme {opts.int8_scheme} applies to int8 UNets only (--precision int8 or --preset fast "
                        f"on a CPU with int8 dot products); this build is {precision}")
    unet_cfg = read_unet_config(src)
    multiple = size_multiple(len(unet_cfg["block_out_channels"]))
    resolutions = list(opts.resolutions) or ([] if opts.dynamic else [DEFAULT_RESOLUTION[family]])
    plans = plan_shapes(resolutions, opts.dynamic, opts.batch, opts.guidance, multiple)
    check_memory(plans, unet_cfg)  # before anything is loaded
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads {opts.threads}: must be at least 1")
    if opts.adapters and not backends.get(backend).ADAPTERS:
        raise UserError(f"--adapters: the {backend} backend does not take run-time adapter inputs yet; use --backend "
                        "onnxruntime or openvino, or bake the LoRAs in with --lora")
    if opts.adapters and device != "cpu":  # ONNX Runtime's CUDA path (fp16 fusions, device buffers) is untested with them
        raise UserError(f"--adapters: run-time adapters are verified on CPU entries only, not on {device}; bake the "
                        "LoRAs in with --lora there")
    decoder = None
    if opts.vae_decoder is not None:
        from .tiny_vae import check_latent_channels, family_note, resolve_vae_decoder

        decoder = resolve_vae_decoder(opts.vae_decoder, family, src.kind == "demo")
        check_latent_channels(decoder, int(unet_cfg.get("in_channels", 4)))
        note = family_note(decoder, family)
        preset_notes = preset_notes + ((note,) if note else ())
    items = resolve_loras(opts, src, demo_default)

    name = opts.name or default_entry_name(src)
    engine_dir = Path(opts.engine_dir) if opts.engine_dir else DEFAULT_ROOT / name
    versions = tool_versions("tensorrt", "polygraphy", "openvino")
    graph_inputs = {
        "schema": SCHEMA_VERSION, "recipe": BUILD_RECIPE, "architecture": base_architecture(src), "family": family,
        "plans": [asdict(p) for p in plans], "batch": opts.batch, "guidance": opts.guidance,
        "backend": backend, "device": device, "precision": precision, "vae_fp32": opts.vae_fp32,
        "refit": opts.refit and backends.get(backend).REFIT_NEEDS_FLAG,  # where entries are always refittable the flag changes nothing
        "adapters": opts.adapters,
        "versions": versions,
    }
    # added only where used, so that entries built without them keep their keys
    if scheme:
        from .calibration import CALIBRATION_VERSION

        graph_inputs["int8"] = {"scheme": scheme, "calibration": CALIBRATION_VERSION}
    if opts.preset != "quality":
        graph_inputs["preset"] = opts.preset
    weights_inputs = {"base": base_identity(src), "loras": [{"sha256": i.sha256, "weight": s.weight} for s, i in items]}
    if decoder is not None:
        from .tiny_vae import decoder_architecture, decoder_identity

        graph_inputs["vae_decoder"] = decoder_architecture(decoder)
        weights_inputs["vae_decoder"] = decoder_identity(decoder)
    keys = {"graph_key": cache_key(graph_inputs), "weights_key": cache_key(weights_inputs)}
    key = cache_key(keys)
    found = existing_entry(engine_dir, base, key, opts.force)
    if found is not None:
        return BuildResult(engine_dir, found, True, time.perf_counter() - t0, list(preset_notes))
    from .adapter_spec import entry_lock

    with entry_lock(engine_dir):  # no `adapter add` to this entry while it is refit or replaced
        messages = list(preset_notes)
        if not opts.force:
            from .refit_build import refit_blocker, refit_entry

            old = reusable_entry(engine_dir, base)
            if old is not None:
                why = refit_blocker(old, keys, graph_inputs, weights_inputs, opts)
                if why is None:
                    try:
                        manifest, seconds = refit_entry(engine_dir, old, opts, src, plans, items, keys, weights_inputs, key)
                        return BuildResult(engine_dir, manifest, False, time.perf_counter() - t0,
                                           messages + [f"refit: weights updated in place in {seconds:.1f} s (LoRAs / λ changed; graph unchanged)"],
                                           refit=True)
                    except backends.RefitImpossible as exc:
                        why = str(exc)
                messages.append(f"full build, not a refit: {why}")

        from .verify import REDUCED

        n_comps = 4 if family in ("sdxl", "ssd1b") else 3
        n_steps = (2 + 2 * len(items) + (2 if backends.get(backend).VERIFY_IN_BUILD else 3) * n_comps + 1
                   + (precision in REDUCED or decoder is not None) + (precision == "int8"))
        bar = progress(n_steps, "build", enabled=opts.show_progress)
        try:
            with atomic_dir(engine_dir, force=True, what="engine dir", marker=MANIFEST) as tmp:
                manifest = _build_into(tmp, opts, src, family, backend, device, precision, plans, items, key, versions,
                                       engine_dir, bar, {**keys, "graph_inputs": graph_inputs, "weights_inputs": weights_inputs},
                                       decoder, scheme, preset_notes)
                messages += carry_adapters(engine_dir, tmp, manifest)
        except OSError as exc:
            raise disk_error(exc, engine_dir) from None
        finally:
            bar.close()
        return BuildResult(engine_dir, manifest, False, time.perf_counter() - t0, messages)


def _apply_preset(opts: BuildOptions, family: str, demo: bool) -> tuple[BuildOptions, tuple[str, ...]]:
    """``opts`` with the preset's precision and VAE decoder filled in (``presets.resolve_preset``), and its notes."""
    from ._cpu import native_bf16, native_int8
    from .presets import resolve_preset

    if opts.preset == "quality":
        return opts, resolve_preset(opts.preset, opts.precision, opts.vae_decoder, family, demo, "cpu", False, False, False).notes
    probe = backends.choose(opts.backend, "auto")
    builder = "int8" in backends.get(probe.backend).PRECISIONS if opts.backend != "auto" else backends.builds_int8()
    pc = resolve_preset(opts.preset, opts.precision, opts.vae_decoder, family, demo, probe.device, native_int8(), builder,
                        native_bf16(), opts.adapters)
    return replace(opts, precision=pc.precision, vae_decoder=pc.vae_decoder), pc.notes


def _build_into(tmp: Path, opts, src, family, backend, device, precision, plans, items, key, versions, engine_dir, bar,
                key_record: dict, decoder=None, scheme=None, notes=()) -> dict:
    from .components import component_io, components_for, decoder_probe_inputs, model_dims
    from .export import export_pipeline
    from .fuse import fuse_into
    from .models import DEFAULT_RESOLUTION, base_record, load_pipeline
    from .adapter_spec import empty_factors
    from .verify import REDUCED, References, image_gate, verify_engine, verify_graph

    bar.set_description_str(f"load {src.spec}")
    pipe = load_pipeline(src)
    bar.update()
    fusion = fuse_into(pipe, items, bar)
    fusion = {"base": base_record(src, pipe), **fusion}
    full_vae = None
    if decoder is not None:  # as diffusers documents it: pipe.vae = AutoencoderTiny.from_pretrained(...)
        from .tiny_vae import load_vae_decoder

        full_vae, pipe.vae = pipe.vae, load_vae_decoder(decoder)

    work = tmp / ONNX_DIR  # kept in the entry: what a weights-only update (refit) patches
    mod = backends.get(backend)
    refs = References(pipe)
    # backends whose engines run here are checked through the engine itself (below); the others
    # (TensorRT, without a GPU here) through the exported graph in ONNX Runtime
    check = None if mod.VERIFY_IN_BUILD else (lambda comp, path: verify_graph(comp, path, refs, plans, "the exported graph"))
    exported = export_pipeline(pipe, work, plans[0].opt_hw, bar=bar, check=check)
    adapter_spec = _add_adapter_branches(pipe, work, tmp, exported) if opts.adapters else None
    empty = {c: empty_factors(rows) for c, rows in adapter_spec["branches"].items()} if adapter_spec else {}
    dims = model_dims(pipe)
    comps = components_for(pipe)
    # SDXL's VAE overflows in fp16: diffusers marks such VAEs force_upcast; TensorRT builds them in fp32
    vae_fp32 = opts.vae_fp32 or bool(getattr(pipe.vae.config, "force_upcast", False))

    section = mod.entry_settings(opts.threads, device)
    calibration, calib_rec = (None, None)
    if precision == "int8":
        from .calibration import calibrate

        calibration, calib_rec = calibrate(pipe, plans, bar)
    components = {}
    for comp in comps:
        bar.set_description_str(f"{backend} {comp}" + (" (int8 quantization)" if calibration and comp == "unet" else ""))
        feeds = decoder_probe_inputs(pipe, plans[0].vae_batch[1], plans[0].opt_hw) if comp == "vae_decoder" else {}
        job = backends.ComponentJob(comp, work / comp / "model.onnx", tmp, plans, precision, dims, section,
                                    vae_fp32=vae_fp32, refit=opts.refit, store_root=engine_dir.resolve().parent,
                                    int8_scheme=scheme, calibration=calibration if comp == "unet" else None,
                                    sample_feeds=feeds)
        rec = mod.build_component(job)
        if "quantization" in rec:
            rec["quantization"]["calibration"] = calib_rec
        rec.update(component_io(comp, dims))
        rec["onnx_files"] = [f"{ONNX_DIR}/{f}" for f in exported[comp]["files"]]
        rec["weight_map"] = f"{ONNX_DIR}/{exported[comp]['weight_map']['file']}"
        if mod.VERIFY_IN_BUILD:
            bar.set_description_str(f"check {comp} against PyTorch")
            verify_engine(mod, section, comp, rec, refs, plans, tmp, opts.threads, graph=work / comp / "model.onnx",
                          extra=empty.get(comp))
        else:
            rec["parity"] = exported[comp]["parity"]
        components[comp] = rec
        bar.update()
    del calibration
    extra = {backend: section} if section else {}

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
        **key_record,
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
        "size_multiple": size_multiple(len(pipe.unet.config.block_out_channels)),
        "default_resolution": list(DEFAULT_RESOLUTION[family]),
        "force_zeros_for_empty_prompt": bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
        # a tiny decoder's shift_factor (0.0) is not applied by diffusers' SD 1.5 / SDXL pipelines: None
        "vae": {"scaling_factor": float(vae_cfg.scaling_factor),
                "shift_factor": None if decoder is not None else getattr(vae_cfg, "shift_factor", None),
                "latents_mean": getattr(vae_cfg, "latents_mean", None),
                "latents_std": getattr(vae_cfg, "latents_std", None),
                "force_upcast": bool(getattr(vae_cfg, "force_upcast", False)),
                "fp32_on_tensorrt": vae_fp32,
                "scale_factor": 2 ** (len(vae_cfg.block_out_channels) - 1)},
        "tokenizer": _tokenizer_record(pipe.tokenizer, "tokenizer"),
        **({"tokenizer_2": _tokenizer_record(pipe.tokenizer_2, "tokenizer_2")} if getattr(pipe, "tokenizer_2", None) is not None else {}),
        "scheduler": {"file": "scheduler/scheduler_config.json", "class": "LCMScheduler"},
        "components": components,
        "preset": _preset_record(opts.preset, notes),
        **({"vae_decoder": _decoder_record(decoder, pipe.vae)} if decoder is not None else {}),
        **({"adapters": adapter_spec} if adapter_spec else {}),
        **extra,
        "fusion": fusion,
        "versions": versions,
        "hardware": {"cpu": cpu_name(), "machine": platform.machine(), "cpu_flags": recorded_flags()},
    }
    for k in ("gpu", "compute_capability"):
        if section.get(k):
            manifest["hardware"][k] = section[k]
    manifest = record_file_sizes(manifest, tmp)
    write_json(tmp / MANIFEST, manifest)
    bar.update()
    if (precision in REDUCED or decoder is not None) and mod.VERIFY_IN_BUILD:
        bar.set_description_str("image check against PyTorch fp32")
        manifest["fidelity"] = image_gate(pipe, tmp, plans, components, precision, full_vae)
        write_json(tmp / MANIFEST, record_file_sizes(manifest, tmp))
        bar.update()
    return manifest


def carry_adapters(old_dir: Path, new_dir: Path, manifest: dict) -> list[str]:
    """Keep the adapters of the entry being replaced when the new one has the same adapter branches
    (same layers, kinds and sizes: the prepared factors fit as they are); else say they were dropped."""
    from .adapters import ADAPTER_DIR, read_index

    src = Path(old_dir) / ADAPTER_DIR
    if not src.is_dir():
        return []
    try:
        names = sorted(read_index(old_dir))
        old = json.loads((Path(old_dir) / MANIFEST).read_text()).get("adapters", {}).get("branches")
    except (UserError, OSError, ValueError, AttributeError):
        names, old = [], None
    if not names:
        return []
    def layers(branches):  # the inputs' names may differ between versions; the prepared factors fit the same layers
        return {c: [(r.get("module"), r.get("kind"), r.get("in"), r.get("out")) for r in rows]
                for c, rows in branches.items()} if isinstance(branches, dict) else None

    try:
        same = bool(old) and layers(old) == layers(manifest.get("adapters", {}).get("branches"))
    except (AttributeError, TypeError):  # a damaged old manifest: nothing to keep
        same = False
    if same:
        link_tree(src, Path(new_dir) / ADAPTER_DIR)
        return [f"adapters kept: {', '.join(names)}"]
    return [f"adapters dropped ({', '.join(names)}): the new entry has other adapter branches; add them again with "
            "`lcm-export adapter add`"]


def _preset_record(preset: str, notes) -> dict:
    from .presets import TRADES

    return {"name": preset, "trades": TRADES[preset], "notes": list(notes)}


def _decoder_record(decoder, module) -> dict:
    from .tiny_vae import decoder_record

    return decoder_record(decoder, module)


def _add_adapter_branches(pipe, work: Path, entry: Path, exported: dict) -> dict:
    """Adapter branches into the exported UNet and text encoder graphs (in place); the configs a
    skeleton for ``adapter add`` is made from. Returns the manifest's ``adapters`` section."""
    from .adapter_graph import add_branches
    from .adapter_spec import SPEC_VERSION
    from .adapters import CONFIG_DIR
    from .components import pipe_module
    from .refit import read_weight_map

    (entry / CONFIG_DIR).mkdir()
    branches, configs = {}, {}
    for comp in exported:
        if comp == "vae_decoder":
            continue
        graph = work / comp / "model.onnx"
        branches[comp] = add_branches(graph, graph, read_weight_map(graph.parent), comp)
        cfg = pipe_module(pipe, comp).config
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        configs[comp] = f"{CONFIG_DIR}/{comp}.json"
        write_json(entry / configs[comp], json.loads(json.dumps(cfg, default=list)))
    return {"version": SPEC_VERSION, "branches": branches, "configs": configs}


ONNX_DIR = "onnx"
"""The entry's folder for the exported graphs and their weight maps (``refit.py``)."""


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
