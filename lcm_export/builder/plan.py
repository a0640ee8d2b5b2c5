"""The build plan: every decision of one ``build-engine`` run, resolved once, up front, before anything
heavy is loaded — the source and its family, the preset, backend, device and precision, the int8 scheme, the
shape plans, the VAE decoder, the LoRAs (hashed), adapters, the entry folder, the graph and weights keys, and
what the entry already at that folder lets us do (reuse it, refit it, or build it in full, and why).

``make_plan(opts)`` returns a frozen :class:`BuildPlan`; ``build_engine`` runs its stages in order, and a refit
is the same plan with fewer stages. ``format_plan`` is what ``build-engine --dry-run`` prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import backends
from .._util import tool_versions
from ..core.shapes import check_memory, plan_shapes, size_multiple
from ..errors import UserError
from ..store.manifest import DEFAULT_ROOT, SCHEMA_VERSION, cache_key, existing_entry, refit_source_problem, reusable_entry

# Bump when a change to lcm-export alters what a build writes for the same inputs, so existing
# entries rebuild instead of being reported up to date. 2: CPU graphs stored at ORT_ENABLE_ALL.
# 3: CPU UNets with attention fused (withdrawn: no measured gain). 4: graphs failing parity are refused.
# 5: backends as plug-ins (OpenVINO added; parity checked through each built engine).
# 6: fp32 engines gated against a float64 PyTorch reference (parity records carry both figures).
# 7: the entry holds its weights once: the refit source (exported fp32 graphs) beside the store, no longer inside
#    the entry; OpenVINO entries hold the IR only (no compiled blob), fp16-compressed where a component runs in
#    bf16, as OpenVINO GenAI folders (openvino_model.xml, model_index.json, configs, converted tokenizer).
BUILD_RECIPE = 7


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
    gated at 30 dB), else fp32. int8 (OpenVINO; CPU classes in ``_cpu.INT8_MEASURED``: AMX, VNNI, AVX2): the UNet
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
    """quality | fast (``presets.py``). fast = int8 UNet where int8 was measured to pay on this CPU class + a tiny VAE
    decoder (the family's TAESD, ``demo:taesd*`` for demo bases) unless the flags above say otherwise."""
    vae_fp32: bool = False
    """fp16 GPU entries (TensorRT, ONNX Runtime): VAE decoder in fp32 (slower; avoids fp16 overflow, which
    TensorRT builds detect anyway)."""
    refit: bool = False
    """TensorRT: build refittable engines (slightly slower), so that a change of LoRAs or λ is refit
    into them instead of rebuilt. CPU entries are always refittable (their exported ONNX is kept beside the store)."""
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


@dataclass(frozen=True)
class BuildPlan:
    """One build, decided. Made by :func:`make_plan`; nothing in it changes while the stages run."""

    opts: BuildOptions
    """The options as given, with the preset's precision and VAE decoder filled in."""
    src: object
    """The base (``sources.models`` source: hub id, local folder or demo)."""
    family: str
    backend: str
    device: str
    precision: str
    int8_scheme: str | None
    plans: tuple
    """Shape plans (``core.shapes``), one engine each where the backend builds per shape."""
    decoder: object | None
    """The tiny VAE decoder (``sources.tiny_vae``), or None for the base's own."""
    loras: tuple
    """(LoraSpec, LoraInfo) per LoRA to fuse, in order, each with its sha256."""
    engine_dir: Path
    versions: dict
    graph_inputs: dict
    weights_inputs: dict
    keys: dict
    """{"graph_key", "weights_key"}: the same graph key with a new weights key is a refit."""
    key: str
    notes: tuple[str, ...] = ()
    action: str = "build"
    """reuse (up to date) | refit (only LoRAs or λ changed) | build."""
    existing: dict | None = None
    """The manifest of the entry being reused or refit."""
    refit_blocker: str | None = None
    """Why an intact entry of the same base at ``engine_dir`` is rebuilt rather than refit (None: no such entry)."""

    @property
    def key_record(self) -> dict:
        return {**self.keys, "graph_inputs": self.graph_inputs, "weights_inputs": self.weights_inputs}

    def build_steps(self) -> int:
        """The full build's progress steps (load, fuse, export, per component, manifest, image check)."""
        from .verify import REDUCED

        n_comps = 4 if self.family in ("sdxl", "ssd1b") else 3
        return (2 + 2 * len(self.loras) + (2 if backends.get(self.backend).VERIFY_IN_BUILD else 3) * n_comps + 1
                + (self.precision in REDUCED or self.decoder is not None) + (self.precision == "int8"))


def make_plan(opts: BuildOptions) -> BuildPlan:
    """Resolve every decision of a build (a one-line UserError for anything refused), without loading weights."""
    from ..sources.models import (DEFAULT_RESOLUTION, base_architecture, base_family, base_identity, default_entry_name,
                                  read_unet_config, resolve_base)

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
                        f"on a CPU class where int8 pays); this build is {precision}")
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
        from ..sources.tiny_vae import check_latent_channels, family_note, resolve_vae_decoder

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
        from .quantize import CALIBRATION_VERSION

        graph_inputs["int8"] = {"scheme": scheme, "calibration": CALIBRATION_VERSION}
    if opts.preset != "quality":
        graph_inputs["preset"] = opts.preset
    weights_inputs = {"base": base_identity(src), "loras": [{"sha256": i.sha256, "weight": s.weight} for s, i in items]}
    if decoder is not None:
        from ..sources.tiny_vae import decoder_architecture, decoder_identity

        graph_inputs["vae_decoder"] = decoder_architecture(decoder)
        weights_inputs["vae_decoder"] = decoder_identity(decoder)
    keys = {"graph_key": cache_key(graph_inputs), "weights_key": cache_key(weights_inputs)}
    plan = BuildPlan(opts, src, family, backend, device, precision, scheme, tuple(plans), decoder, tuple(items),
                     engine_dir, versions, graph_inputs, weights_inputs, keys, cache_key(keys), tuple(preset_notes))
    found = existing_entry(engine_dir, base, plan.key, opts.force)
    if found is not None:
        return replace(plan, action="reuse", existing=found)
    if not opts.force:
        old = reusable_entry(engine_dir, base)
        if old is not None:
            why = refit_blocker(old, keys, graph_inputs, weights_inputs, opts) or refit_source_problem(old, engine_dir)
            return replace(plan, action="build" if why else "refit", existing=None if why else old, refit_blocker=why)
    return plan


