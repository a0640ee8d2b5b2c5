"""``lcm-export adapter add | list | remove``: style LoRAs prepared once into an entry's own layout, so the
lean runtime applies them per call (``runtime/adapters.py``) with numpy and safetensors only.

``add`` reads a LoRA file with the same loaders and checks a build uses (``fuse.load_lora``: diffusers
converts kohya / PEFT / diffusers keys; every layer in the file must find its module), into a skeleton
of the entry's model made from the configs the build stored (no base weights are read: its tensors
are allocated, never filled). From each LoRA layer PEFT holds, it takes A, B and the scale
(alpha / rank, rsLoRA's alpha / sqrt(rank) too) and writes them in the graph's layout for the layer's
adapter branch (``adapters/graph.py``), with the scale folded into B:

    adapters/<name>-<sha>/factors.safetensors   "<component>.<branch>.A" / ".B", float32 (a new folder per
                                                content: a running server keeps reading the one it has)
    adapters/index.json                   every adapter: source file + sha256, format, ranks, layers,
                                          the factors file's path, size and sha256 (checked at load)

Refused with a one-line reason: layers that have no branch in the entry (3x3 convolutions of a LoCon,
a layer of another model), DoRA, LoRAs that train biases, non-finite factors, an entry built without
adapter branches. Nothing is written on a refusal or a failed write; the index is replaced atomically,
under a lock on the entry that a build or refit of it holds too (``adapter_spec.entry_lock``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from pathlib import Path

from .._util import disk_error, sha256_file, write_json, writing
from .spec import (ADAPTER_DIR, FACTORS, FOLDER_RE, INDEX, INDEX_VERSION, MAX_GAIN, MIN_USABLE_WEIGHT, NAME_RE,
                   RANK_AXIS, entry_lock, factors_folder, gain_bound)
from .spec import read_index as spec_read_index
from ..confine import inside, owned_dir, remove, sweep_partials
from ..errors import UserError
from ..store.manifest import MANIFEST, read_manifest

def read_index(engine_dir: Path) -> dict:
    """{name: record} of the adapters an entry holds ({} when none), every record checked."""
    return spec_read_index(engine_dir)[0]


def _write_index(engine_dir: Path, adapters: dict) -> None:
    (Path(engine_dir) / ADAPTER_DIR).mkdir(exist_ok=True)
    write_json(Path(engine_dir) / ADAPTER_DIR / INDEX, {"version": INDEX_VERSION, "adapters": dict(sorted(adapters.items()))})


def _entry(engine_dir: Path) -> dict:
    m = read_manifest(engine_dir)
    if not isinstance(m.get("adapters"), dict) or not m["adapters"].get("branches"):
        raise UserError(f"{engine_dir} has no adapter branches (built without run-time adapters, or before lcm-export "
                        "had them); rebuild it with `lcm-export build-engine --adapters` (or bake the LoRA with --lora)")
    return m


def check_name(name: str, from_file: Path | None = None) -> str:
    """``name`` when it is an adapter name (``NAME_RE``, matched whole); ``from_file``: the LoRA file it was taken
    from (no --name given), which the message then says."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        where = f" (taken from the file name of {from_file}; pass --name NAME)" if from_file is not None else ""
        raise UserError(f"adapter name {name!r}{where}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    return name


def _adapter_dir(engine_dir: Path) -> Path:
    """The entry's ``adapters/`` folder, refused in one line when it is anything but a real folder (a symbolic
    link, a file): every adapter write and delete happens in it."""
    d = Path(engine_dir) / ADAPTER_DIR
    try:
        mode = os.lstat(d).st_mode
    except FileNotFoundError:
        return d
    if not stat.S_ISDIR(mode):
        raise UserError(f"{d} is {'a symbolic link' if stat.S_ISLNK(mode) else 'not a folder'}, not the folder lcm-export "
                        f"writes adapters to: damaged entry; remove it and add the adapters again")
    return d


def _old_folder(engine_dir: Path, name: str, rec: dict) -> Path | None:
    """The folder adapter ``name``'s record ``rec`` owns, to delete: only the writer's exact layout
    (``adapters/<name>-<sha12>``, a real folder), None when it is gone already."""
    return owned_dir(engine_dir, factors_folder(name, rec["sha256"]), FOLDER_RE,
                     f"{Path(engine_dir) / ADAPTER_DIR / INDEX}: adapter {name!r}")


def skeleton_pipeline(engine_dir: Path, manifest: dict):
    """The entry's UNet and text encoder(s) built from its stored configs, tensors allocated but never
    filled (no base weights needed), inside a pipeline object diffusers' LoRA loaders accept."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = manifest["adapters"]["configs"]
    read = lambda k: json.loads(inside(engine_dir, cfgs[k], str(Path(engine_dir) / MANIFEST)).read_text())  # noqa: E731
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read("unet"))
        te = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2"))) if "text_encoder_2" in cfgs else None
    mods = [m.to_empty(device="cpu").eval() for m in (unet, te, te2) if m is not None]
    with torch.no_grad():
        for m in mods:
            m.requires_grad_(False)
    if te2 is not None:
        return StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                         unet=unet, scheduler=None)
    return StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def extract_factors(pipe, touched: dict[str, list[str]], adapter: str, branches: dict[str, list[dict]], path) -> dict:
    """{"<comp>.<i>.A" / ".B": float32 array in branch layout, scale folded into B} for every layer
    ``adapter`` (loaded into ``pipe`` by PEFT) touches; UserError for a layer the entry cannot take."""
    import numpy as np

    from ..builder.components import pipe_module

    out = {}
    for comp, names in touched.items():
        table = {row["module"]: (i, row) for i, row in enumerate(branches.get(comp, []))}
        module = pipe_module(pipe, comp)
        for name in names:
            layer = module.get_submodule(name)
            if name not in table:
                base = getattr(layer, "base_layer", layer)
                what = (f"a {base.kernel_size[0]}x{base.kernel_size[1]} convolution" if hasattr(base, "kernel_size")
                        else "a layer without an adapter branch")
                raise UserError(f"LoRA file {path}: its layer {comp}.{name} is {what}, which run-time adapters cannot change "
                                "(only Linear layers and 1x1 convolutions have branches); bake this LoRA into the entry "
                                "with `lcm-export build-engine --lora` instead")
            if getattr(layer, "use_dora", {}).get(adapter):
                raise UserError(f"LoRA file {path}: layer {comp}.{name} is DoRA, which run-time adapters do not apply; "
                                "bake it with `lcm-export build-engine --lora`")
            if getattr(layer, "lora_bias", {}).get(adapter):
                raise UserError(f"LoRA file {path}: it trains biases (lora_B.bias), which run-time adapters do not apply; "
                                "bake it with `lcm-export build-engine --lora`")
            i, row = table[name]
            if layer.r.get(adapter, 0) == 0 or layer.scaling.get(adapter, 0) == 0:
                raise UserError(f"LoRA file {path}: layer {comp}.{name} has alpha 0 (or rank 0), so it changes nothing; "
                                "a LoRA layer has a positive alpha and rank (a damaged file?)")
            a = layer.lora_A[adapter].weight.detach().float().numpy()
            b = layer.lora_B[adapter].weight.detach().float().numpy() * np.float32(layer.scaling[adapter])
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            if a.shape[1] != row["in"] or b.shape[0] != row["out"]:
                raise UserError(f"LoRA file {path}: layer {comp}.{name} is {a.shape[1]}->{b.shape[0]}, the entry's is "
                                f"{row['in']}->{row['out']} (a LoRA for another model?)")
            if row["kind"] == "matmul":
                a, b = a.T, b.T
            for part, v in (("A", a), ("B", b)):
                v = np.ascontiguousarray(v, dtype=np.float32)
                if not np.isfinite(v).all():
                    raise UserError(f"LoRA file {path}: layer {comp}.{name} has non-finite factors once scaled; it cannot be applied")
                out[f"{comp}.{i}.{part}"] = v
    return out


def add_adapter(engine_dir: str | Path, lora_file: str | Path, name: str | None = None, force: bool = False) -> dict:
    """Prepare ``lora_file`` as adapter ``name`` of the entry at ``engine_dir``; return its index record."""
    from safetensors.numpy import save_file

    from ..builder.fuse import load_lora, unload_loras
    from ..sources.lora import inspect_lora

    engine_dir = Path(engine_dir)
    m = _entry(engine_dir)
    path = Path(lora_file)
    name = check_name(name, None) if name is not None else check_name(path.stem, path)
    _check_free(engine_dir, name, force)
    info = inspect_lora(path)
    _refuse_untaken(path)
    pipe = skeleton_pipeline(engine_dir, m)
    touched = load_lora(pipe, info, "style")
    try:
        factors = extract_factors(pipe, touched, "style", m["adapters"]["branches"], path)
    finally:
        unload_loras(pipe)
    del pipe
    bound = gain_bound(factors)
    if bound * MIN_USABLE_WEIGHT > MAX_GAIN:
        raise UserError(f"LoRA file {path}: its factors are so large (alpha / rank · B · A reaches {bound:.3g}) that any "
                        f"weight above ±{MAX_GAIN / bound:.3g} would overflow float32: no call could use it (a diverged "
                        "training run, or a damaged alpha?)")
    ranks = sorted({_rank(k, v, m) for k, v in factors.items()})
    need = sum(v.nbytes for v in factors.values())
    with entry_lock(engine_dir):
        if _entry(engine_dir)["adapters"]["branches"] != m["adapters"]["branches"]:  # rebuilt while we read the LoRA
            raise UserError(f"{engine_dir} was rebuilt with other adapter branches while {path} was read; add it again")
        d = _adapter_dir(engine_dir)
        sweep_partials(d)  # what adds killed before they finished left behind
        index = _check_free(engine_dir, name, force)
        old = index.get(name)
        old_folder = _old_folder(engine_dir, name, old) if old else None  # checked before anything is written
        tmp = d / f".{name}.partial-{os.getpid()}"
        new, created = None, False
        try:
            with writing(d, need):
                d.mkdir(exist_ok=True)
                remove(tmp)
                tmp.mkdir()
                save_file(factors, str(tmp / FACTORS), metadata={"lcm_export_adapter": name})
                sha = sha256_file(tmp / FACTORS)
                rel = factors_folder(name, sha)  # a new folder per content: readers of the old index keep their files
                new = owned_dir(engine_dir, rel, FOLDER_RE, f"adapter {name!r}")
                rec = {"name": name, "factors": f"{rel}/{FACTORS}", "bytes": (tmp / FACTORS).stat().st_size,
                       "sha256": sha, "source": {"file": str(path.resolve()), "sha256": info.sha256, "format": info.format},
                       "ranks": ranks, "alphas": info.alphas, "layers": {c: len(v) for c, v in touched.items()},
                       "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                if new is not None and _holds(new, sha):  # the same content: kept as it is
                    remove(tmp)
                else:
                    if new is not None:  # our layout, other bytes (damaged): replaced
                        remove(new)
                    new = engine_dir / rel
                    os.replace(tmp, new)
                    created = True
                _write_index(engine_dir, {**index, name: rec})
        except BaseException:
            remove(tmp)
            if created:
                remove(new)
            _drop_if_empty(d)
            raise
        if old_folder is not None and old_folder.name != new.name:
            remove(old_folder)
    return rec


def _holds(folder: Path, sha: str) -> bool:
    f = folder / FACTORS
    try:
        return stat.S_ISREG(os.lstat(f).st_mode) and sha256_file(f) == sha
    except OSError:
        return False


UNTAKEN = {"lora_magnitude_vector": "DoRA magnitude vectors", "dora_scale": "DoRA magnitude vectors",
           "lora_B.bias": "trained biases", "lora_up.bias": "trained biases", "lora.up.bias": "trained biases"}
"""Tensors run-time adapters cannot apply, found by their keys whatever the file's metadata declares."""


def _refuse_untaken(path: Path) -> None:
    """Refuse, before anything is loaded, a file holding tensors a branch cannot apply (DoRA, trained biases): PEFT
    drops them silently when its metadata does not declare them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = list(f.keys())
    for k in keys:
        kind = next((what for part, what in UNTAKEN.items() if part in k), None)
        if kind is not None:
            raise UserError(f"LoRA file {path}: it holds {kind} ({k}), which run-time adapters do not apply; bake it "
                            "with `lcm-export build-engine --lora`")


def _check_free(engine_dir: Path, name: str, force: bool) -> dict:
    index = read_index(engine_dir)
    if name in index and not force:
        raise UserError(f"{engine_dir} already holds an adapter named {name!r}; pass --force to replace it, or --name to choose another")
    return index


def _drop_if_empty(d: Path) -> None:
    try:
        d.rmdir()  # only when empty: a refused first add leaves no adapters/ folder
    except OSError:
        pass


def _rank(key: str, v, manifest: dict) -> int:
    comp, i, part = key.rsplit(".", 2)
    kind = manifest["adapters"]["branches"][comp][int(i)]["kind"]
    return int(v.shape[RANK_AXIS[kind][0 if part == "A" else 1]])


def list_adapters(engine_dir: str | Path) -> dict:
    read_manifest(engine_dir)
    return read_index(Path(engine_dir))


def remove_adapter(engine_dir: str | Path, name: str) -> None:
    """Drop adapter ``name`` from the index, then delete its folder: the writer's exact layout only
    (``adapters/<name>-<sha12>``, a real folder), checked before anything is written."""
    engine_dir = Path(engine_dir)
    read_manifest(engine_dir)
    with entry_lock(engine_dir):
        d = _adapter_dir(engine_dir)
        index = read_index(engine_dir)
        if name not in index:
            raise UserError(f"{engine_dir} holds no adapter named {name!r}; it holds: {', '.join(index) or 'none'}")
        folder = _old_folder(engine_dir, name, index[name])
        sweep_partials(d)
        try:
            with writing(d):
                _write_index(engine_dir, {n: r for n, r in index.items() if n != name})
        except OSError as exc:
            raise disk_error(exc, d) from None
        if folder is not None:
            remove(folder)


def format_adapters(index: dict) -> str:
    if not index:
        return "no adapters (add one with `lcm-export adapter add --engine-dir DIR FILE`)"
    rows = [f"{n}  rank {','.join(map(str, r['ranks']))}  layers " + ", ".join(f"{c} {k}" for c, k in r["layers"].items())
            + f"  {r['bytes'] / 1e6:.1f} MB  from {Path(r['source']['file']).name} ({r['source']['format']}, sha256 "
            f"{r['source']['sha256'][:12]}…)" for n, r in index.items()]
    return "\n".join(rows)
