"""torch -> ONNX for the text encoder, UNet and VAE decoder, each checked against PyTorch in ONNX Runtime.

Exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` (TorchScript-based).
Measured here with torch 2.13 on 2 CPU cores: it exports the tiny demo UNet in ~1 s against ~28 s
for the dynamo exporter (opset 20; ~2 min for the SD 1.5 UNet), its dynamic batch/height/width axes
work, and every op it emits is in the TensorRT 10 ONNX parser's support list (see
``data/trt_onnx_ops.json``). Dynamo at opset 17 produced an invalid graph (``Split`` with
``num_outputs``). Its one drawback — one external-data file per weight for graphs over 2 GB — is
undone here: weights are re-saved into a single ``model.onnx.data`` beside the graph when the model
exceeds 2 GB (when torch writes external data at all), streamed tensor by tensor.

The I/O of each component is documented in ``components.py``; every check against PyTorch is in
``verify.py``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from .components import COMPONENTS, XL_COMPONENTS, component_io, components_for, model_dims, sample_inputs, wrappers

OPSET = 17


def _dynamic_axes(comp: str, io: dict) -> dict:
    """Batch is dynamic everywhere; latent/image height and width too."""
    axes = {}
    for name, _, dims in io["inputs"] + io["outputs"]:
        ax = {0: "B"}
        if dims[2:3] == ["H/8"]:
            ax.update({2: "h", 3: "w"})
        elif dims[2:3] == ["H"]:
            ax.update({2: "H", 3: "W"})
        axes[name] = ax
    return axes


def export_component(comp: str, pipe, out_dir: Path, hw: tuple[int, int], batch: int = 1) -> Path:
    """Export one component to ``out_dir/<comp>/model.onnx`` (+ ``model.onnx.data`` when > 2 GB)."""
    import onnx
    import torch

    module = wrappers(pipe)[comp]
    io = component_io(comp, model_dims(pipe))
    args = tuple(torch.from_numpy(v) for v in sample_inputs(comp, pipe, batch, hw, seed=123).values())
    final_dir = out_dir / comp
    scratch = out_dir / f".{comp}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(scratch / "model.onnx"), dynamo=False, opset_version=OPSET,
                input_names=[i[0] for i in io["inputs"]], output_names=[o[0] for o in io["outputs"]],
                dynamic_axes=_dynamic_axes(comp, io), do_constant_folding=True,
            )
        final_dir.mkdir(parents=True, exist_ok=True)
        path = final_dir / "model.onnx"
        model = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
        if any(_is_external(t) for t in model.graph.initializer):
            _merge_external_data(model, scratch, path)  # one data file, streamed tensor by tensor
        else:
            onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _is_external(t) -> bool:
    import onnx

    return t.data_location == onnx.TensorProto.EXTERNAL


def _merge_external_data(model, src_dir: Path, dst: Path) -> None:
    """Rewrite a graph whose weights sit in many external files to use one ``<name>.data`` file.

    Tensors are copied one at a time (memory stays at the largest tensor, not the model: the SDXL
    UNet is 10 GB in fp32), 64-byte aligned, and the graph's external-data entries are updated.
    """
    import onnx

    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for t in model.graph.initializer:
            if not _is_external(t):
                continue
            info = {e.key: e.value for e in t.external_data}
            with open(src_dir / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                blob = f.read(int(info["length"])) if "length" in info else f.read()
            pad = (-offset) % 64
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(blob)
    onnx.save_model(model, str(dst))


def onnx_files(path: Path) -> list[str]:
    """The graph file and its external-data file, if any (names relative to the graph's folder)."""
    names = [path.name]
    if (path.parent / (path.name + ".data")).exists():
        names.append(path.name + ".data")
    return names


def export_pipeline(pipe, out_dir: Path, hw: tuple[int, int], bar=None, check=None) -> dict:
    """Export every component (three for SD 1.5; four for SDXL / SSD-1B: two text encoders) into
    ``out_dir``; return the components record. ``check(comp, graph_path)``, when given, checks each
    exported graph (``verify``) and its result is recorded as the component's ``parity``."""
    from .._util import progress
    from ..core.onnx_weights import MAP_FILE, record_weight_map

    bar = bar or progress(0, "", enabled=False)
    dims = model_dims(pipe)
    mods = wrappers(pipe)
    record = {}
    for comp in components_for(pipe):
        bar.set_description_str(f"export {comp}")
        try:
            path = export_component(comp, pipe, out_dir, hw)
        except OSError as exc:
            from .._util import disk_error

            raise disk_error(exc, out_dir / comp) from None
        wmap = record_weight_map(mods[comp], comp, path)
        bar.update()
        record[comp] = {"file": f"{comp}/{path.name}", "files": [f"{comp}/{n}" for n in onnx_files(path)] + [f"{comp}/{MAP_FILE}"],
                        "weight_map": {"file": f"{comp}/{MAP_FILE}", "mapped": len(wmap["weights"]), "unmapped": len(wmap["unmapped"])},
                        "opset": OPSET, "exporter": "torch.onnx (TorchScript, dynamo=False)", **component_io(comp, dims)}
        if check is not None:
            bar.set_description_str(f"check {comp} against PyTorch (fp32 and float64)")
            record[comp]["parity"] = check(comp, path)
            bar.update()
    return record


def export_model(model: str, out: str | Path, resolution=None, force: bool = False, show_progress: bool = True) -> dict:
    """``lcm-export export``: load ``model`` (fused folder, diffusers folder, hub id, demo:NAME) and export it."""
    from .._util import atomic_dir, check_replaceable, disk_error, progress, tool_versions, write_json
    from ..errors import UserError
    from .fuse import read_fusion
    from ..sources.models import DEFAULT_RESOLUTION, base_family, load_pipeline, read_unet_config, resolve_base
    from ..core.shapes import check_memory, plan_shapes, size_multiple
    from .verify import References, verify_graph

    src = resolve_base(str(model), flag="--model")
    family = base_family(src)
    hw = tuple(resolution) if resolution else DEFAULT_RESOLUTION[family]
    unet_cfg = read_unet_config(src)  # every check before anything is loaded
    check_memory(plan_shapes([hw], None, 1, "off", size_multiple(len(unet_cfg["block_out_channels"]))), unet_cfg)
    check_replaceable(Path(out), marker="export.json")
    if Path(out).exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")

    bar = progress(1 + 2 * len(XL_COMPONENTS if family in ("sdxl", "ssd1b") else COMPONENTS), "export", enabled=show_progress)
    bar.set_description_str(f"load {model}")
    pipe = load_pipeline(src)
    bar.update()
    try:
        with atomic_dir(out, force=force, marker="export.json") as tmp:
            refs = References(pipe)
            plans = plan_shapes([hw], None, 1, "off", size_multiple(len(unet_cfg["block_out_channels"])))
            comps = export_pipeline(pipe, tmp, hw, bar=bar,
                                    check=lambda comp, path: verify_graph(comp, path, refs, plans, "the exported graph"))
            rec = {"model": str(model), "family": family, "components": comps, "versions": tool_versions(),
                   "fusion": read_fusion(src.path) if src.path else {}}
            write_json(tmp / "export.json", rec)
    except OSError as exc:
        raise disk_error(exc, out) from None
    finally:
        bar.close()
    for c in comps.values():
        c["parity"] = c["parity"][0]
    return rec
