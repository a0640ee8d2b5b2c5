"""TensorRT: the build plan as a pure function (runs everywhere); real builds only with TensorRT + CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcm_export.shapes import plan_shapes
from lcm_export.backends.tensorrt import build_plan, tensorrt_status, timing_cache_path

TRT_OK, TRT_WHY = tensorrt_status()
needs_trt = [pytest.mark.tensorrt, pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a CUDA GPU: {TRT_WHY}")]


def test_build_plan_static_two_resolutions():
    plans = plan_shapes([(512, 512), (768, 512)], None, 1, "auto", 64)
    items = build_plan(["text_encoder", "unet", "vae_decoder"], plans, 768, "fp16")
    assert [i["file"] for i in items] == [
        "text_encoder/all.plan", "unet/512x512.plan", "unet/768x512.plan", "vae_decoder/512x512.plan", "vae_decoder/768x512.plan"]
    unet768 = items[2]
    assert unet768["fp16"] and not unet768["refittable"]
    assert unet768["profile"]["sample"] == {"min": [1, 4, 96, 64], "opt": [1, 4, 96, 64], "max": [2, 4, 96, 64]}
    assert items[0]["profile"]["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [2, 77]}


def test_build_plan_vae_fp32_refit_dynamic():
    plans = plan_shapes([], ((256, 256), (1024, 1024)), 2, "on", 64)
    items = build_plan(["unet", "vae_decoder"], plans, 768, "fp16", vae_fp32=True, refit=True)
    unet, vae = items
    assert unet["fp16"] and not vae["fp16"] and unet["refittable"] and vae["refittable"]
    assert unet["file"] == "unet/dyn-256x256-1024x1024.plan"
    assert unet["profile"]["sample"]["min"] == [4, 4, 32, 32] and unet["profile"]["sample"]["max"] == [4, 4, 128, 128]
    assert vae["profile"]["latent"]["max"] == [2, 4, 128, 128]


def test_fp32_precision_plan():
    items = build_plan(["unet"], plan_shapes([(512, 512)], None, 1, "off", 64), 768, "fp32")
    assert not items[0]["fp16"]


def test_timing_cache_path_names_version_and_arch(tmp_path):
    p = timing_cache_path(tmp_path, "10.15.1", "9.0")
    assert p == tmp_path / ".timing-cache" / "trt10.15.1-sm90.cache"


def test_backend_tensorrt_without_tensorrt_fails_fast(capsys, tmp_path):
    if TRT_OK:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    from conftest import run_cli

    code, _, err = run_cli(["build-engine", "--backend", "tensorrt", "--engine-dir", tmp_path / "e", "--quiet"], capsys)
    assert code == 2 and "TensorRT is not installed" in err and "pip install" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_exported_ops_are_in_tensorrt_parser_list(demo_engine):
    """Static check: every op of the exported graphs (before ORT's own fusions) is one the TensorRT
    ONNX parser supports, for the TensorRT version named in the data file."""
    import onnx

    from lcm_export.export import export_pipeline
    from lcm_export.demo import build_demo_pipeline

    data = json.loads((Path(__file__).parents[2] / "lcm_export" / "data" / "trt_onnx_ops.json").read_text())
    supported = set(data["supported"])
    assert "onnx-tensorrt" in data["source"] and data["tensorrt_version"].startswith("10.")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        export_pipeline(build_demo_pipeline("sd15"), Path(d), (64, 64))
        for comp in ("text_encoder", "unet", "vae_decoder"):
            m = onnx.load(str(Path(d) / comp / "model.onnx"), load_external_data=False)
            ops = {n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx")}
            assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")], comp
            assert ops <= supported, f"{comp}: not in the TensorRT parser list: {sorted(ops - supported)}"
            opset = {o.domain: o.version for o in m.opset_import}[""]
            assert data["opset_range"][0] <= opset <= data["opset_range"][1]


@needs_trt[0]
@needs_trt[1]
def test_tensorrt_fp16_build_and_parity(tmp_path, base_dir):
    """On a GPU machine: build fp16 engines for the tiny model and compare with ORT fp32."""
    import numpy as np

    from lcm_export.build_engine import BuildOptions, build_engine
    from lcm_export.runtime import LCMPipeline

    trt_dir = tmp_path / "trt"
    ort_dir = tmp_path / "ort"
    build_engine(BuildOptions(base=str(base_dir), resolutions=((64, 64),), engine_dir=str(trt_dir), backend="tensorrt", show_progress=False))
    build_engine(BuildOptions(base=str(base_dir), resolutions=((64, 64),), engine_dir=str(ort_dir), backend="onnxruntime", show_progress=False))
    a = LCMPipeline.from_engine_dir(trt_dir)("a photo", output_type="np")
    b = LCMPipeline.from_engine_dir(ort_dir)("a photo", output_type="np")
    mse = float(np.mean((a - b) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-12)) >= 30
