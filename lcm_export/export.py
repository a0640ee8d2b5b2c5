"""torch -> ONNX for the text encoder, UNet and VAE decoder, each checked against PyTorch in ONNX Runtime.

Exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` (TorchScript-based).
Measured here with torch 2.13 on 2 CPU cores: it exports the tiny demo UNet in ~1 s against ~28 s
for the dynamo exporter (opset 20; ~2 min for the SD 1.5 UNet), its dynamic batch/height/width axes
work, and every op it emits is in the TensorRT 10 ONNX parser's support list (see
``data/trt_onnx_ops.json``). Dynamo at opset 17 produced an invalid graph (``Split`` with
``num_outputs``). Its one drawback — one external-data file per weight for graphs over 2 GB — is
undone here: weights are re-saved into a single ``model.onnx.data`` beside the graph when the model
exceeds 2 GB (when torch writes external data at all), streamed tensor by tensor.

I/O (B batch, H x W image, h = H/8, w = W/8, D text width: 768 for SD 1.5, 2048 for SDXL):

    SD 1.5
    text_encoder    input_ids int32 [B,77]                    -> last_hidden_state float32 [B,77,D]
    unet            sample float32 [B,4,h,w], timestep float32 [B],
                    encoder_hidden_states float32 [B,77,D]    -> out_sample float32 [B,4,h,w] (noise prediction)
    vae_decoder     latent float32 [B,4,h,w] (already / scaling_factor) -> images float32 [B,3,H,W] in ~[-1,1]

    SDXL / SSD-1B (D = D1 + D2; the penultimate hidden states, as SDXL uses them)
    text_encoder    input_ids int32 [B,77]                    -> hidden_states float32 [B,77,D1]
    text_encoder_2  input_ids int32 [B,77]                    -> hidden_states float32 [B,77,D2], text_embeds float32 [B,P]
    unet            as SD 1.5, plus text_embeds float32 [B,P] (pooled) and time_ids float32 [B,6]
                    (original H, W, crop top, left, target H, W)
    vae_decoder     as SD 1.5
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from .shapes import LATENT_FACTOR, TEXT_LEN

OPSET = 17
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
XL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def components_for(pipe) -> tuple[str, ...]:
    return XL_COMPONENTS if is_xl(pipe) else COMPONENTS


def model_dims(pipe) -> dict:
    """Widths the ONNX I/O depends on: UNet text width D, each text encoder's width, pooled width P."""
    dims = {"text_dim": int(pipe.unet.config.cross_attention_dim), "latent_channels": int(pipe.unet.config.in_channels),
            "te_dims": {"text_encoder": int(pipe.text_encoder.config.hidden_size)}, "pooled_dim": None, "xl": is_xl(pipe)}
    if dims["xl"]:
        dims["te_dims"]["text_encoder_2"] = int(pipe.text_encoder_2.config.hidden_size)
        dims["pooled_dim"] = int(pipe.text_encoder_2.config.projection_dim)
    return dims


def component_io(comp: str, dims: dict) -> dict:
    """Input/output names, dtypes and symbolic dims of one exported component (documented above)."""
    lat = ["B", dims["latent_channels"], "H/8", "W/8"]
    ids = [["input_ids", "int32", ["B", TEXT_LEN]]]
    if comp == "text_encoder" and not dims["xl"]:
        return {"inputs": ids, "outputs": [["last_hidden_state", "float32", ["B", TEXT_LEN, dims["text_dim"]]]]}
    if comp == "text_encoder":
        return {"inputs": ids, "outputs": [["hidden_states", "float32", ["B", TEXT_LEN, dims["te_dims"]["text_encoder"]]]]}
    if comp == "text_encoder_2":
        return {"inputs": ids, "outputs": [["hidden_states", "float32", ["B", TEXT_LEN, dims["te_dims"]["text_encoder_2"]]],
                                           ["text_embeds", "float32", ["B", dims["pooled_dim"]]]]}
    if comp == "unet":
        ins = [["sample", "float32", lat], ["timestep", "float32", ["B"]],
               ["encoder_hidden_states", "float32", ["B", TEXT_LEN, dims["text_dim"]]]]
        if dims["xl"]:
            ins += [["text_embeds", "float32", ["B", dims["pooled_dim"]]], ["time_ids", "float32", ["B", 6]]]
        return {"inputs": ins, "outputs": [["out_sample", "float32", lat]]}
    if comp == "vae_decoder":
        return {"inputs": [["latent", "float32", lat]], "outputs": [["images", "float32", ["B", 3, "H", "W"]]]}
    raise KeyError(comp)


def _wrappers(pipe):
    import torch

    class TextEncoder(torch.nn.Module):
        """SD 1.5: the last hidden state. SDXL: the penultimate one (+ the pooled projection for encoder 2)."""

        def __init__(self, te, penultimate: bool, pooled: bool):
            super().__init__()
            self.te, self.penultimate, self.pooled = te, penultimate, pooled

        def forward(self, input_ids):
            out = self.te(input_ids.to(torch.int64), output_hidden_states=self.penultimate, return_dict=True)
            hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
            return (hidden, out.text_embeds) if self.pooled else hidden

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    xl = is_xl(pipe)
    out = {"text_encoder": TextEncoder(pipe.text_encoder, xl, False).eval(), "unet": UNet(pipe.unet).eval(),
           "vae_decoder": VaeDecoder(pipe.vae).eval()}
    if xl:
        out["text_encoder_2"] = TextEncoder(pipe.text_encoder_2, True, True).eval()
    return out


def text_dim(pipe) -> int:
    return int(pipe.unet.config.cross_attention_dim)


