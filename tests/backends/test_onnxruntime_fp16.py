"""ONNX Runtime fp16 for the CUDA provider (issue 22), checked without a GPU: the conversion is pure graph
work, so its structure is checked on the graphs it writes (ONNX Runtime's fused ops present, fp16 weights,
fp32 inputs and outputs, the declared fp32 islands fp32), and its numerics in ONNX Runtime's CPU provider
against PyTorch fp32 with the CUDA-only fusions left out (the fused contrib ops have no CPU kernels). The
registry picks it on CUDA machines without TensorRT and refuses it, in one line, where there is no CUDA
provider. None of this runs the CUDA provider: see the README for what is unverified."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from lcm_export.store.manifest import refit_source_dir
from lcm_export import backends
from lcm_export.backends import onnxruntime as ort_backend
from lcm_export.backends.onnxruntime_fp16 import CUDA_ONLY_FUSIONS, convert, fp32_island
from lcm_export.builder.components import decoder_probe_inputs, run_module, sample_inputs, wrappers
from lcm_export.errors import UserError
from lcm_export.builder.verify import rel_l2

CPU_ONLY = {"onnxruntime": (True, "cpu", "ok"), "openvino": (True, "cpu", "ok"),
            "tensorrt": (False, "cuda", "TensorRT is not installed; install it")}
CUDA_ORT = {**CPU_ONLY, "onnxruntime": (True, "cuda", "ok")}
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")


@pytest.fixture(scope="module")
def fp16_graphs(demo_engine, tmp_path_factory):
    """Each exported component of the demo entry converted as a CUDA fp16 entry stores it: {comp: (path, record)}."""
    out = tmp_path_factory.mktemp("fp16")
    return {c: (out / c / "model.onnx", convert(refit_source_dir(demo_engine) / c / "model.onnx", out / c / "model.onnx", c))
            for c in COMPONENTS}


def _types(model) -> dict[str, int]:
    """Element type of every tensor the graph declares (inputs, outputs, value_info, initializers, Constant outputs)."""
    g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    out.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            out[n.output[0]] = next(a.t.data_type for a in n.attribute if a.name == "value")
    return out


@pytest.mark.parametrize("comp", COMPONENTS)
def test_fp16_graph_is_fused_fp16_inside_and_fp32_at_the_edges(demo_engine, fp16_graphs, comp):
    path, rec = fp16_graphs[comp]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    exported = onnx.load(str(refit_source_dir(demo_engine) / comp / "model.onnx"), load_external_data=False)
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
    assert io(model) == io(exported)  # same names, fp32 (and int32 ids) in and out: keep_io_types

    ops = Counter(n.op_type for n in model.graph.node)
    assert rec["fused_ops"] == {op: n for op, n in rec["fused_ops"].items() if ops[op] == n} and rec["precision"] == "fp16"
    want = {"unet": ("MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv",
                     "SkipLayerNormalization"),
            "vae_decoder": ("GroupNorm", "SkipGroupNorm", "NhwcConv"),
            "text_encoder": ("SkipLayerNormalization", "QuickGelu")}[comp]
    assert all(ops[op] > 0 for op in want), {op: ops[op] for op in want}
    if comp == "unet":  # ORT's SD fusion: every attention into MultiHeadAttention, none left as Softmax
        assert ops["Softmax"] == 0 and ops["Attention"] == 0 and ops["MultiHeadAttention"] == 12

    types = _types(model)
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    floats = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    fp32 = [t for t in floats if t.data_type == TensorProto.FLOAT]
    island = set(rec["fp32_nodes"])
    # the only fp32 weights left: GroupNorm's gamma/beta (ORT's kernel takes them in fp32) and the islands'
    assert all(all(c.op_type in ("GroupNorm", "SkipGroupNorm") or c.name in island for c in consumers[t.name]) for t in fp32)
    size = lambda ts: sum(int(np.prod(t.dims)) for t in ts)  # noqa: E731
    assert size(fp32) < 0.05 * size(floats)
    for n in model.graph.node:  # the fused ops compute in fp16 (their first input: the activation)
        if n.op_type in ("MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "SkipLayerNormalization"):
            assert types.get(n.input[0]) == TensorProto.FLOAT16, (n.op_type, n.name)


def test_the_timestep_embedding_stays_fp32(fp16_graphs):
    """The sinusoid of t·freq for t up to 999: its nodes, and the constants they read, stay fp32 (fp16 would put
    the phase off by up to 0.25 rad); the cast to fp16 comes only after it, before the time embedding's Gemm."""
    path, rec = fp16_graphs["unet"]
    model = onnx.load(str(path))
    types, by_name = _types(model), {n.name: n for n in model.graph.node}
    island = [by_name[n] for n in rec["fp32_nodes"]]
    assert {"Sin", "Cos", "Mul", "Constant"} <= {n.op_type for n in island}
    for n in island:
        for t in [*n.input, *n.output]:
            assert types.get(t, TensorProto.FLOAT) in (TensorProto.FLOAT, TensorProto.INT64), (n.name, t)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in island:  # every float input of the island is fp32 at its source: no fp16 -> fp32 round trip
        for t in n.input:
            p = producer.get(t)
            assert p is None or p.op_type != "Cast" or types.get(p.input[0]) != TensorProto.FLOAT16, (n.name, t)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and any(producer.get(i) and producer[i].op_type == "Cast"
                                                                           and producer[i].input[0] in {o for m in island for o in m.output}
                                                                           for i in n.input))
    assert types[gemm.output[0]] == TensorProto.FLOAT16


