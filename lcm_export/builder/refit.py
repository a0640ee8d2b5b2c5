"""``build-engine`` when only LoRAs or λ changed: update an entry's weights in place (refit).

Two keys decide (``build_engine``): the graph key (architecture, shapes, backend, precision, build
flags, tool versions) and the weights key (base weights, each LoRA's sha256 and λ). Same graph, same
base weights, other LoRAs or λ: the entry is refit instead of rebuilt.

1. The new fused weights come from the same code a fresh build runs (the base loaded, each LoRA
   fused by diffusers in PyTorch), so they are bit-identical to a fresh build's.
2. For every weight a LoRA touches, now or before (the union: removing a LoRA restores W0), the
   weight map recorded at export (``core/onnx_weights.py``) names the ONNX initializer and its layout; the
   entry's exported graph (its refit source, kept beside the store: ``store.manifest.refit_source_dir``) is
   patched (no torch export).
3. Each changed component is re-derived by its backend from the patched graph (ONNX Runtime:
   re-optimized; OpenVINO: a new IR; TensorRT: refit through its refitter) and checked
   against PyTorch exactly as a fresh build checks it (and the image gate for bf16 and int8). An int8
   UNet is re-quantized: calibrated again on the new weights' own LCM trajectories, with the entry's
   scheme, as a fresh build does (the old scales would be wrong for new weights).
4. It all happens in a temp folder holding hard links to the old entry's files (changed files are
   new files, never written through a link) that replaces the entry in one rename: a crash or a
   failed check leaves the old entry as it was.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from .. import backends
from .._util import atomic_dir, disk_error, link_tree, progress, write_json
from ..errors import UserError
from ..store.manifest import MANIFEST, REFIT_SOURCE_STAMP, record_file_sizes, refit_source_dir, write_refit_stamp

def _modules(fusion: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for lora in fusion.get("loras", []):
        for comp, mods in lora.get("modules", {}).items():
            out.setdefault(comp, set()).update(mods)
    return out


def refit_entry(plan):
    """Refit the plan's entry (``plan.existing``, whose ``action`` is "refit") to the plan's LoRAs; return
    (manifest, seconds). The same plan a full build runs, with fewer stages."""
    engine_dir, old, opts, src, plans, items = plan.engine_dir, plan.existing, plan.opts, plan.src, list(plan.plans), list(plan.loras)
    keys, weights_inputs, key = plan.keys, plan.weights_inputs, plan.key
    t0 = time.perf_counter()
    bar = progress(2 + 2 * len(items) + len(old["components"]) + 1, "refit", enabled=opts.show_progress)
    try:  # the refit source, then the entry, each replaced in one rename (see build_engine: a failure leaves the old entry)
        with atomic_dir(engine_dir, force=True, what="engine dir", marker=MANIFEST) as tmp, \
                atomic_dir(refit_source_dir(engine_dir), force=True, what="refit source", marker=REFIT_SOURCE_STAMP) as source:
            manifest = _refit_into(tmp, source, engine_dir, old, opts, src, plans, items, keys, weights_inputs, key, bar, t0)
    except OSError as exc:
        raise disk_error(exc, engine_dir) from None
    finally:
        bar.close()
    return manifest, time.perf_counter() - t0


def _refit_into(tmp, source, engine_dir, old, opts, src, plans, items, keys, weights_inputs, key, bar, t0) -> dict:
    from .components import model_dims, pipe_module
    from .fuse import fuse_into
    from ..sources.lora import lora_has_bias
    from ..sources.models import base_record, load_pipeline
    from ..core.onnx_weights import new_initializers, patch_onnx, read_weight_map
    from ..adapters.spec import empty_factors
    from .verify import REDUCED, References, image_gate, verify_engine, verify_graph

    RefitImpossible = backends.RefitImpossible
    old_loras = old.get("fusion", {}).get("loras", [])
    if any(lora_has_bias(info.path) for _, info in items) or any(l.get("lora_bias", True) for l in old_loras):
        raise RefitImpossible("a LoRA with bias terms (lora_B.bias) changes biases, and a refit patches weights only")
    phases: dict[str, float] = {}
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - mark[0], 2)
        mark[0] = now

    bar.set_description_str("link the current entry")
    link_tree(engine_dir, tmp)
    old_source = refit_source_dir(engine_dir)
    link_tree(old_source, source, skip=lambda name: name == REFIT_SOURCE_STAMP)
    bar.set_description_str(f"load {src.spec}")
    pipe = load_pipeline(src)
    bar.update()
    lap("link + load base")
    fusion = {"base": base_record(src, pipe), **fuse_into(pipe, items, bar)}
    lap("fuse LoRAs (PyTorch)")
    full_vae = None
    if isinstance(old.get("vae_decoder"), dict) and opts.vae_decoder:  # the same decoder (its weights are in the key)
        from ..sources.tiny_vae import load_vae_decoder, resolve_vae_decoder

        full_vae, pipe.vae = pipe.vae, load_vae_decoder(resolve_vae_decoder(opts.vae_decoder, old["family"]))
    calibration = None
    touched_old, touched_new = _modules(old.get("fusion", {})), _modules(fusion)
    mod = backends.get(old["backend"])
    section = dict(old.get(old["backend"], {}))
    dims = model_dims(pipe)
    components = dict(old["components"])
    refs = References(pipe)
    branches = (old.get("adapters") or {}).get("branches") or {}
    empty = {c: empty_factors(rows) for c, rows in branches.items()}  # rank-0 factors (no adapter) where graphs have branches
    changed_comps, n_weights, engine_weights = [], 0, {}
    count_engine_weights = getattr(mod, "refit_weight_count", None)
    quantized = {c for c, r in old["components"].items() if isinstance(r.get("quantization"), dict)}
    # a quantized UNet's calibration saw the text encoders' outputs: it is re-quantized when they change too
    others_touched = any(touched_old.get(c) or touched_new.get(c) for c in old["components"] if c not in quantized)
    for comp, rec in old["components"].items():
        bar.set_description_str(f"patch {comp}")
        modules = sorted(touched_old.get(comp, set()) | touched_new.get(comp, set()))
        force = comp in quantized and others_touched
        if not modules and not force:
            bar.update()
            continue
        graph = rec["onnx_files"][0]
        changed = []
        if modules:
            wmap = read_weight_map(source / Path(rec["weight_map"]).parent)
            weight_keys = [f"{m}.weight" for m in modules]
            state = pipe_module(pipe, comp).state_dict()
            try:
                if count_engine_weights is not None:
                    engine_weights[comp] = count_engine_weights(wmap, modules)
                values = new_initializers(wmap, {k: state[k].detach().numpy() for k in weight_keys if k in state}, weight_keys)
            except (UserError, KeyError) as exc:
                raise RefitImpossible(f"a LoRA touches a layer this entry cannot refit ({exc})") from None
            changed = patch_onnx(old_source / graph, source / graph, values)
            n_weights += len(changed)
            lap("patch exported graphs")
        if not changed and not force:
            bar.update()
            continue
        for f in rec["files"]:  # the engine files are re-derived: drop the links first, never write through them
            (tmp / f).unlink(missing_ok=True)
        bar.set_description_str(f"{old['backend']} {comp}")
        quant = rec.get("quantization") if isinstance(rec.get("quantization"), dict) else None
        if quant is not None and calibration is None:  # re-quantize on the new weights' own trajectories
            from .quantize import calibrate

            calibration = calibrate(pipe, plans)
            lap("int8 calibration (PyTorch)")
        job = backends.ComponentJob(comp, source / graph, tmp, plans, old["precision"], dims, section,
                                    vae_fp32=bool(old["graph_inputs"].get("vae_fp32")), refit=bool(old["graph_inputs"].get("refit")),
                                    store_root=engine_dir.resolve().parent, previous=engine_dir,
                                    int8_scheme=quant["scheme"] if quant else None, calibration=calibration[0] if quant else None)
        refit_fn = getattr(mod, "refit_component", None)
        new = refit_fn(job, rec) if refit_fn else mod.build_component(job)
        if quant is not None and "quantization" in new:
            new["quantization"]["calibration"] = calibration[1]
        new_rec = {**rec, **new}
        lap(f"{old['backend']} re-derive")
        if mod.VERIFY_IN_BUILD:  # checked exactly as a fresh build checks it
            verify_engine(mod, section, comp, new_rec, refs, plans, tmp, opts.threads, graph=source / graph,
                          extra=empty.get(comp))
        else:  # its engines can't run here: the patched graph itself, as a fresh build checks its export
            new_rec["parity"] = verify_graph(comp, source / graph, refs, plans, "the patched graph")
        lap("parity vs PyTorch")
        components[comp] = new_rec
        changed_comps.append(comp)
        bar.update()

    manifest = {**old, "components": components, "fusion": fusion, "cache_key": key, **keys, "weights_inputs": weights_inputs,
                **({old["backend"]: section} if section else {})}
    manifest["refit"] = {"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "components": changed_comps, "weights_changed": n_weights,
                         "seconds": round(time.perf_counter() - t0, 2), "previous_weights_key": old.get("weights_key"),
                         **({f"{old['backend']}_weights": engine_weights} if engine_weights else {})}
    write_json(tmp / MANIFEST, record_file_sizes(manifest, tmp))
    if (old["precision"] in REDUCED or full_vae is not None) and mod.VERIFY_IN_BUILD and changed_comps:
        bar.set_description_str("image check against PyTorch fp32")
        manifest["fidelity"] = image_gate(pipe, tmp, plans, components, old["precision"], full_vae, release_pipe=True)
        lap("image gate vs PyTorch fp32")
    manifest["refit"]["seconds"] = round(time.perf_counter() - t0, 2)
    manifest["refit"]["phases_s"] = phases
    manifest = record_file_sizes(manifest, tmp)
    write_json(tmp / MANIFEST, manifest)
    write_refit_stamp(manifest, source)
    bar.update()
    return manifest
