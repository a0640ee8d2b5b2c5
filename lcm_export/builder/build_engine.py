"""``build-engine``: fuse -> export -> build, into one engine-store entry (atomic, cached)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import backends
from .._cpu import cpu_name, recorded_flags
from .._util import atomic_dir, disk_error, link_tree, progress, write_json
from ..core.shapes import size_multiple
from ..errors import UserError
from ..store.manifest import (MANIFEST, REFIT_SOURCE_STAMP, SCHEMA_VERSION, record_file_sizes, refit_source_dir, reusable_entry,
                              write_refit_stamp)
from .plan import BuildOptions, BuildPlan, make_plan

__all__ = ["BuildOptions", "BuildResult", "build_engine", "carry_adapters"]




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
        genai = m.get("genai")
        if isinstance(genai, dict) and genai.get("why") and getattr(backends.get(m["backend"]), "GENAI", False):
            lines.append(f"not an OpenVINO GenAI folder: {genai['why']}")
        if m.get("demo"):
            lines.append("note: demo model with random weights: its images are noise")
        return "\n".join(lines + self.messages)


def build_engine(opts: BuildOptions) -> BuildResult:
    """Fuse, export and build one engine-store entry; reuse it when nothing changed, refit it when only
    LoRAs or λ did. Every decision is made first, in one plan (``plan.make_plan``); the stages then run in order."""
    t0 = time.perf_counter()
    plan = make_plan(opts)
    if plan.action == "reuse":
        return BuildResult(plan.engine_dir, plan.existing, True, time.perf_counter() - t0, list(plan.notes))
    from ..adapters.spec import entry_lock

    with entry_lock(plan.engine_dir):  # no `adapter add` to this entry while it is refit or replaced
        if plan.action == "refit" and reusable_entry(plan.engine_dir, plan.existing["base_source"]) != plan.existing:
            plan = make_plan(opts)  # another build replaced the entry while this one planned: decide again, under the lock
            if plan.action == "reuse":
                return BuildResult(plan.engine_dir, plan.existing, True, time.perf_counter() - t0, list(plan.notes))
        messages = list(plan.notes)
        why = plan.refit_blocker
        if plan.action == "refit":
            from .refit import refit_entry

            try:
                manifest, seconds = refit_entry(plan)
                return BuildResult(plan.engine_dir, manifest, False, time.perf_counter() - t0,
                                   messages + [f"refit: weights updated in place in {seconds:.1f} s (LoRAs / λ changed; graph unchanged)"],
                                   refit=True)
            except backends.RefitImpossible as exc:
                why = str(exc)
        if why is not None:
            messages.append(f"full build, not a refit: {why}")
        bar = progress(plan.build_steps(), "build", enabled=plan.opts.show_progress)
        try:  # the refit source (beside the store), then the entry, each replaced in one rename: a failure before the
            # second leaves the old entry, whose weights no longer match the source's stamp (its next change: a full build)
            with atomic_dir(plan.engine_dir, force=True, what="engine dir", marker=MANIFEST) as tmp, \
                    atomic_dir(refit_source_dir(plan.engine_dir), force=True, what="refit source", marker=REFIT_SOURCE_STAMP) as source:
                manifest = _build_into(tmp, plan, bar, source)
                messages += carry_adapters(plan.engine_dir, tmp, manifest)
        except OSError as exc:
            raise disk_error(exc, plan.engine_dir) from None
        finally:
            bar.close()
        return BuildResult(plan.engine_dir, manifest, False, time.perf_counter() - t0, messages)


def _build_into(tmp: Path, plan: BuildPlan, bar, source: Path) -> dict:
    """The full build's stages, in order, into the temp folder ``tmp``: load, fuse, export (into ``source``, the
    refit source's temp folder beside the store), (adapter branches), (int8 calibration), each component's engine
    and its check, tokenizer and scheduler, manifest, image check."""
    opts, src, family, engine_dir, items = plan.opts, plan.src, plan.family, plan.engine_dir, list(plan.loras)
    backend, device, precision, plans = plan.backend, plan.device, plan.precision, list(plan.plans)
    key, versions, key_record, decoder, scheme, notes = plan.key, plan.versions, plan.key_record, plan.decoder, plan.int8_scheme, plan.notes
    from .components import component_io, component_parameters, components_for, decoder_probe_inputs, model_dims
    from .export import export_pipeline
    from .fuse import fuse_into
    from ..sources.models import DEFAULT_RESOLUTION, base_record, load_pipeline
    from ..adapters.spec import empty_factors
    from .verify import REDUCED, References, image_gate, verify_engine, verify_graph

    bar.set_description_str(f"load {src.spec}")
    pipe = load_pipeline(src)
    bar.update()
    fusion = fuse_into(pipe, items, bar)
    fusion = {"base": base_record(src, pipe), **fusion}
    full_vae = None
    if decoder is not None:  # as diffusers documents it: pipe.vae = AutoencoderTiny.from_pretrained(...)
        from ..sources.tiny_vae import load_vae_decoder

        full_vae, pipe.vae = pipe.vae, load_vae_decoder(decoder)

    work = source  # beside the store, not in the entry: what a weights-only update (refit) patches
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
        from .quantize import calibrate

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
        rec["parameters"] = component_parameters(pipe, comp)  # the weights `inspect` compares the entry's bytes with
        rec["onnx_files"] = list(exported[comp]["files"])  # relative to the refit source's folder
        rec["weight_map"] = exported[comp]["weight_map"]["file"]
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
    genai = _genai_section(mod, family, pipe, tmp, decoder is not None, bool(adapter_spec))
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
        "genai": genai,
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
        manifest["fidelity"] = image_gate(pipe, tmp, plans, components, precision, full_vae, release_pipe=True)
        write_json(tmp / MANIFEST, record_file_sizes(manifest, tmp))
        bar.update()
    write_refit_stamp(manifest, source)
    return manifest


def carry_adapters(old_dir: Path, new_dir: Path, manifest: dict) -> list[str]:
    """Keep the adapters of the entry being replaced when the new one has the same adapter branches
    (same layers, kinds and sizes: the prepared factors fit as they are); else say they were dropped."""
    from ..adapters.spec import ADAPTER_DIR, read_index

    src = Path(old_dir) / ADAPTER_DIR
    if not src.is_dir():
        return []
    try:
        names = sorted(read_index(old_dir)[0])
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


def _genai_section(mod, family: str, pipe, entry: Path, tiny_decoder: bool, adapters: bool) -> dict:
    """The entry as an OpenVINO GenAI folder too where it can be (``genai.py``): the manifest's ``genai`` section."""
    from .genai import genai_blocker, write_genai_layout

    why = genai_blocker(mod, family, pipe, tiny_decoder, adapters)
    if why is not None:
        return {"why": why}
    return write_genai_layout(pipe, entry, _tokenizer_record(pipe.tokenizer, "tokenizer")["max_length"])


def _preset_record(preset: str, notes) -> dict:
    from .presets import TRADES

    return {"name": preset, "trades": TRADES[preset], "notes": list(notes)}


def _decoder_record(decoder, module) -> dict:
    from ..sources.tiny_vae import decoder_record

    return decoder_record(decoder, module)


def _add_adapter_branches(pipe, work: Path, entry: Path, exported: dict) -> dict:
    """Adapter branches into the exported UNet and text encoder graphs (in place); the configs a
    skeleton for ``adapter add`` is made from. Returns the manifest's ``adapters`` section."""
    from ..adapters.graph import add_branches
    from ..adapters.spec import CONFIG_DIR, SPEC_VERSION
    from .components import pipe_module
    from ..core.onnx_weights import read_weight_map

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