def test_sdxl_islands_cover_the_time_ids_embedding(tmp_path):
    from lcm_export.sources.demo import build_demo_pipeline
    from lcm_export.builder.export import export_component

    pipe = build_demo_pipeline("sdxl")
    src = export_component("unet", pipe, tmp_path / "export", (64, 64))
    rec = convert(src, tmp_path / "fp16" / "unet" / "model.onnx", "unet")
    island = rec["fp32_nodes"]
    for proj in ("time_proj", "add_time_proj"):
        assert {f"/unet/{proj}/Sin", f"/unet/{proj}/Cos", f"/unet/{proj}/Mul"} <= set(island), island
    assert rec["fused_ops"]["MultiHeadAttention"] > 0


def _cpu_session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("comp", COMPONENTS)
def test_fp16_conversion_numerics_on_cpu_against_pytorch_fp32(demo_engine, fused_pipe, tmp_path, comp, monkeypatch):
    """The same conversion with the CUDA-only fusions left out runs on ORT's CPU provider: its output is within
    fp16's error of PyTorch fp32 (and not bit-equal: the weights really are fp16). The UNet's island matters:
    without it the error is several times larger (t = 999 included)."""
    rec = convert(refit_source_dir(demo_engine) / comp / "model.onnx", tmp_path / "a" / "model.onnx", comp, cuda_fusions=False)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node)
    assert not any(ops[op] for op in CUDA_ONLY_OPS) and rec["fusions"] == "cpu-capable"
    feeds = decoder_probe_inputs(fused_pipe, 2, (64, 64)) if comp == "vae_decoder" else sample_inputs(comp, fused_pipe, 2, (64, 64), 7)
    if comp == "unet":
        feeds["timestep"] = np.array([999.0, 259.0], np.float32)
    want = run_module(wrappers(fused_pipe)[comp], feeds)[0]
    err = rel_l2(_cpu_session(tmp_path / "a" / "model.onnx").run(None, feeds)[0], want)
    assert 1e-5 < err < 5e-3, err  # measured 8e-4 to 1.0e-3 on the demo
    if comp == "unet":
        import lcm_export.backends.onnxruntime_fp16 as fp16

        monkeypatch.setattr(fp16, "fp32_island", lambda model, *a, **k: [])
        convert(refit_source_dir(demo_engine) / comp / "model.onnx", tmp_path / "b" / "model.onnx", comp, cuda_fusions=False)
        without = rel_l2(_cpu_session(tmp_path / "b" / "model.onnx").run(None, feeds)[0], want)
        assert without > 2 * err, (without, err)  # measured 3.7e-3 against 8e-4


def test_cuda_only_fusion_options_are_the_ones_left_out():
    from lcm_export.backends.onnxruntime_fp16 import fusion_options

    cuda, cpu = fusion_options("unet"), fusion_options("unet", cuda_fusions=False)
    assert all(getattr(cuda, k) for k in CUDA_ONLY_FUSIONS) and not any(getattr(cpu, k) for k in CUDA_ONLY_FUSIONS)
    assert cpu.enable_attention and cpu.enable_skip_layer_norm
    fp32_unet = fusion_options("unet", fp16=False)  # ORT's tool: no packed QKV/KV kernels in fp32
    assert not fp32_unet.enable_packed_qkv and not fp32_unet.enable_packed_kv and fp32_unet.enable_group_norm