def sample_inputs(comp: str, pipe, batch: int, hw: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for one component at one shape (parity checks and tracing)."""
    rng = np.random.default_rng(seed)
    h, w = hw[0] // LATENT_FACTOR, hw[1] // LATENT_FACTOR
    c = int(pipe.unet.config.in_channels)
    if comp in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, comp)
        ids = rng.integers(0, int(te.config.vocab_size), size=(batch, TEXT_LEN), dtype=np.int32)
        ids[:, 0] = te.config.bos_token_id if te.config.bos_token_id is not None else 0
        return {"input_ids": ids}
    if comp == "unet":
        feeds = {"sample": rng.standard_normal((batch, c, h, w), dtype=np.float32),
                 "timestep": rng.integers(0, 1000, size=(batch,)).astype(np.float32),
                 "encoder_hidden_states": rng.standard_normal((batch, TEXT_LEN, text_dim(pipe)), dtype=np.float32)}
        if is_xl(pipe):
            feeds["text_embeds"] = rng.standard_normal((batch, int(pipe.text_encoder_2.config.projection_dim)), dtype=np.float32)
            feeds["time_ids"] = np.tile(np.array([hw[0], hw[1], 0, 0, hw[0], hw[1]], np.float32), (batch, 1))
        return feeds
    if comp == "vae_decoder":
        lc = int(pipe.vae.config.latent_channels)
        return {"latent": rng.standard_normal((batch, lc, h, w), dtype=np.float32)}
    raise KeyError(comp)


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

    module = _wrappers(pipe)[comp]
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


def parity(comp: str, pipe, onnx_path: Path | None, batch: int, hw: tuple[int, int], seed: int = 0, engine=None) -> dict:
    """Run ``engine`` (anything with ``run_all(feeds)``; default: the ONNX graph in ONNX Runtime on
    the CPU) and the PyTorch module on the same seeded inputs; the worst output is reported."""
    import torch

    feeds = sample_inputs(comp, pipe, batch, hw, seed=seed)
    if engine is None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
    else:
        got = engine.run_all(feeds)
    with torch.no_grad():
        want = _wrappers(pipe)[comp](*[torch.from_numpy(v) for v in feeds.values()])
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    checks = [compare(g, w) for g, w in zip(got, want)]  # every output; the worst is reported
    worst = max(checks, key=lambda c: c["rel_l2"])
    return worst | {"finite": all(c["finite"] for c in checks), "batch": batch, "resolution": f"{hw[0]}x{hw[1]}",
                    "shape": list(got[0].shape)}


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    if got.shape != want.shape:
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "finite": False}
    rel = float(np.linalg.norm(got64 - want64) / max(np.linalg.norm(want64), 1e-30))
    return {"rel_l2": rel, "max_abs": float(np.max(np.abs(got64 - want64))), "finite": bool(np.isfinite(got).all())}


def export_pipeline(pipe, out_dir: Path, hw: tuple[int, int], parity_resolutions=None, bar=None) -> dict:
    """Export every component (three for SD 1.5; four for SDXL / SSD-1B: two text encoders) into
    ``out_dir`` and check each; return the components record."""
    from ._util import progress

    bar = bar or progress(0, "", enabled=False)
    parity_resolutions = parity_resolutions or [hw]
    dims = model_dims(pipe)
    record = {}
    for comp in components_for(pipe):
        bar.set_description_str(f"export {comp}")
        try:
            path = export_component(comp, pipe, out_dir, hw)
        except OSError as exc:
            from ._util import disk_error

            raise disk_error(exc, out_dir / comp) from None
        from .refit import MAP_FILE, record_weight_map

        wmap = record_weight_map(_wrappers(pipe)[comp], comp, path)
        bar.update()
        bar.set_description_str(f"check {comp} in ONNX Runtime")
        checks = [parity(comp, pipe, path, 1, r) for r in (parity_resolutions if not comp.startswith("text_encoder") else parity_resolutions[:1])]
        bar.update()
        record[comp] = {"file": f"{comp}/{path.name}", "files": [f"{comp}/{n}" for n in onnx_files(path)] + [f"{comp}/{MAP_FILE}"],
                        "weight_map": {"file": f"{comp}/{MAP_FILE}", "mapped": len(wmap["weights"]), "unmapped": len(wmap["unmapped"])},
                        "opset": OPSET, "exporter": "torch.onnx (TorchScript, dynamo=False)",
                        **component_io(comp, dims), "parity": checks}
    return record


def export_model(model: str, out: str | Path, resolution=None, force: bool = False, show_progress: bool = True) -> dict:
    """``lcm-export export``: load ``model`` (fused folder, diffusers folder, hub id, demo:NAME) and export it."""
    from ._util import atomic_dir, progress, tool_versions, write_json
    from .fuse import read_fusion
    from .models import DEFAULT_RESOLUTION, base_family, load_pipeline, resolve_base

    from ._util import check_dir_path, disk_error
    from .errors import UserError
    from .models import read_unet_config
    from .shapes import check_memory, plan_shapes, size_multiple

    src = resolve_base(str(model), flag="--model")
    family = base_family(src)
    hw = tuple(resolution) if resolution else DEFAULT_RESOLUTION[family]
    unet_cfg = read_unet_config(src)  # every check before anything is loaded
    check_memory(plan_shapes([hw], None, 1, "off", size_multiple(len(unet_cfg["block_out_channels"]))), unet_cfg)
    check_dir_path(Path(out))
    if Path(out).exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")

    bar = progress(1 + 2 * len(XL_COMPONENTS if family in ("sdxl", "ssd1b") else COMPONENTS), "export", enabled=show_progress)
    bar.set_description_str(f"load {model}")
    pipe = load_pipeline(src)
    bar.update()
    try:
        with atomic_dir(out, force=force) as tmp:
            comps = export_pipeline(pipe, tmp, hw, bar=bar)
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
