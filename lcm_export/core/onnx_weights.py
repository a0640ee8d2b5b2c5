"""Weights-only updates: which ONNX initializer holds which PyTorch weight, and patching them.

At export time :func:`record_weight_map` writes, beside each component's ``model.onnx``, a
``weight_map.json``: for every weight of the component's Linear and Conv modules (all a LoRA can
change), the ONNX initializer that holds it and whether the exporter stored it transposed.
TorchScript export keeps a parameter's name when an op uses it as is (convolutions, Gemm); a Linear
applied to a 3-D input becomes a MatMul whose weight is folded to ``Wᵀ`` under a generated name
(``onnx::MatMul_123``): those are found by value (a hash of ``Wᵀ``'s bytes), unique in practice
(random or trained weights); a weight found twice or not at all is recorded as unmapped.

A refit computes the new fused weights with the same code as a fresh build (diffusers' LoRA fusion
in PyTorch), so the patched graph holds exactly the weights a fresh export would, and
:func:`patch_onnx` writes them into a copy of the exported graph: the external-data file is copied
and only the changed byte ranges are rewritten. Pure numpy + onnx; no torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import UserError

MAP_FILE = "weight_map.json"
PREFIX = {"text_encoder": "te.", "text_encoder_2": "te.", "unet": "unet.", "vae_decoder": "vae."}
"""The attribute under which export's wrapper modules hold each pipeline component."""
IN_GRAPH = {"vae_decoder": ("decoder.", "post_quant_conv.")}
"""Components exported from part of a module: only these sub-modules are in the graph."""


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def _init_array(t, base: Path) -> np.ndarray:
    """An initializer's values; external data is read directly (onnx's own loader refuses data files
    with several hard links, which is what a refit's temp folder holds)."""
    import onnx
    from onnx import numpy_helper

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    path = Path(base) / info["location"]
    if Path(info["location"]).is_absolute() or ".." in Path(info["location"]).parts:
        raise UserError(f"initializer {t.name}: external data outside its folder ({info['location']}); rebuild with --no-refit")
    a = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if a.size != count:
        raise UserError(f"{path} is shorter than initializer {t.name} needs (truncated); rebuild with --no-refit")
    return a.reshape(tuple(t.dims))


def targetable(wrapper, comp: str) -> dict[str, "object"]:
    """{state-dict key inside the component: tensor} for every Linear/Conv weight (what LoRA fusion
    changes: diffusers' ``fuse_lora`` adds λ·scale·B·A to the weight and leaves the bias alone)."""
    import torch

    prefix = PREFIX[comp]
    out = {}
    for name, mod in wrapper.named_modules():
        if not name.startswith(prefix) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            continue
        if comp in IN_GRAPH and not name[len(prefix):].startswith(IN_GRAPH[comp]):
            continue
        out[f"{name[len(prefix):]}.weight"] = mod.weight.detach()
    return out