def test_island_walk_stops_at_the_first_matmul():
    from onnx import helper

    nodes = [helper.make_node("Constant", [], ["f"], name="c", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Mul", ["timestep", "f"], ["m"], name="mul"),
             helper.make_node("Sin", ["m"], ["s"], name="sin"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="mm"),
             helper.make_node("Relu", ["y"], ["out"], name="after")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1])])
    assert fp32_island(helper.make_model(g)) == ["mul", "sin", "c"]


# ---------------------------------------------------------------------------------------------
# The backend: build record, choices, refusals

def test_build_component_for_a_cuda_entry_without_a_gpu(demo_engine, tmp_path):
    """build_component with a CUDA section converts (no GPU needed), writes the LCM step graphs beside the UNet and
    records what it did; a VAE that must stay fp32 is fused but not converted."""
    section = ort_backend.entry_settings(2, "cuda")
    assert section["cuda_provider_options"]["arena_extend_strategy"] == "kSameAsRequested"
    assert section["cuda_graphs"]["components"] == ["unet", "vae_decoder", "lcm_step"]
    job = lambda comp, vae_fp32=False: backends.ComponentJob(  # noqa: E731
        comp, refit_source_dir(demo_engine) / comp / "model.onnx", tmp_path, [], "fp16", {}, section, vae_fp32=vae_fp32)
    unet = ort_backend.build_component(job("unet"))
    assert unet["precision"] == "fp16" and unet["graph"]["fused_ops"]["MultiHeadAttention"] == 12
    assert unet["lcm_step"] == {"plain": "unet/lcm_step.onnx", "cfg": "unet/lcm_step_cfg.onnx"}
    assert sorted(unet["files"]) == ["unet/lcm_step.onnx", "unet/lcm_step_cfg.onnx", "unet/model.onnx"]
    assert all((tmp_path / f).is_file() for f in unet["files"])
    assert section["runtime_optimization"] == "ORT_ENABLE_ALL" and "fp16" in section["stored_optimization"]
    vae = ort_backend.build_component(job("vae_decoder", vae_fp32=True))
    assert vae["precision"] == "fp32" and "fp32_reason" in vae and vae["graph"]["fused_ops"]["GroupNorm"] > 0
    assert all(t.data_type != TensorProto.FLOAT16 for t in onnx.load(str(tmp_path / "vae_decoder" / "model.onnx")).graph.initializer)
    assert not ort_backend.converts_to_fp16("vae_decoder", "fp16", True) and ort_backend.converts_to_fp16("vae_decoder", "fp16", False)
    assert not ort_backend.converts_to_fp16("unet", "fp32", False)

    cpu_job = backends.ComponentJob("unet", refit_source_dir(demo_engine) / "unet" / "model.onnx", tmp_path / "cpu", [], "fp16", {},
                                    ort_backend.entry_settings(2, "cpu"))
    with pytest.raises(UserError, match="no fast fp16 kernels"):
        ort_backend.build_component(cpu_job)
    assert not (tmp_path / "cpu").exists()


def test_auto_on_a_cuda_machine_without_tensorrt_is_onnxruntime_fp16():
    c = backends.choose("auto", "auto", cpu_bf16=True, statuses=CUDA_ORT)
    assert (c.backend, c.device, c.precision) == ("onnxruntime", "cuda", "fp16")
    assert backends.choose("auto", "fp16", cpu_bf16=False, statuses=CUDA_ORT).backend == "onnxruntime"
    assert backends.choose("onnxruntime", "auto", cpu_bf16=False, statuses=CUDA_ORT).precision == "fp16"
    assert backends.choose("onnxruntime", "fp32", cpu_bf16=False, statuses=CUDA_ORT).precision == "fp32"
    with_trt = {**CUDA_ORT, "tensorrt": (True, "cuda", "ok")}
    assert backends.choose("auto", "auto", cpu_bf16=True, statuses=with_trt).backend == "tensorrt"
    # CPU machines are unchanged: fp32 (or bf16) on the fastest CPU backend, and ORT's auto precision is fp32
    assert backends.choose("onnxruntime", "auto", cpu_bf16=True, statuses=CPU_ONLY).precision == "fp32"


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_fp16_without_a_cuda_provider_is_one_line(backend):
    with pytest.raises(UserError) as e:
        backends.choose(backend, "fp16", cpu_bf16=True, statuses=CPU_ONLY)
    msg = str(e.value)
    assert "\n" not in msg and "--precision fp16" in msg
    assert ("no fast fp16 kernels" in msg) if backend == "onnxruntime" else ("onnxruntime with its CUDA provider" in msg)