def format_plan(plan: BuildPlan) -> str:
    """The plan in words (``build-engine --dry-run``)."""
    o = plan.opts
    action = {"reuse": "reuse: the entry there is up to date (nothing to build)",
              "refit": "refit: only LoRAs or λ changed; the entry's weights are updated in place",
              "build": "full build" + (f" (not a refit: {plan.refit_blocker})" if plan.refit_blocker else "")}[plan.action]
    rows = [
        ("entry", str(plan.engine_dir)),
        ("action", action),
        ("base", f"{plan.src.spec} ({plan.family}{', demo model with random weights' if plan.src.kind == 'demo' else ''})"),
        ("preset", o.preset),
        ("engine", f"{plan.backend} on {plan.device}, {plan.precision}" + (f" (int8 scheme {plan.int8_scheme})" if plan.int8_scheme else "")),
        ("shapes", "; ".join(_shape(p) for p in plan.plans)),
        ("batch", f"{o.batch} (guidance {o.guidance})"),
        ("vae decoder", "the base's own" if plan.decoder is None else f"tiny: {o.vae_decoder}"),
        ("adapters", "adapter branches (run-time style LoRAs)" if o.adapters else "none"),
        ("threads", "all cores" if o.threads is None else str(o.threads)),
    ]
    rows += [("lora", f"{spec.path}  λ={spec.weight:g}  {info.format}  sha256 {info.sha256[:12]}…") for spec, info in plan.loras]
    rows.append(("keys", f"graph {plan.keys['graph_key'][:12]}…  weights {plan.keys['weights_key'][:12]}…"))
    rows += [("note", n) for n in plan.notes]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _shape(p) -> str:
    size = (f"{p.opt_hw[0]}x{p.opt_hw[1]} (static" if p.static else
            f"{p.name}: {p.min_hw[0]}x{p.min_hw[1]} to {p.max_hw[0]}x{p.max_hw[1]}, best at {p.opt_hw[0]}x{p.opt_hw[1]} (dynamic")
    return f"{size}, UNet batch {p.unet_batch[0]}-{p.unet_batch[2]})"


