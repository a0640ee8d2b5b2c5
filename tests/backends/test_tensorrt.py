"""TensorRT: the build plan as a pure function (runs everywhere); real builds only with TensorRT + CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcm_export.core.shapes import plan_shapes
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

    from lcm_export.builder.export import export_pipeline
    from lcm_export.sources.demo import build_demo_pipeline

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


@pytest.mark.parametrize("cfg", [False, True])
def test_step_graph_ops_are_in_tensorrt_parser_list(cfg):
    from lcm_export.core.step_graph import lcm_step_onnx

    data = json.loads((Path(__file__).parents[2] / "lcm_export" / "data" / "trt_onnx_ops.json").read_text())
    m = lcm_step_onnx(cfg)
    ops = {n.op_type for n in m.graph.node}
    assert {"Gather", "Div", "Max", "Min"} <= ops and ("Split" in ops) == cfg
    assert ops <= set(data["supported"]) and not ops & set(data["restrictions_relevant_here"])
    assert data["opset_range"][0] <= m.opset_import[0].version <= data["opset_range"][1]


@needs_trt[0]
@needs_trt[1]
def test_tensorrt_fp16_build_and_parity(tmp_path, base_dir):
    """On a GPU machine: build fp16 engines for the tiny model and compare with ORT fp32."""
    import numpy as np

    from lcm_export.builder.build_engine import BuildOptions, build_engine
    from lcm_export.runtime import LCMPipeline

    trt_dir = tmp_path / "trt"
    ort_dir = tmp_path / "ort"
    build_engine(BuildOptions(base=str(base_dir), resolutions=((64, 64),), engine_dir=str(trt_dir), backend="tensorrt", show_progress=False))
    build_engine(BuildOptions(base=str(base_dir), resolutions=((64, 64),), engine_dir=str(ort_dir), backend="onnxruntime", show_progress=False))
    trt_pipe = LCMPipeline.from_engine_dir(trt_dir)
    a = trt_pipe("a photo", output_type="np")
    b = LCMPipeline.from_engine_dir(ort_dir)("a photo", output_type="np")
    mse = float(np.mean((a - b) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-12)) >= 30
    # the device loop (latents on the GPU) against the host loop on the same engines
    for guidance in (1.0, 4.0):
        (unet,) = trt_pipe.engines["unet"].values()
        assert set(unet.lcm_step) == {False, True}
        trt_pipe.device_loop = True
        on_device = trt_pipe("a photo", guidance=guidance, output_type="np")
        trt_pipe.device_loop = False
        on_host = trt_pipe("a photo", guidance=guidance, output_type="np")
        np.testing.assert_allclose(on_device, on_host, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# Build configuration per TensorRT major version (pure)

def _item(fp16=True, refit=False):
    return {"fp16": fp16, "refittable": refit, "builder_optimization_level": 3}


def test_build_config_tensorrt10_weakly_typed_fp16_flag():
    from lcm_export.backends.tensorrt import build_config

    cfg = build_config(_item(fp16=True), "10.15.1.29")
    assert cfg == {"onnx": "fp32", "strongly_typed": False,
                   "config": {"fp16": True, "tf32": False, "refittable": False, "builder_optimization_level": 3}}
    fp32 = build_config(_item(fp16=False, refit=True), "10.0.1")
    assert fp32["config"]["fp16"] is False and fp32["config"]["tf32"] is True and fp32["config"]["refittable"] is True


@pytest.mark.parametrize("version", ["11.4.0", "11.1.0.106", "12.0.0"])
def test_build_config_tensorrt11_strongly_typed_fp16_graph(version):
    """TensorRT 11 has no fp16 flag: Polygraphy's CreateConfig(fp16=...) fails there, so the key must be absent."""
    from lcm_export.backends.tensorrt import build_config

    cfg = build_config(_item(fp16=True), version)
    assert cfg["onnx"] == "fp16" and cfg["strongly_typed"] and "fp16" not in cfg["config"]
    assert cfg["config"]["tf32"] is False
    vae32 = build_config(_item(fp16=False), version)  # the fp32 VAE fallback: the fp32 graph, TF32 allowed
    assert vae32["onnx"] == "fp32" and vae32["strongly_typed"] and vae32["config"] == {
        "tf32": True, "refittable": False, "builder_optimization_level": 3}


