"""Attention fusion for ONNX Runtime CPU UNets: every attention fused, outputs unchanged, weights
read from the data file in place, and a failing fusion falls back to the plain graph."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lcm_export.build import engine as build_engine_mod
from lcm_export.build import ort_fusion
from lcm_export.export import export_component


@pytest.fixture(scope="module")
def unet_external(tmp_path_factory, demo_pipe):
    """The tiny UNet exported, then re-saved with every weight in model.onnx.data (as large UNets are)."""
    d = tmp_path_factory.mktemp("fusion")
    path = export_component("unet", demo_pipe, d, (64, 64))
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_every_attention_fused_outputs_unchanged(unet_external, demo_pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the weights must be found from the model's folder, not the caller's
    dst, counts = ort_fusion.fuse_attention(unet_external)
    assert os.getcwd() == str(tmp_path)
    n_attn = sum(1 for name, _ in demo_pipe.unet.named_modules() if name.endswith(".attn1"))
    n_cross = sum(1 for name, _ in demo_pipe.unet.named_modules() if name.endswith(".attn2"))
    assert n_attn > 0 and counts == {"Attention": n_attn, "MultiHeadAttention": n_cross}

    graph = onnx.load(str(dst), load_external_data=False)
    assert not [n for n in graph.graph.node if n.op_type == "Softmax"]  # nothing left unfused
    external = {e.value for t in graph.graph.initializer if t.data_location == t.EXTERNAL
                for e in t.external_data if e.key == "location"}
    assert external == {"model.onnx.data"}  # unchanged weights stay in the exported data file
    assert dst.stat().st_size < (unet_external.parent / "model.onnx.data").stat().st_size

    rng = np.random.default_rng(3)
    dim = demo_pipe.unet.config.cross_attention_dim
    for batch, (h, w) in ((1, (8, 8)), (2, (8, 12))):
        feed = {"sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
                "timestep": np.array([999, 259][:batch], dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, dim), dtype=np.float32)}
        want = _run(unet_external, feed)
        got = _run(dst, feed)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_optimizer_class_restored_after_fusion(unet_external):
    import onnx_model_unet  # noqa: F401 — importable once onnxruntime.transformers.optimizer ran

    before = onnx_model_unet.FusionAttentionUnet
    ort_fusion.fuse_attention(unet_external, dst_name="again.onnx")
    assert onnx_model_unet.FusionAttentionUnet is before


def test_failed_fusion_falls_back_to_the_plain_graph(unet_external, monkeypatch):
    def broken(path):
        raise ValueError("optimizer exploded\nsecond line")

    monkeypatch.setattr(ort_fusion, "fuse_attention", broken)
    extra = {}
    graph, rec = build_engine_mod._fuse_attention(unet_external, extra)
    assert graph == unet_external
    assert rec == {"applied": False, "reason": "ValueError: optimizer exploded"}
    assert extra["notes"] == ["unet attention fusion skipped (ValueError: optimizer exploded); engine built without it"]

    monkeypatch.setattr(ort_fusion, "fuse_attention", lambda path: (path, {"Attention": 0, "MultiHeadAttention": 0}))
    extra = {}
    graph, rec = build_engine_mod._fuse_attention(unet_external, extra)
    assert graph == unet_external and rec["applied"] is False and "no attention" in extra["notes"][0]
