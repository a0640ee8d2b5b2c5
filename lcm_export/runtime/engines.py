"""One small engine protocol and one class per backend: ONNX Runtime and TensorRT.

An engine takes a dict of numpy inputs and returns its first output as numpy. Loading checks the
manifest: a TensorRT plan only runs on the TensorRT version and GPU architecture it was built for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UserError


class Engine(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output."""

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the graph's order."""


def _rebuild_hint(engine_dir: Path) -> str:
    return f"rebuild it with `lcm-export build-engine --engine-dir {engine_dir} --force`"


class OrtEngine:
    """An ONNX Runtime session over a stored graph. CPU: plain run; CUDA: IO binding."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, opt_level: str = "ORT_ENABLE_ALL",
                 engine_dir: Path | None = None, allow_spinning: bool = False):
        import onnxruntime as ort

        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {_rebuild_hint(engine_dir or path.parent.parent)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        if not allow_spinning:  # idle sessions must not spin on the cores the next one needs
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        use = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=use)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/… types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"engine file {path} is corrupt or truncated ({first}); {_rebuild_hint(engine_dir or path.parent.parent)}") from None
        self.providers = self.session.get_providers()
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds, self.outputs[:1])[0]

    def run_all(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        names = names or self.outputs
        if not self.on_cuda:
            return self.session.run(names, feeds)
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class TrtEngine:
    """A TensorRT plan run through TensorRT's API with Polygraphy's CUDA helpers.

    Device buffers are allocated once per input shape and reused; for static shapes the enqueue is
    captured once into a CUDA graph and replayed (falls back to plain enqueue if capture fails).
    """

    def __init__(self, path: Path, engine_dir: Path, use_cuda_graph: bool = True):
        import tensorrt as trt
        from polygraphy import cuda

        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {_rebuild_hint(engine_dir)}")
        self.trt, self.cuda = trt, cuda
        logger = trt.Logger(trt.Logger.ERROR)
        with open(path, "rb") as f, trt.Runtime(logger) as runtime:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"engine file {path} could not be deserialized (corrupt, or built by another TensorRT); {_rebuild_hint(engine_dir)}")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.buffers: dict[tuple, dict[str, object]] = {}
        self.graphs: dict[tuple, object] = {}
        self.use_cuda_graph = use_cuda_graph

    def _buffers_for(self, shapes: tuple) -> dict:
        if shapes not in self.buffers:
            bufs = {}
            for name, shape in zip(self.inputs, shapes):
                self.context.set_input_shape(name, shape)
            for name in self.inputs + self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
                bufs[name] = self.cuda.DeviceArray(shape=shape, dtype=dtype)
            self.buffers[shapes] = bufs
        return self.buffers[shapes]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes = tuple(tuple(feeds[n].shape) for n in self.inputs)
        bufs = self._buffers_for(shapes)
        for name, shape in zip(self.inputs, shapes):
            self.context.set_input_shape(name, shape)
            bufs[name].copy_from(np.ascontiguousarray(feeds[name], dtype=bufs[name].dtype), stream=self.stream)
        for name, buf in bufs.items():
            self.context.set_tensor_address(name, buf.ptr)
        if not self._replay(shapes):
            self.context.execute_async_v3(self.stream.ptr)
        hosts = []
        for name in self.outputs:
            out = bufs[name]
            host = np.empty(out.shape, dtype=out.dtype)
            out.copy_to(host, stream=self.stream)
            hosts.append(host)
        self.stream.synchronize()
        return hosts

    def _replay(self, shapes: tuple) -> bool:
        """Launch a captured CUDA graph for these shapes (capturing it on first use)."""
        if not self.use_cuda_graph:
            return False
        lib = self.cuda.wrapper().handle
        import ctypes

        if shapes not in self.graphs:
            graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
            if lib.cudaStreamBeginCapture(ctypes.c_void_p(self.stream.ptr), 0) != 0:
                self.use_cuda_graph = False
                return False
            self.context.execute_async_v3(self.stream.ptr)
            ok = lib.cudaStreamEndCapture(ctypes.c_void_p(self.stream.ptr), ctypes.byref(graph)) == 0
            ok = ok and lib.cudaGraphInstantiate(ctypes.byref(exe), graph, None, None, 0) == 0
            if not ok:
                self.use_cuda_graph = False
                return False
            self.graphs[shapes] = exe
        return lib.cudaGraphLaunch(self.graphs[shapes], ctypes.c_void_p(self.stream.ptr)) == 0


def check_tensorrt_compat(manifest: dict, engine_dir: Path) -> None:
    """The plan's TensorRT version and GPU compute capability must match this machine's."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"{engine_dir} holds TensorRT engines but TensorRT is not installed here; install "
                        "lcm-export[tensorrt] on a GPU machine, or build an ONNX Runtime entry (--backend onnxruntime)") from None
    built = manifest.get("tensorrt", {})
    if built.get("tensorrt") != trt.__version__:
        raise UserError(f"{engine_dir} was built with TensorRT {built.get('tensorrt')}, this machine has {trt.__version__}; "
                        f"{_rebuild_hint(engine_dir)}")
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    import ctypes

    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    here = f"{major.value}.{minor.value}"
    if built.get("compute_capability") not in (None, here):
        raise UserError(f"{engine_dir} was built for GPU compute capability {built.get('compute_capability')}, this GPU is {here}; "
                        f"{_rebuild_hint(engine_dir)}")


def load_engines(manifest: dict, engine_dir: Path, threads: int | None = None) -> dict[str, dict[str, Engine]]:
    """{component: {plan name or '*': engine}} for an entry."""
    backend = manifest["backend"]
    out: dict[str, dict[str, Engine]] = {}
    if backend == "onnxruntime":
        ort_cfg = manifest.get("onnxruntime", {})
        providers = ort_cfg.get("providers", ["CPUExecutionProvider"])
        threads = threads or int(os.environ.get("LCM_EXPORT_THREADS", 0)) or ort_cfg.get("intra_op_threads")
        level = ort_cfg.get("runtime_optimization", "ORT_ENABLE_ALL")
        built_isa = ort_cfg.get("cpu_isa")
        if built_isa:
            from .._cpu import cpu_isa

            here = cpu_isa()
            if here != built_isa:
                raise UserError(f"{engine_dir} holds ONNX Runtime graphs optimized for {built_isa} CPUs; this CPU is {here}; "
                                f"{_rebuild_hint(engine_dir)}")
        spin = bool(ort_cfg.get("allow_spinning", False))
        for comp, c in manifest["components"].items():
            out[comp] = {plan: OrtEngine(engine_dir / f, providers, threads, level, engine_dir, spin) for plan, f in c["engines"].items()}
    elif backend == "tensorrt":
        check_tensorrt_compat(manifest, engine_dir)
        for comp, c in manifest["components"].items():
            out[comp] = {plan: TrtEngine(engine_dir / f, engine_dir) for plan, f in c["engines"].items()}
    else:
        raise UserError(f"{engine_dir}: unknown backend {backend!r} in the manifest; {_rebuild_hint(engine_dir)}")
    return out