def test_build_config_rejects_old_or_unreadable_versions():
    from lcm_export.backends.tensorrt import build_config
    from lcm_export.errors import UserError

    with pytest.raises(UserError, match="too old"):
        build_config(_item(), "8.6.1")
    with pytest.raises(UserError, match="cannot read"):
        build_config(_item(), "unknown")


def test_pyproject_pins_untested_majors():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"tensorrt>=10.0,<12"' in text and '"polygraphy>=0.49,<0.55"' in text


def test_fp16_onnx_keeps_fp32_io_and_matches(tmp_path, demo_pipe):
    """The TensorRT 11 fp16 graph: fp16 weights, fp32 inputs/outputs; ONNX Runtime runs it close to fp32."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from lcm_export.backends.tensorrt import fp16_onnx
    from lcm_export.builder.components import sample_inputs
    from lcm_export.builder.export import export_component

    src = export_component("unet", demo_pipe, tmp_path, (64, 64))
    dst = fp16_onnx(src, src.with_name("model.fp16.onnx"))
    m = onnx.load(str(dst), load_external_data=False)
    f32 = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == f32 for v in list(m.graph.input) + list(m.graph.output))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    assert not [t.name for t in m.graph.initializer if t.data_type == f32 and len(t.dims) > 1]
    feeds = sample_inputs("unet", demo_pipe, 1, (64, 64), seed=1)
    a = ort.InferenceSession(str(src)).run(None, feeds)[0]
    b = ort.InferenceSession(str(dst)).run(None, feeds)[0]
    assert b.dtype == np.float32 and np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2


# ----------------------------------------------------------------------------------------------
# TensorRT's writes on a disk that fills up (issue 19): the one-line disk error, no temp file left.
# TensorRT cannot run here, so Polygraphy's build returns stand-in engine bytes; the write is ours.

def test_engine_write_to_a_full_disk_is_the_one_line_disk_error(small_disk, tmp_path, monkeypatch):
    import polygraphy.backend.trt as ptrt

    from lcm_export.backends.tensorrt import build_engine_file
    from lcm_export.errors import UserError

    monkeypatch.setattr(ptrt, "network_from_onnx_path", lambda *a, **k: "network")
    monkeypatch.setattr(ptrt, "CreateConfig", lambda **k: "config")
    monkeypatch.setattr(ptrt, "engine_bytes_from_network", lambda *a, **k: bytes(2 << 20))  # a 2 MiB "engine"
    disk = small_disk(1 << 20)
    out = disk / ".E.partial-1-abc" / "unet" / "512x512.plan"
    item = {"file": "unet/512x512.plan", "profile": {"sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}}}
    with pytest.raises(UserError) as info:
        build_engine_file(tmp_path / "model.onnx", out, item, tmp_path / "cache" / "t.cache", {"strongly_typed": False, "config": {}})
    msg = str(info.value)
    assert msg.startswith(f"no space left on device while writing {disk / 'E' / 'unet' / '512x512.plan'}") and "\n" not in msg
    assert list(out.parent.iterdir()) == []  # the partial .tmp is gone


def test_fp16_graph_write_to_a_full_disk_is_the_one_line_disk_error(small_disk, tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from lcm_export.backends.tensorrt import fp16_onnx
    from lcm_export.errors import UserError

    w = numpy_helper.from_array(np.ones((512, 1024), np.float32), "w")  # 2 MiB of fp32, 1 MiB in fp16
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1024])], [w])
    src = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    disk = small_disk(512 << 10)
    with pytest.raises(UserError, match="no space left on device while writing .*model.fp16.onnx"):
        fp16_onnx(src, disk / "model.fp16.onnx")


# ----------------------------------------------------------------------------------------------
# CUDA runtime lookup (pure but for folders)

def test_cuda_runtime_dirs_both_wheel_layouts(tmp_path):
    from lcm_export.backends.tensorrt import cuda_runtime_dirs, tensorrt_cuda_major

    s12, s13 = tmp_path / "a", tmp_path / "b"
    (s12 / "nvidia" / "cuda_runtime" / "lib").mkdir(parents=True)
    (s12 / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12").write_bytes(b"")
    (s13 / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (s13 / "nvidia" / "cu13" / "lib" / "libcudart.so.13").write_bytes(b"")
    (tmp_path / "c" / "nvidia" / "cu13" / "lib").mkdir(parents=True)  # no library inside: skipped
    sites = [s12, s13, tmp_path / "c"]
    assert cuda_runtime_dirs(sites) == [s13 / "nvidia/cu13/lib", s12 / "nvidia/cuda_runtime/lib"]
    assert cuda_runtime_dirs(sites, prefer=12)[0] == s12 / "nvidia/cuda_runtime/lib"
    assert tensorrt_cuda_major(["numpy", "tensorrt_cu13_libs", "tensorrt"]) == 13
    assert tensorrt_cuda_major(["tensorrt-cu12-bindings"]) == 12 and tensorrt_cuda_major(["tensorrt"]) is None


def test_cuda_graphs_off_by_default():
    from lcm_export.backends.tensorrt import cuda_graphs_enabled

    assert not cuda_graphs_enabled({}) and not cuda_graphs_enabled({"LCM_EXPORT_CUDA_GRAPHS": "0"})
    assert cuda_graphs_enabled({"LCM_EXPORT_CUDA_GRAPHS": "1"})


# ----------------------------------------------------------------------------------------------
# Profile validation (pure)

UNET_PROFILE = {"sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]},
                "timestep": {"min": [1], "opt": [1], "max": [1]},
                "encoder_hidden_states": {"min": [1, 77, 32], "opt": [1, 77, 32], "max": [1, 77, 32]}}


def _unet_feeds(b=1, h=8, w=8):
    import numpy as np

    return {"sample": np.zeros((b, 4, h, w), np.float32), "timestep": np.zeros((b,), np.float32),
            "encoder_hidden_states": np.zeros((b, 77, 32), np.float32)}


@pytest.mark.parametrize("feeds,needle", [
    (_unet_feeds(b=2), "batch 2 is outside the built range 1..1"),  # guidance on an entry built with --guidance off
    (_unet_feeds(h=16), "4x16x8 (after the batch) is outside the built 4x8x8"),
])
def test_check_feeds_one_line_errors(feeds, needle):
    from lcm_export.backends.tensorrt import check_feeds
    from lcm_export.errors import UserError

    check_feeds(UNET_PROFILE, _unet_feeds(), "unet engine")
    with pytest.raises(UserError) as e:
        check_feeds(UNET_PROFILE, feeds, "unet engine")
    assert needle in str(e.value) and "\n" not in str(e.value) and "rebuild" in str(e.value)


def test_entry_profile_from_manifest(tmp_path):
    from lcm_export.backends.tensorrt import entry_profile

    m = {"tensorrt": {"builds": [{"file": "unet/8x8.plan", "profile": UNET_PROFILE}]}}
    assert entry_profile(m, tmp_path, tmp_path / "unet" / "8x8.plan") == UNET_PROFILE
    assert entry_profile(m, tmp_path, tmp_path / "vae_decoder" / "8x8.plan") is None


# ----------------------------------------------------------------------------------------------
# TrtEngine's control flow against stubs of TensorRT's objects (nothing here runs TensorRT)

class _StubTrt:
    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    def __init__(self):
        self.nptype_calls = 0

    def nptype(self, dt):
        self.nptype_calls += 1
        return dt


class _StubCuda:
    """Device arrays as host arrays keyed by a fake pointer; reading ``.dtype`` fails the test."""

    def __init__(self):
        self.memory = {}
        self.freed = 0
        self.to_device = self.to_host = 0

    def Stream(self):
        cuda = self

        class Stream:
            ptr = 7

            def synchronize(self):
                pass

            def free(self):
                cuda.freed += 1

        return Stream()

    def DeviceArray(self, shape, dtype):
        import numpy as np

        cuda = self

        class DeviceArray:
            def __init__(self):
                self.shape, self._np = shape, np.zeros(shape, dtype)
                self.ptr = 1000 + len(cuda.memory)
                cuda.memory[self.ptr] = self._np

            @property
            def dtype(self):
                raise AssertionError("DeviceArray.dtype read: Polygraphy 0.53 warns on every call")

            def copy_from(self, host, stream=None):
                assert host.dtype == self._np.dtype and host.shape == self._np.shape
                self._np[...] = host
                cuda.to_device += 1

            def copy_to(self, host, stream=None):
                host[...] = self._np
                cuda.to_host += 1

            def free(self):
                cuda.freed += 1

        return DeviceArray()


class _StubContext:
    def __init__(self, fail=None):
        self.fail, self.shapes, self.addr, self.calls = fail or set(), {}, {}, 0
        self.memory = None

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return "set_input_shape" not in self.fail

    def get_tensor_shape(self, name):
        return self.shapes.get(name, self.shapes["x"])

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return "set_tensor_address" not in self.fail

    def execute_async_v3(self, stream):
        self.calls += 1
        if "execute_async_v3" in self.fail:
            return False
        self.memory[self.addr["y"]][...] = 2 * self.memory[self.addr["x"]]
        return True


class _StubEngine:
    num_io_tensors = 2

    def __init__(self, ctx):
        self.ctx = ctx

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, n):
        return "in" if n == "x" else "out"

    def get_tensor_dtype(self, n):
        import numpy as np

        return np.float16 if n == "x" else np.float32

    def create_execution_context(self):
        return self.ctx


def _stub_engine(fail=None, graphs=False, lib=None):
    from lcm_export.backends.tensorrt import TrtEngine

    trt, cuda, ctx = _StubTrt(), _StubCuda(), _StubContext(fail)
    ctx.memory = cuda.memory
    profile = {"x": {"min": [1, 3], "opt": [1, 3], "max": [2, 3]}}
    eng = TrtEngine.from_engine(_StubEngine(ctx), trt, cuda, profile, "unet engine", use_cuda_graph=graphs, cudart=lib)
    return eng, trt, cuda, ctx


def test_trt_engine_runs_with_cached_dtypes():
    import numpy as np

    eng, trt, cuda, ctx = _stub_engine()
    for _ in range(3):
        (y,) = eng.run_all({"x": np.ones((2, 3), np.float32)})
    assert y.dtype == np.float32 and (y == 2).all()
    assert trt.nptype_calls == 2  # once per tensor at load, never per call
    assert eng.dtypes == {"x": np.dtype(np.float16), "y": np.dtype(np.float32)}
    eng.close()
    assert cuda.freed == 2  # its two buffers; the stream is the process's, shared by every engine


@pytest.mark.parametrize("fail", ["set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_trt_engine_checks_every_return_value(fail):
    import numpy as np

    from lcm_export.errors import UserError

    eng, *_ = _stub_engine(fail={fail})
    with pytest.raises(UserError, match=f"unet engine: TensorRT {fail}"):
        eng.run_all({"x": np.ones((1, 3), np.float32)})


def test_trt_engine_validates_profile_before_the_gpu():
    import numpy as np

    from lcm_export.errors import UserError

    eng, _, cuda, ctx = _stub_engine()
    with pytest.raises(UserError, match="batch 3 is outside the built range 1..2"):
        eng.run_all({"x": np.ones((3, 3), np.float32)})
    assert ctx.calls == 0 and not cuda.memory


class _StubCudart:
    """cudart's graph calls as the CUDA 12/13 runtime takes them; records what was called."""

    def __init__(self, instantiate_rc=0):
        self.log, self.instantiate_rc = [], instantiate_rc

    def cudaStreamBeginCapture(self, stream, mode):
        self.log.append(("begin", mode))
        return 0

    def cudaStreamEndCapture(self, stream, pgraph):
        pgraph._obj.value = 42
        self.log.append("end")
        return 0

    def cudaGraphInstantiate(self, pexec, graph, flags, *extra):
        assert not extra and isinstance(flags, __import__("ctypes").c_ulonglong)  # three arguments since CUDA 12
        pexec._obj.value = 99
        self.log.append("instantiate")
        return self.instantiate_rc

    def cudaGraphLaunch(self, exe, stream):
        self.log.append("launch")
        return 0

    def cudaGraphDestroy(self, graph):
        self.log.append("destroy graph")

    def cudaGraphExecDestroy(self, exe):
        self.log.append("destroy exec")

    def cudaGetLastError(self):
        return 0

    def cudaEventCreate(self, pev):
        pev._obj.value = 500 + len(self.log)
        self.log.append("event")
        return 0

    def cudaEventRecord(self, ev, stream):
        return 0

    def cudaEventElapsedTime(self, pms, a, b):
        pms._obj.value = float(b.value - a.value)  # "ms" between the stub's event numbers
        return 0

    def cudaEventDestroy(self, ev):
        self.log.append("destroy event")