def resolve_loras(opts: BuildOptions, src, demo_default: bool):
    from ..sources.lora import LoraSpec, inspect_lora

    if demo_default:
        from ..sources.demo import demo_lora_dir

        d = demo_lora_dir()
        from ..sources.demo import build_demo_pipeline, demo_lora_paths, write_demo_loras

        paths = demo_lora_paths(d, src.demo)
        if not all(p.exists() for p, _ in paths):
            write_demo_loras(build_demo_pipeline(src.demo), d, src.demo)
        specs = [LoraSpec(p, w) for p, w in paths]
    else:
        specs = [LoraSpec.parse(s) for s in opts.loras]
    return [(s, inspect_lora(s.path)) for s in specs]


def _apply_preset(opts: BuildOptions, family: str, demo: bool) -> tuple[BuildOptions, tuple[str, ...]]:
    """``opts`` with the preset's precision and VAE decoder filled in (``presets.resolve_preset``), and its notes."""
    from .._cpu import int8_pays, native_bf16
    from .presets import resolve_preset

    if opts.preset == "quality":
        return opts, resolve_preset(opts.preset, opts.precision, opts.vae_decoder, family, demo, "cpu", False, False, False).notes
    probe = backends.choose(opts.backend, "auto")
    builder = "int8" in backends.get(probe.backend).PRECISIONS if opts.backend != "auto" else backends.builds_int8()
    pc = resolve_preset(opts.preset, opts.precision, opts.vae_decoder, family, demo, probe.device, int8_pays(), builder,
                        native_bf16(), opts.adapters)
    return replace(opts, precision=pc.precision, vae_decoder=pc.vae_decoder), pc.notes


GRAPH_CHANGES = {"plans": "resolutions or shape plans", "batch": "batch", "guidance": "guidance shapes",
                 "backend": "backend", "device": "device", "precision": "precision", "vae_fp32": "--vae-fp32",
                 "refit": "--refit", "versions": "tool versions", "architecture": "base architecture",
                 "family": "family", "recipe": "lcm-export build recipe", "schema": "manifest schema",
                 "int8": "int8 scheme or calibration", "vae_decoder": "tiny VAE decoder", "preset": "preset",
                 "adapters": "--adapters"}


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def refit_blocker(old: dict, keys: dict, graph_inputs: dict, weights_inputs: dict, opts) -> str | None:
    """Why the entry ``old`` cannot be refit to the new inputs (None: it can)."""
    if opts.no_refit:
        return "--no-refit was given"
    if not old.get("graph_key") or not isinstance(old.get("graph_inputs"), dict):
        return "the entry was built before refit support (no graph key); this build makes it refittable"
    if old["graph_key"] != keys["graph_key"]:
        was = old["graph_inputs"]
        now = _jsonable(graph_inputs)
        changed = [GRAPH_CHANGES.get(k, k) for k in dict.fromkeys([*now, *was]) if was.get(k) != now.get(k)]
        return f"the graph changed ({', '.join(changed) or 'graph key'}), so the engines must be rebuilt"
    if _jsonable(old.get("weights_inputs", {}).get("base")) != _jsonable(weights_inputs["base"]):
        return "the base model's weights changed (a refit only swaps LoRAs and λ)"
    if _jsonable(old.get("weights_inputs", {}).get("vae_decoder")) != _jsonable(weights_inputs.get("vae_decoder")):
        return "the tiny VAE decoder's weights changed (a refit only swaps LoRAs and λ)"
    mod = backends.get(old["backend"])
    if not getattr(mod, "REFIT", False):
        return f"the {old['backend']} backend cannot refit"
    if mod.REFIT_NEEDS_FLAG and not old["graph_inputs"].get("refit"):
        return f"its {old['backend']} engines were built without --refit (not refittable); add --refit to build refittable ones"
    for comp, c in old["components"].items():
        if not c.get("onnx_files") or not c.get("weight_map"):
            return f"the entry keeps no exported graph for {comp}"
    here = mod.entry_settings(None, old.get("device", "cpu"))
    section = old.get(old["backend"], {})
    for k in ("cpu_isa", "cpu_flags"):
        if k in section and section[k] != here.get(k):
            return f"the entry was built on another CPU ({k} {section[k]} here {here.get(k)}), so its engines are re-derived in full"
    return None