def record_weight_map(wrapper, comp: str, onnx_path: Path) -> dict:
    """Map each targetable weight of ``wrapper`` to its initializer in ``onnx_path``; write it beside."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    weights = targetable(wrapper, comp)
    prefix = PREFIX[comp]
    mapping, pending = {}, {}
    for key, t in weights.items():
        init = inits.get(prefix + key)
        if init is not None and list(init.dims) == list(t.shape):
            mapping[key] = {"initializer": init.name, "transpose": False}
        elif t.dim() == 2:
            pending[key] = t
    named = {v["initializer"] for v in mapping.values()}
    if pending:  # by value: the transposed weights the exporter renamed
        shapes = {tuple(t.shape[::-1]) for t in pending.values()}
        by_hash: dict[str, list[str]] = {}
        for name, init in inits.items():
            if name not in named and tuple(init.dims) in shapes:
                by_hash.setdefault(_digest(_init_array(init, onnx_path.parent)), []).append(name)
        for key, t in pending.items():
            hits = by_hash.get(_digest(t.numpy().T), [])
            if len(hits) == 1:
                mapping[key] = {"initializer": hits[0], "transpose": True}
    # the exporter shares one initializer between equal constants: such a weight is not refittable alone
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    mapping = {k: v for k, v in mapping.items() if uses.get(v["initializer"], 0) == 1}
    unmapped = sorted(set(weights) - set(mapping))
    rec = {"component": comp, "graph": onnx_path.name, "weights": mapping, "unmapped": unmapped}
    from .._util import write_json

    write_json(onnx_path.parent / MAP_FILE, rec)
    return rec


def read_weight_map(folder: Path) -> dict:
    p = folder / MAP_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        raise UserError(f"{p} is missing or unreadable: this entry cannot be refit; rebuild it with --no-refit") from None


def new_initializers(weight_map: dict, tensors: dict[str, np.ndarray], keys) -> dict[str, np.ndarray]:
    """{initializer name: array in ONNX layout} for the state-dict ``keys`` (transposed where recorded).

    UserError naming the first key that has no initializer (the entry cannot take that change)."""
    out = {}
    for key in keys:
        entry = weight_map["weights"].get(key)
        if entry is None:
            raise UserError(f"{weight_map['component']} weight {key} has no ONNX initializer recorded (the exporter "
                            "folded it into another constant), so it cannot be refit")
        a = np.asarray(tensors[key], dtype=np.float32)
        out[entry["initializer"]] = np.ascontiguousarray(a.T if entry["transpose"] else a)
    return out


def patch_onnx(src: Path, dst: Path, values: dict[str, np.ndarray]) -> list[str]:
    """Write ``src`` with the initializers in ``values`` replaced to ``dst`` (a new file, never a link
    into ``src``); external data is copied and patched in place. Returns the names that changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    missing = [n for n in values if n not in inits]
    if missing:
        raise UserError(f"{src}: no initializer {missing[0]} in the stored graph; rebuild the entry with --no-refit")
    changed = []
    data_files = {}
    for name, arr in values.items():
        t = inits[name]
        if list(t.dims) != list(arr.shape):
            raise UserError(f"{src}: initializer {name} is {list(t.dims)}, the new weight is {list(arr.shape)}; rebuild with --no-refit")
        old = _init_array(t, src.parent)
        if old.dtype != np.float32:
            raise UserError(f"{src}: initializer {name} is {old.dtype}, not float32; rebuild with --no-refit")
        if np.array_equal(old, arr):
            continue
        changed.append(name)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            data_files.setdefault(info["location"], []).append((int(info.get("offset", 0)), arr))
        else:
            t.CopyFrom(numpy_helper.from_array(arr, name))
    if not changed:
        return []
    dst.parent.mkdir(parents=True, exist_ok=True)
    for loc, writes in data_files.items():
        tmp = dst.parent / (loc + ".tmp")
        shutil.copyfile(src.parent / loc, tmp)
        with open(tmp, "r+b") as f:
            for offset, arr in writes:
                f.seek(offset)
                f.write(arr.tobytes())
        os.replace(tmp, dst.parent / loc)
    for e in {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
              for e in t.external_data if e.key == "location"} - set(data_files):
        if Path(e).is_absolute() or ".." in Path(e).parts:
            raise UserError(f"{src}: external data outside its folder ({e}); rebuild with --no-refit")
        if not (dst.parent / e).exists():
            shutil.copyfile(src.parent / e, dst.parent / e)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)
    return changed


def trt_refit_plan(weight_map: dict, modules: list[str]) -> list[dict]:
    """What a TensorRT refit sets for LoRA-touched ``modules`` (component module names): each
    weight's engine name (TensorRT engines parsed from ONNX name weights after the initializers)
    and layout. Pure; UserError for a module with an unrefittable weight."""
    plan = []
    for mod in modules:
        keys = [k for k in (f"{mod}.weight",) if k in weight_map["weights"] or k in weight_map["unmapped"]]
        if not keys:
            raise UserError(f"{weight_map['component']} module {mod} is not a Linear/Conv layer of the exported graph; cannot refit it")
        for k in keys:
            e = weight_map["weights"].get(k)
            if e is None:
                raise UserError(f"{weight_map['component']} weight {k} maps to no ONNX initializer, so no TensorRT weight; "
                                "rebuild with --no-refit")
            plan.append({"weight": k, "engine_weight": e["initializer"], "transpose": e["transpose"]})
    return plan
