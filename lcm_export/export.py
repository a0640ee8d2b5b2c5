"""torch -> ONNX for the text encoder, UNet and VAE decoder, each checked against PyTorch in ONNX Runtime.

Exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` (TorchScript-based).
Measured here with torch 2.13 on 2 CPU cores: it exports the tiny demo UNet in ~1 s against ~28 s
for the dynamo exporter (opset 20; ~2 min for the SD 1.5 UNet), its dynamic batch/height/width axes
work, and every op it emits is in the TensorRT 10 ONNX parser's support list (see
``data/trt_onnx_ops.json``). Dynamo at opset 17 produced an invalid graph (``Split`` with
``num_outputs``). Its one drawback — one external-data file per weight for graphs over 2 GB — is
undone here: weights are re-saved into a single ``model.onnx.data`` beside the graph when the model
exceeds 2 GB, and inlined otherwise.

I/O (B batch, H x W image, h = H/8, w = W/8, D text width: 768 for SD 1.5):

    text_encoder  input_ids int32 [B,77]                      -> last_hidden_state float32 [B,77,D]
    unet          sample float32 [B,4,h,w], timestep float32 [B],
                  encoder_hidden_states float32 [B,77,D]      -> out_sample float32 [B,4,h,w] (noise prediction)
    vae_decoder   latent float32 [B,4,h,w] (already / scaling_factor) -> images float32 [B,3,H,W] in ~[-1,1]
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from .build.profiles import LATENT_FACTOR, TEXT_LEN
from .errors import UserError

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; stay clear of it
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def component_io(comp: str, text_dim: int, latent_channels: int = 4) -> dict:
    """Input/output names, dtypes and symbolic dims of one exported component (documented above)."""
    lat = ["B", latent_channels, "H/8", "W/8"]
    return {
        "text_encoder": {"inputs": [["input_ids", "int32", ["B", TEXT_LEN]]],
                         "outputs": [["last_hidden_state", "float32", ["B", TEXT_LEN, text_dim]]]},
        "unet": {"inputs": [["sample", "float32", lat], ["timestep", "float32", ["B"]],
                            ["encoder_hidden_states", "float32", ["B", TEXT_LEN, text_dim]]],
                 "outputs": [["out_sample", "float32", lat]]},
        "vae_decoder": {"inputs": [["latent", "float32", lat]], "outputs": [["images", "float32", ["B", 3, "H", "W"]]]},
    }[comp]


def _wrappers(pipe):
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, te):
            super().__init__()
            self.te = te

        def forward(self, input_ids):
            return self.te(input_ids.to(torch.int64), return_dict=False)[0]

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return {"text_encoder": TextEncoder(pipe.text_encoder).eval(), "unet": UNet(pipe.unet).eval(),
            "vae_decoder": VaeDecoder(pipe.vae).eval()}


def text_dim(pipe) -> int:
    return int(pipe.text_encoder.config.hidden_size)


def sample_inputs(comp: str, pipe, batch: int, hw: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for one component at one shape (parity checks and tracing)."""
    rng = np.random.default_rng(seed)
    h, w = hw[0] // LATENT_FACTOR, hw[1] // LATENT_FACTOR
    c = int(pipe.unet.config.in_channels)
    if comp == "text_encoder":
        ids = rng.integers(0, int(pipe.text_encoder.config.vocab_size), size=(batch, TEXT_LEN), dtype=np.int32)
        ids[:, 0] = pipe.tokenizer.bos_token_id
        return {"input_ids": ids}
    if comp == "unet":
        return {"sample": rng.standard_normal((batch, c, h, w), dtype=np.float32),
                "timestep": rng.integers(0, 1000, size=(batch,)).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, TEXT_LEN, text_dim(pipe)), dtype=np.float32)}
    if comp == "vae_decoder":
        lc = int(pipe.vae.config.latent_channels)
        return {"latent": rng.standard_normal((batch, lc, h, w), dtype=np.float32)}
    raise KeyError(comp)


