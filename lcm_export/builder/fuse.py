"""LoRA -> fused weights: W = W0 + Σ_i λ_i · (alpha_i / r_i) · B_i · A_i.

diffusers' LoRA loaders do all the format work (diffusers/PEFT, kohya, kohya SGM naming, LoCon
convs); this module validates files up front, applies one LoRA at a time
(``load_lora_weights`` -> ``fuse_lora(lora_scale=λ)`` -> ``unload_lora_weights``), checks that
every layer in each file found its module in the base, and writes a plain diffusers folder plus
``fusion.json`` describing exactly what went in.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from .._util import atomic_dir, check_replaceable, disk_error, progress, tool_versions, write_json, writing
from ..errors import EngineError, UserError
from ..sources.lora import LORA_COMPONENTS, LoraInfo, LoraSpec, finite_tensor, inspect_lora, lora_has_bias  # noqa: F401 (fuse's API takes them)
from ..sources.models import base_family, base_record, load_pipeline, resolve_base

FUSION_SCHEMA = 1


def _check_fused_finite(pipe, touched: dict[str, list[str]], spec: "LoraSpec", info: "LoraInfo") -> None:
    """After fusing one LoRA: every weight it changed is finite, and each component it touched still
    gives finite outputs on a small seeded input (a huge λ leaves finite weights whose products
    overflow float32, e.g. in attention). Names the file, λ and the layer (the largest weight)."""
    import numpy as np

    from .components import run_module, sample_inputs, wrappers
    from ..core.shapes import size_multiple

    largest = (0.0, "")
    for comp, names in touched.items():
        module = getattr(pipe, comp)
        for name in names:
            layer = module.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            for pname, param in layer.named_parameters(recurse=False):
                where = f"{comp}.{name}.{pname}"
                if not finite_tensor(param.data):
                    raise UserError(f"LoRA file {info.path} at λ={spec.weight:g}: the fused weight of layer {where} "
                                    "is not finite (float32 overflow); use a smaller λ")
                peak = float(param.data.abs().max()) if param.numel() else 0.0
                largest = max(largest, (peak, where))
    side = size_multiple(len(pipe.unet.config.block_out_channels))
    mods = wrappers(pipe)
    for comp in touched:
        outs = run_module(mods[comp], sample_inputs(comp, pipe, 1, (side, side), seed=7))
        if not all(bool(np.isfinite(o).all()) for o in outs):
            raise UserError(f"LoRA file {info.path} at λ={spec.weight:g}: the fused {comp} gives NaN/inf outputs (float32 "
                            f"overflow; its largest fused weight is {largest[0]:.1e}, in layer {largest[1]}); use a smaller λ")


def _present(pipe) -> list[str]:
    return [c for c in LORA_COMPONENTS if getattr(pipe, c, None) is not None]


def _touched(pipe, adapter: str) -> dict[str, list[str]]:
    """Modules the adapter changes: PEFT wraps every module its target_modules pattern matches,
    but only those with a non-zero B factor (loaded from the file) change the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp in _present(pipe):
        names = [n for n, m in getattr(pipe, comp).named_modules()
                 if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_B", {})
                 and bool(m.lora_B[adapter].weight.any())]
        if names:
            out[comp] = names
    return out


def _load_error(info: LoraInfo, exc: Exception) -> UserError:
    msg = str(exc)
    if "size mismatch" in msg or "shape" in msg.lower():
        first = next((ln.strip() for ln in msg.splitlines() if "size mismatch" in ln), msg.splitlines()[0] if msg else "")
        return UserError(f"LoRA file {info.path}: its shapes don't match the base model (a LoRA for another model family?): {first[:300]}")
    if "not found in the base model" in msg or "Target modules" in msg:
        return UserError(f"LoRA file {info.path}: no layer in it matches the base model (0 layers touched); is it for another model family?")
    return UserError(f"LoRA file {info.path}: diffusers could not load it: {msg.splitlines()[0][:300] if msg else type(exc).__name__}")


def fuse(base: str, loras: list[LoraSpec], out: str | Path, force: bool = False, show_progress: bool = True) -> dict:
    """Fuse ``loras`` into ``base`` and save a diffusers folder at ``out``; return the fusion record.

    ``base`` is a hub id, a local diffusers folder or ``demo:NAME``. Each LoRA's λ may be any real
    number (negative and > 1 allowed: task arithmetic). ``out`` must not exist unless ``force``.
    """
    out = Path(out)
    src = resolve_base(base)
    family = base_family(src)
    infos = [inspect_lora(spec.path) for spec in loras]
    check_replaceable(out, marker="fusion.json")
    if out.exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")

    bar = progress(2 + 2 * len(loras), "fuse", enabled=show_progress)
    bar.set_description_str(f"load {base}")
    pipe = load_pipeline(src)
    bar.update()
    record = fuse_into(pipe, list(zip(loras, infos)), bar)
    record = {
        "schema": FUSION_SCHEMA,
        "family": family,
        "formula": "W = W0 + sum_i lambda_i * (alpha_i / r_i) * B_i @ A_i",
        "base": base_record(src, pipe),
        **record,
        "versions": tool_versions(),
    }
    bar.set_description_str(f"save {out}")
    try:
        with atomic_dir(out, force=force, marker="fusion.json") as tmp, writing(tmp):  # safetensors: SafetensorError, not OSError
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            write_json(tmp / "fusion.json", record)
    except OSError as exc:
        raise disk_error(exc, out) from None
    bar.update()
    bar.close()
    return record