def test_cuda_graph_warmup_then_capture_then_replay_and_destroy():
    import numpy as np

    lib = _StubCudart()
    eng, _, _, ctx = _stub_engine(graphs=True, lib=lib)
    x = {"x": np.ones((1, 3), np.float32)}
    eng.run_all(x)  # warm-up: plain enqueue, nothing captured
    assert ctx.calls == 1 and lib.log == []
    eng.run_all(x)  # capture (thread-local mode = 1) and launch
    assert lib.log == [("begin", 1), "end", "instantiate", "destroy graph", "launch"]
    eng.run_all(x)
    assert lib.log[-1] == "launch" and ctx.calls == 2  # replayed: no new enqueue
    eng.close()
    assert lib.log[-1] == "destroy exec" and not eng.graphs


def test_cuda_graph_discarded_when_enqueue_fails_during_capture():
    import numpy as np

    lib = _StubCudart()
    eng, _, _, ctx = _stub_engine(graphs=True, lib=lib)
    x = {"x": np.ones((1, 3), np.float32)}
    eng.run_all(x)
    ctx.fail = {"execute_async_v3"}
    from lcm_export.errors import UserError

    with pytest.raises(UserError, match="execute_async_v3"):  # the plain enqueue after the failed capture fails too
        eng.run_all(x)
    assert "instantiate" not in lib.log and "destroy graph" in lib.log
    assert not eng.graphs and eng.use_cuda_graph is False