def _dynamic_axes(comp: str) -> dict:
    spatial = {0: "B", 2: "h", 3: "w"}
    return {
        "text_encoder": {"input_ids": {0: "B"}, "last_hidden_state": {0: "B"}},
        "unet": {"sample": spatial, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"}, "out_sample": spatial},
        "vae_decoder": {"latent": spatial, "images": {0: "B", 2: "H", 3: "W"}},
    }[comp]


def export_component(comp: str, pipe, out_dir: Path, hw: tuple[int, int], batch: int = 1) -> Path:
    """Export one component to ``out_dir/<comp>/model.onnx`` (+ ``model.onnx.data`` when > 2 GB)."""
    import onnx
    import torch

    module = _wrappers(pipe)[comp]
    io = component_io(comp, text_dim(pipe))
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
                dynamic_axes=_dynamic_axes(comp), do_constant_folding=True,
            )
        model = onnx.load(str(scratch / "model.onnx"))  # pulls in any per-weight external files
        final_dir.mkdir(parents=True, exist_ok=True)
        path = final_dir / "model.onnx"
        big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
        if big:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def onnx_files(path: Path) -> list[str]:
    """The graph file and its external-data file, if any (names relative to the graph's folder)."""
    names = [path.name]
    if (path.parent / (path.name + ".data")).exists():
        names.append(path.name + ".data")
    return names


def parity(comp: str, pipe, onnx_path: Path, batch: int, hw: tuple[int, int], seed: int = 0, session=None) -> dict:
    """Run the ONNX graph in ONNX Runtime (CPU) and the PyTorch module on the same seeded inputs."""
    import onnxruntime as ort
    import torch

    feeds = sample_inputs(comp, pipe, batch, hw, seed=seed)
    if session is None:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = _wrappers(pipe)[comp](*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    return compare(got, want) | {"batch": batch, "resolution": f"{hw[0]}x{hw[1]}", "shape": list(got.shape)}


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    if got.shape != want.shape:
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "finite": False}
    rel = float(np.linalg.norm(got64 - want64) / max(np.linalg.norm(want64), 1e-30))
    return {"rel_l2": rel, "max_abs": float(np.max(np.abs(got64 - want64))), "finite": bool(np.isfinite(got).all())}


def export_pipeline(pipe, out_dir: Path, hw: tuple[int, int], parity_resolutions=None, bar=None) -> dict:
    """Export all three components into ``out_dir`` and check each; return the components record."""
    from ._util import progress

    bar = bar or progress(0, "", enabled=False)
    parity_resolutions = parity_resolutions or [hw]
    dim = text_dim(pipe)
    record = {}
    for comp in COMPONENTS:
        bar.set_description_str(f"export {comp}")
        try:
            path = export_component(comp, pipe, out_dir, hw)
        except OSError as exc:
            from ._util import disk_error

            raise disk_error(exc, out_dir / comp) from None
        bar.update()
        bar.set_description_str(f"check {comp} in ONNX Runtime")
        checks = [parity(comp, pipe, path, 1, r) for r in (parity_resolutions if comp != "text_encoder" else parity_resolutions[:1])]
        bar.update()
        record[comp] = {"file": f"{comp}/{path.name}", "files": [f"{comp}/{n}" for n in onnx_files(path)],
                        "opset": OPSET, "exporter": "torch.onnx (TorchScript, dynamo=False)",
                        **component_io(comp, dim), "parity": checks}
    return record


def export_model(model: str, out: str | Path, resolution=None, force: bool = False, show_progress: bool = True) -> dict:
    """``lcm-export export``: load ``model`` (fused folder, diffusers folder, hub id, demo:NAME) and export it."""
    from ._util import atomic_dir, progress, tool_versions, write_json
    from .fuse import read_fusion
    from .models import DEFAULT_RESOLUTION, base_family, load_pipeline, resolve_base

    src = resolve_base(str(model))
    family = base_family(src)
    hw = tuple(resolution) if resolution else DEFAULT_RESOLUTION[family]
    from .build.profiles import size_multiple, validate_resolution

    bar = progress(1 + 2 * len(COMPONENTS), "export", enabled=show_progress)
    bar.set_description_str(f"load {model}")
    pipe = load_pipeline(src)
    validate_resolution(*hw, size_multiple(len(pipe.unet.config.block_out_channels)))
    bar.update()
    with atomic_dir(out, force=force) as tmp:
        comps = export_pipeline(pipe, tmp, hw, bar=bar)
        rec = {"model": str(model), "family": family, "components": comps, "versions": tool_versions(),
               "fusion": read_fusion(src.path) if src.path else {}}
        write_json(tmp / "export.json", rec)
    bar.close()
    for c in comps.values():
        c["parity"] = c["parity"][0]
    return rec