def fuse_into(pipe, items: list[tuple[LoraSpec, LoraInfo]], bar=None) -> dict:
    """Fuse each (spec, info) into ``pipe`` in place, one at a time; return {"loras": [...]}."""
    bar = bar or progress(0, "", enabled=False)
    base_keys = {c: list(getattr(pipe, c).state_dict()) for c in _present(pipe)}
    records = []
    for i, (spec, info) in enumerate(items):
        adapter = f"lora{i}"
        bar.set_description_str(f"load LoRA {info.path.name}")
        touched = load_lora(pipe, info, adapter)
        bar.update()
        bar.set_description_str(f"fuse {info.path.name} (λ={spec.weight:g})")
        pipe.fuse_lora(components=list(touched), lora_scale=spec.weight, adapter_names=[adapter])
        unload_loras(pipe)
        _check_fused_finite(pipe, touched, spec, info)
        bar.update()
        records.append({
            "path": str(info.path.resolve()), "sha256": info.sha256, "weight": spec.weight,
            "format": info.format, "ranks": info.ranks, "alphas": info.alphas,
            "adapter_metadata": info.has_metadata,
            "lora_bias": lora_has_bias(info.path),
            "layers": {c: len(v) for c, v in touched.items()},
            "modules": touched,
        })
    for c, keys in base_keys.items():  # fused weights are plain: no PEFT wrapper left behind
        if list(getattr(pipe, c).state_dict()) != keys:
            raise EngineError(f"{c}: its state dict keys changed during fusion (a PEFT wrapper was left behind); "
                              "please report it with the diffusers and peft versions")
    return {"loras": records}


def load_lora(pipe, info: LoraInfo, adapter: str) -> dict[str, list[str]]:
    """Load one LoRA file into ``pipe`` as the PEFT adapter ``adapter`` (diffusers' loaders do the format
    work) and check that every layer in the file found its module; return the modules it changes
    ({component: [module names]}). On failure nothing stays loaded and a UserError says why."""
    with warnings.catch_warnings(), _quiet_diffusers():
        warnings.simplefilter("ignore")
        try:
            if info.format.startswith("kohya"):
                _load_kohya(pipe, info, adapter)
            elif info.prefixed:
                pipe.load_lora_weights(str(info.path), adapter_name=adapter)
            else:  # bare PEFT keys (no unet. prefix): the UNet's own loader, prefix=None
                pipe.unet.load_lora_adapter(str(info.path), prefix=None, adapter_name=adapter, _pipeline=pipe)
        except UserError:
            unload_loras(pipe)
            raise
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            unload_loras(pipe)
            raise _load_error(info, exc) from None
    touched = _touched(pipe, adapter)
    n_touched = sum(len(v) for v in touched.values())
    n_file = sum(info.n_layers.values())
    if n_touched == 0:
        unload_loras(pipe)
        raise UserError(f"LoRA file {info.path}: no layer in it matches the base model (0 layers touched); is it for another model family?")
    if n_touched < n_file:
        unload_loras(pipe)
        raise UserError(f"LoRA file {info.path}: only {n_touched} of its {n_file} layers match a module of the base model; is it for another model family?")
    return touched


def _load_kohya(pipe, info: LoraInfo, adapter: str) -> None:
    """``load_lora_weights`` for kohya files, in its two public halves with one correction.

    diffusers converts kohya keys (SGM block names too, given the UNet config) in
    ``lora_state_dict``. For the text encoder it then guesses old vs new key style from the whole
    dict; a kohya text-encoder LoRA with MLP layers but no ``out_proj`` is guessed as "new" and its
    attention layers are silently dropped. We convert the text-encoder keys (and their alphas) with
    diffusers' own ``convert_state_dict_to_diffusers(original_type=DIFFUSERS_OLD)``, then load.
    """
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers

    def te_style(d):
        te = {k: v for k, v in d.items() if k.startswith("text_encoder")}
        rest = {k: v for k, v in d.items() if not k.startswith("text_encoder")}
        return {**rest, **convert_state_dict_to_diffusers(te, original_type=StateDictType.DIFFUSERS_OLD)}

    kwargs = {"unet_config": pipe.unet.config} if info.sgm else {}
    sd, alphas = pipe.lora_state_dict(str(info.path), **kwargs)
    sd, alphas = te_style(sd), (te_style(alphas) if alphas else alphas)
    if any(k.startswith("unet.") for k in sd):
        pipe.load_lora_into_unet(sd, alphas, pipe.unet, adapter_name=adapter, _pipeline=pipe)
    for comp in ("text_encoder", "text_encoder_2"):
        if any(k.startswith(f"{comp}.") for k in sd):
            if getattr(pipe, comp, None) is None:
                raise UserError(f"LoRA file {info.path}: it has {comp} layers but the base model has no {comp} "
                                "(an SDXL LoRA on an SD 1.5 model?)")
            pipe.load_lora_into_text_encoder(sd, alphas, getattr(pipe, comp), prefix=comp, adapter_name=adapter, _pipeline=pipe)


def unload_loras(pipe) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.unload_lora_weights()


class _quiet_diffusers:
    """Silence diffusers' logger and diffusers' / transformers' loading bars while a LoRA loads (we report
    problems ourselves, as one line, and show our own progress)."""

    def __enter__(self):
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        self.bars = [(m, m.is_progress_bar_enabled()) for m in (dl, tl)]
        for m, _ in self.bars:
            m.disable_progress_bar()

    def __exit__(self, *a):
        self.logger.setLevel(self.level)
        for m, was in self.bars:
            if was:
                m.enable_progress_bar()


def read_fusion(folder: Path) -> dict:
    p = Path(folder) / "fusion.json"
    return json.loads(p.read_text()) if p.is_file() else {}