def test_build_engine_refuses_fp16_on_this_cpu_before_building(tmp_path):
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    if ort_backend.cuda_available():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    with pytest.raises(UserError, match="no fast fp16 kernels"):
        build_engine(BuildOptions(backend="onnxruntime", precision="fp16", engine_dir=str(tmp_path / "e"), show_progress=False))
    assert not (tmp_path / "e").exists()


def test_an_fp16_entry_is_refused_without_a_cuda_provider(demo_engine, tmp_path, monkeypatch):
    from lcm_export.runtime import LCMPipeline
    from lcm_export.store.manifest import read_manifest

    d = tmp_path / "entry"
    shutil.copytree(demo_engine, d)
    m = read_manifest(d)
    m["components"]["unet"]["precision"] = "fp16"
    monkeypatch.setattr(ort_backend, "cuda_available", lambda: False)
    with pytest.raises(UserError) as e:
        ort_backend.check(m, d)
    assert "\n" not in str(e.value) and "no fast fp16 kernels" in str(e.value) and "onnxruntime-gpu" in str(e.value)
    monkeypatch.setattr(ort_backend, "cuda_available", lambda: True)
    assert ort_backend.check(m, d) == []  # the CUDA provider exists: no objection
    assert LCMPipeline.from_engine_dir(d) is not None  # the CPU entry itself (fp32) is untouched


def test_cuda_provider_options_and_graph_sessions():
    from lcm_export.backends.onnxruntime_runtime import CUDA_PROVIDER_OPTIONS, providers_for

    (name, opts), cpu = providers_for("cuda", {"device_id": 0}, True)
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["enable_cuda_graph"] == "1" and opts["device_id"] == "0" and opts["use_tf32"] == "0"
    assert set(CUDA_PROVIDER_OPTIONS) <= set(opts) and all(isinstance(v, str) for v in opts.values())
    assert providers_for("cuda", None, False)[0][1]["enable_cuda_graph"] == "0"
    assert providers_for("cpu", {"device_id": 0}, True) == ["CPUExecutionProvider"]


def test_load_engine_picks_the_device_engine_only_with_a_cuda_provider(demo_engine, monkeypatch):
    from lcm_export.backends.onnxruntime_runtime import OrtDeviceEngine
    from lcm_export.store.manifest import read_manifest

    m = read_manifest(demo_engine)
    path = demo_engine / m["components"]["unet"]["engines"]["*"]
    assert isinstance(ort_backend.load_engine(m, demo_engine, "unet", path), ort_backend.OrtEngine)  # a CPU entry
    cuda_m = {**m, "onnxruntime": {**m["onnxruntime"], "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}
    monkeypatch.setattr(ort_backend, "cuda_available", lambda: False)
    assert isinstance(ort_backend.load_engine(cuda_m, demo_engine, "unet", path), ort_backend.OrtEngine)  # no provider here
    seen = {}

    def fake(manifest, engine_dir, component, p, threads, device, graphs):
        seen.update(device=device, graphs=graphs)
        return SimpleNamespace()

    monkeypatch.setattr(ort_backend, "cuda_available", lambda: True)
    monkeypatch.setattr(ort_backend, "load_device_engine", fake)
    monkeypatch.setenv("LCM_EXPORT_CUDA_GRAPHS", "1")
    ort_backend.load_engine(cuda_m, demo_engine, "unet", path)
    assert seen == {"device": "cuda", "graphs": True}
    ort_backend.load_engine(cuda_m, demo_engine, "text_encoder", path)
    assert seen == {"device": "cuda", "graphs": False}  # text encoders: no graphs
    monkeypatch.delenv("LCM_EXPORT_CUDA_GRAPHS")
    ort_backend.load_engine(cuda_m, demo_engine, "unet", path)
    assert seen["graphs"] is False  # off until a GPU run validates them
    assert OrtDeviceEngine  # the class the real path builds (tests/backends/test_onnxruntime_device.py drives it on CPU)
