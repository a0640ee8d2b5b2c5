"""The weight map (state-dict key -> ONNX initializer) and patching exported graphs, without TensorRT."""

from __future__ import annotations




import numpy as np
import pytest
import torch

from lcm_export.errors import UserError
from lcm_export.core.onnx_weights import new_initializers, patch_onnx, read_weight_map, targetable, trt_refit_plan


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_pipe):
    from lcm_export.builder.export import export_pipeline

    d = tmp_path_factory.mktemp("exp")
    rec = export_pipeline(demo_pipe, d, (64, 64))
    return d, rec


def test_every_lora_targetable_weight_maps_to_one_initializer(exported, demo_pipe):
    """What a LoRA can touch (every Linear/Conv weight in each exported graph) has exactly one initializer."""
    import onnx

    from lcm_export.builder.components import wrappers as _wrappers

    d, rec = exported
    wrappers = _wrappers(demo_pipe)
    for comp in ("text_encoder", "unet", "vae_decoder"):
        wmap = read_weight_map(d / comp)
        keys = set(targetable(wrappers[comp], comp))
        assert keys and set(wmap["weights"]) == keys and wmap["unmapped"] == []
        model = onnx.load(str(d / comp / "model.onnx"))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        sd = dict(getattr(demo_pipe, {"vae_decoder": "vae"}.get(comp, comp)).state_dict())
        names = [e["initializer"] for e in wmap["weights"].values()]
        assert len(names) == len(set(names))  # no two weights share an initializer
        for key, e in wmap["weights"].items():  # the recorded layout really holds the weight
            want = sd[key].numpy()
            got = inits[e["initializer"]]
            assert np.array_equal(got.T if e["transpose"] else got, want), key
        assert rec[comp]["weight_map"]["mapped"] == len(keys)


def test_patched_graph_equals_the_patched_module(exported, demo_pipe, tmp_path):
    """Scale some UNet weights in the graph (by the map) and in PyTorch: outputs agree as before."""
    import onnxruntime as ort

    from lcm_export.builder.components import sample_inputs, wrappers as _wrappers

    d, _ = exported
    wmap = read_weight_map(d / "unet")
    keys = sorted(wmap["weights"])[::3]
    sd = demo_pipe.unet.state_dict()
    new = {k: sd[k].numpy() * np.float32(1.25) + np.float32(0.01) for k in keys}
    changed = patch_onnx(d / "unet" / "model.onnx", tmp_path / "unet" / "model.onnx", new_initializers(wmap, new, keys))
    assert len(changed) == len(keys)
    feeds = sample_inputs("unet", demo_pipe, 2, (64, 64), seed=9)
    got = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    orig = {k: sd[k].clone() for k in keys}
    try:
        with torch.no_grad():
            for k in keys:
                sd[k].copy_(torch.from_numpy(new[k]))
            want = _wrappers(demo_pipe)["unet"](*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    finally:
        with torch.no_grad():
            for k in keys:
                sd[k].copy_(orig[k])
    before = ort.InferenceSession(str(d / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(got, want) < 1e-5 and rel(before, want) > 1e-2  # the patch took, and it is what PyTorch computes
    # unchanged weights are not reported as changed, and the source graph is untouched
    assert patch_onnx(d / "unet" / "model.onnx", tmp_path / "same" / "model.onnx", new_initializers(wmap, {k: sd[k].numpy() for k in keys}, keys)) == []


def test_patch_refuses_wrong_shapes_and_names(exported, tmp_path):
    d, _ = exported
    wmap = read_weight_map(d / "unet")
    key, e = next(iter(wmap["weights"].items()))
    with pytest.raises(UserError, match="rebuild with --no-refit"):
        patch_onnx(d / "unet" / "model.onnx", tmp_path / "x.onnx", {e["initializer"]: np.zeros((3, 3), np.float32)})
    with pytest.raises(UserError, match="no initializer"):
        patch_onnx(d / "unet" / "model.onnx", tmp_path / "x.onnx", {"nope": np.zeros((3,), np.float32)})
    with pytest.raises(UserError, match="cannot be refit"):
        new_initializers({**wmap, "weights": {}}, {key: np.zeros(1)}, [key])


def test_tensorrt_refit_plan_for_the_demo_loras(exported, demo_loras, demo_pipe):
    """The TensorRT refit plan of the demo LoRAs' modules: every touched weight has an engine weight name."""
    from lcm_export.builder.fuse import LoraSpec, fuse_into, inspect_lora
    from lcm_export.sources.demo import build_demo_pipeline

    d, _ = exported
    pipe = build_demo_pipeline("sd15")
    rec = fuse_into(pipe, [(LoraSpec(p, w), inspect_lora(p)) for p, w in demo_loras])
    for comp in ("unet", "text_encoder"):
        modules = sorted({m for l in rec["loras"] for m in l["modules"].get(comp, [])})
        if not modules:
            continue
        plan = trt_refit_plan(read_weight_map(d / comp), modules)
        assert len(plan) == len(modules) and all(p["engine_weight"] for p in plan)
    with pytest.raises(UserError, match="not a Linear/Conv layer"):
        trt_refit_plan(read_weight_map(d / "unet"), ["no.such.module"])
    wmap = read_weight_map(d / "unet")
    k = next(iter(wmap["weights"]))
    broken = {**wmap, "weights": {kk: v for kk, v in wmap["weights"].items() if kk != k}, "unmapped": [k]}
    with pytest.raises(UserError, match="maps to no ONNX initializer"):
        trt_refit_plan(broken, [k[: -len(".weight")]])


def test_patch_external_data_through_hard_links(exported, tmp_path):
    """Graphs over 2 GB keep their weights in external data; in a refit the data file has two hard links
    (old entry and temp folder). Patching must read it anyway and write a new file, never through the link."""
    import os

    import onnx
    import onnxruntime as ort

    d, _ = exported
    old = tmp_path / "old" / "unet"
    old.mkdir(parents=True)
    model = onnx.load(str(d / "unet" / "model.onnx"))
    with open(old / "model.onnx.data", "wb") as f:  # every float initializer to one external data file, as large graphs are
        for t in model.graph.initializer:
            if t.data_type != onnx.TensorProto.FLOAT:
                continue
            raw = onnx.numpy_helper.to_array(t).tobytes()
            offset = f.tell()
            f.write(raw)
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
    onnx.save_model(model, str(old / "model.onnx"))
    model = onnx.load(str(d / "unet" / "model.onnx"))  # the original, for reference values
    linked = tmp_path / "new" / "unet"
    linked.mkdir(parents=True)
    for f in ("model.onnx", "model.onnx.data"):
        os.link(old / f, linked / f)
    before = (old / "model.onnx.data").read_bytes()
    wmap = read_weight_map(d / "unet")
    key = sorted(wmap["weights"])[0]
    e = wmap["weights"][key]
    cur = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == e["initializer"]))
    changed = patch_onnx(old / "model.onnx", linked / "model.onnx", {e["initializer"]: cur * np.float32(2)})
    assert changed == [e["initializer"]]
    assert (old / "model.onnx.data").read_bytes() == before  # the old entry's file is untouched
    assert os.stat(linked / "model.onnx.data").st_nlink == 1 and os.stat(linked / "model.onnx").st_nlink == 1
    patched = onnx.load(str(linked / "model.onnx"))
    got = onnx.numpy_helper.to_array(next(t for t in patched.graph.initializer if t.name == e["initializer"]))
    assert np.array_equal(got, cur * np.float32(2))
    ort.InferenceSession(str(linked / "model.onnx"), providers=["CPUExecutionProvider"])  # loads and runs