def test_cuda_graph_instantiate_failure_falls_back_to_plain_enqueue():
    import numpy as np

    lib = _StubCudart(instantiate_rc=1)
    eng, _, _, ctx = _stub_engine(graphs=True, lib=lib)
    x = {"x": np.ones((1, 3), np.float32)}
    eng.run_all(x)
    (y,) = eng.run_all(x)
    assert (y == 2).all() and "destroy exec" in lib.log and not eng.graphs and not eng.use_cuda_graph


def test_trt_engine_serialises_threads():
    import threading

    import numpy as np

    eng, *_ = _stub_engine()
    other, *_ = _stub_engine()
    assert eng._lock is other._lock  # one lock for the one stream every engine enqueues on
    outs = []
    ts = [threading.Thread(target=lambda v=v: outs.append((v, eng.run({"x": np.full((1, 3), v, np.float32)})))) for v in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all((y == 2 * v).all() for v, y in outs) and len(outs) == 8


# ----------------------------------------------------------------------------------------------
# Device-resident calls (the device loop's side of TrtEngine), against the same stubs

def test_run_device_binds_device_buffers_and_copies_nothing_back():
    import numpy as np

    eng, _, cuda, ctx = _stub_engine()
    dev = eng.device
    x = dev.upload(np.full((2, 3), 1.5, np.float16), dev.empty((2, 3), np.float16))
    y = dev.empty((2, 3), np.float32)
    before = (cuda.to_device, cuda.to_host)
    got = eng.run_device({"x": x}, out={"y": y})
    assert got["y"] is y and ctx.addr == {"x": x.ptr, "y": y.ptr}
    assert (cuda.to_device, cuda.to_host) == before  # bound by pointer: no copy either way
    assert (cuda.memory[y.ptr] == 3).all()
    assert (dev.download(y) == 3).all() and cuda.to_host == before[1] + 1
    (host,) = eng.run_all({"x": x})  # run_all takes a device input too, and returns host arrays
    assert (host == 3).all() and ctx.addr["x"] == x.ptr


def test_run_device_refuses_mismatched_device_buffers():
    import numpy as np

    from lcm_export.errors import EngineError, UserError

    eng, _, _, ctx = _stub_engine()
    dev = eng.device
    with pytest.raises(EngineError, match="device buffer for 'x' is float32 .* needs float16"):
        eng.run_device({"x": dev.empty((1, 3), np.float32)})
    x = dev.empty((1, 3), np.float16)
    with pytest.raises(EngineError, match="device buffer for 'y'"):
        eng.run_device({"x": x}, out={"y": dev.empty((2, 3), np.float32)})
    with pytest.raises(UserError, match="batch 3 is outside the built range"):
        eng.run_device({"x": dev.empty((3, 3), np.float16)})
    assert ctx.calls == 0
    with pytest.raises(EngineError, match="does not fit"):
        dev.view(x, (2, 3))
    big = dev.empty((2, 3), np.float16)
    view = dev.view(big, (1, 3))
    assert (view.ptr, view.shape, view.owner) == (big.ptr, (1, 3), None)
    with pytest.raises(EngineError, match="download of a device view"):
        dev.download(view)


def test_cuda_graphs_are_per_buffer_addresses():
    """Ping-pong buffers give two address sets: each is warmed up and captured on its own (a graph
    replays the addresses it captured)."""
    import numpy as np

    lib = _StubCudart()
    eng, _, _, ctx = _stub_engine(graphs=True, lib=lib)
    dev = eng.device
    x = dev.upload(np.ones((1, 3), np.float16), dev.empty((1, 3), np.float16))
    outs = [dev.empty((1, 3), np.float32), dev.empty((1, 3), np.float32)]
    for i in range(6):
        eng.run_device({"x": x}, out={"y": outs[i % 2]})
    assert len(eng.graphs) == 2 and lib.log.count("instantiate") == 2 and ctx.calls == 4  # 2 warm-ups + 2 captures


def test_device_events_time_gpu_work_and_are_destroyed():
    lib = _StubCudart()
    eng, *_ = _stub_engine(lib=lib)
    marks = [eng.device.mark() for _ in range(3)]
    times = eng.device.elapsed(marks)
    assert len(times) == 2 and all(t > 0 for t in times) and lib.log.count("destroy event") == 3


def test_lcm_step_plan_follows_the_unet_profile():
    from lcm_export.backends.tensorrt import lcm_step_plan
    from lcm_export.core.step_graph import COEF

    def unet(lo, opt, hi):
        return {"file": "unet/512x512.plan", "plan": "512x512", "builder_optimization_level": 3,
                "profile": {"sample": {"min": [lo, 4, 64, 64], "opt": [opt, 4, 64, 64], "max": [hi, 4, 64, 64]}}}

    auto = lcm_step_plan([unet(1, 1, 2)])  # --guidance auto, batch 1: UNet batch 1..2
    assert [(i["cfg"], i["file"]) for i in auto] == [(False, "unet/512x512.lcm_step.plan"), (True, "unet/512x512.lcm_step_cfg.plan")]
    plain, cfg = auto
    assert plain["profile"]["sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64], "max": [2, 4, 64, 64]}
    assert cfg["profile"]["sample"]["max"] == [1, 4, 64, 64] and cfg["profile"]["model_output"]["min"] == [2, 4, 64, 64]
    assert cfg["profile"]["coef"]["opt"] == [len(COEF)] and cfg["profile"]["vae_affine"]["max"] == [3, 4, 1, 1]
    assert all(i["fp16"] is False and i["role"] == "lcm_step" and i["for"] == "unet/512x512.plan" for i in auto)
    assert [i["cfg"] for i in lcm_step_plan([unet(1, 1, 1)])] == [False]  # --guidance off: no guided step engine
    on = lcm_step_plan([unet(2, 4, 8)])  # --guidance on, batch 1..4
    assert on[1]["profile"]["noise"] == {"min": [1, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [4, 4, 64, 64]}


def test_step_items_found_beside_their_unet_engine(tmp_path):
    from lcm_export.backends.tensorrt import step_items_for

    m = {"tensorrt": {"builds": [{"file": "unet/a.plan"}, {"file": "unet/a.lcm_step.plan", "role": "lcm_step", "for": "unet/a.plan"},
                                 {"file": "unet/b.lcm_step.plan", "role": "lcm_step", "for": "unet/b.plan"}]}}
    assert [i["file"] for i in step_items_for(m, tmp_path, tmp_path / "unet" / "a.plan")] == ["unet/a.lcm_step.plan"]
    assert step_items_for({"tensorrt": {"builds": [{"file": "unet/a.plan"}]}}, tmp_path, tmp_path / "unet" / "a.plan") == []


def test_refit_keeps_the_step_engines(tmp_path):
    """A refit drops every file of a component it re-derives; the TensorRT refit writes the UNet engines
    anew and links the weightless LCM step engines back from the previous entry."""
    from lcm_export.backends.tensorrt import relink_weightless

    prev, new = tmp_path / "prev", tmp_path / "new"
    files = ["unet/a.plan", "unet/a.lcm_step.plan", "unet/a.lcm_step_cfg.plan"]
    for f in files:
        (prev / f).parent.mkdir(parents=True, exist_ok=True)
        (prev / f).write_bytes(f.encode())
    (new / "unet").mkdir(parents=True)
    (new / "unet" / "a.plan").write_bytes(b"refitted")
    record = {"engines": {"a": "unet/a.plan"}, "files": files}
    assert relink_weightless(record, prev, new) == files[1:]
    assert [(new / f).read_bytes() for f in files] == [b"refitted", files[1].encode(), files[2].encode()]
