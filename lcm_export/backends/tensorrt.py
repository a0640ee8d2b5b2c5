"""TensorRT engines through Polygraphy's API (never a CLI): fp16, optimisation profiles, a timing
cache shared across builds, a refittable option, and an fp32 VAE decoder when fp16 overflows.

Everything that can be decided without TensorRT is a pure function here (``build_plan``) and is
tested on CPU machines; the functions that import TensorRT run only where it and a CUDA GPU exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..shapes import ShapePlan, component_profiles
from . import rebuild_hint

NAME = "tensorrt"
PRECISIONS = ("fp16", "fp32")
SPEED_RANK = {"fp16": 0, "fp32": 0}
VERIFY_IN_BUILD = False  # parity is ONNX vs PyTorch; benchmarks/gpu_check.py checks the engines on a GPU

INSTALL_HINT = ("install TensorRT on a machine with an NVIDIA GPU: pip install 'lcm-export[tensorrt]' "
                "--extra-index-url https://pypi.nvidia.com (or use --backend onnxruntime)")
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default: good engines without hour-long builds


def status() -> tuple[bool, str, str]:
    ok, why = tensorrt_status()
    return ok, "cuda", "ok" if ok else f"{why}; {INSTALL_HINT}"


def default_precision(device: str, cpu_bf16: bool) -> str:
    return "fp16"


def entry_settings(threads: int | None, device: str) -> dict:
    return {}


def build_component(job) -> dict:
    """One engine per shape plan (text encoders: one for all), fp16 VAE rebuilt in fp32 on overflow."""
    import tensorrt as trt

    dims = job.dims
    items = build_plan([job.component], job.plans, dims["text_dim"], job.precision, job.vae_fp32, job.refit,
                       dims["latent_channels"], dims["pooled_dim"])
    if "tensorrt" not in job.section:
        job.section.update({"tensorrt": trt.__version__, **gpu_info(), "builds": []})
    cache = timing_cache_path(job.store_root, trt.__version__, job.section.get("compute_capability", "unknown"))
    job.section["timing_cache"] = str(cache)
    for item in items:
        build_engine_file(job.onnx, job.out_dir / item["file"], item, cache)
        if item["component"] == "vae_decoder" and item["fp16"] and job.sample_feeds:
            if not engine_outputs_finite(job.out_dir / item["file"], job.sample_feeds):
                item["fp16"] = False
                item["fp32_reason"] = "fp16 overflow (non-finite output) detected after build"
                build_engine_file(job.onnx, job.out_dir / item["file"], item, cache)
    job.section["builds"] += items
    fp16 = [i["fp16"] for i in items]
    return {"engines": {i["plan"]: i["file"] for i in items}, "files": [i["file"] for i in items],
            "precision": "fp16" if all(fp16) else ("fp32" if not any(fp16) else "mixed"),
            "parity_note": "ONNX vs PyTorch fp32; run benchmarks/gpu_check.py for TensorRT fp16 parity"}


def check(manifest: dict, engine_dir: Path) -> list[str]:
    check_tensorrt_compat(manifest, engine_dir)
    return []


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    return TrtEngine(path, engine_dir)


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT imports and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        pass
    return True, "ok"


def build_plan(components: list[str], plans: list[ShapePlan], text_dim: int, precision: str,
               vae_fp32: bool = False, refit: bool = False, latent_channels: int = 4,
               pooled_dim: int | None = None) -> list[dict]:
    """What to build: one engine per (component, shape plan) with its profile and flags. Pure.

    Text encoders do not depend on the image size, so each gets one engine (covering every plan's
    batch range). The VAE decoder is fp32 when asked (``vae_fp32``); fp16 overflow is handled after
    the build by ``build_tensorrt`` (checked on real data, rebuilt in fp32).
    """
    out = []
    for comp in components:
        text = comp.startswith("text_encoder")
        comp_plans = plans[:1] if text else plans
        for plan in comp_plans:
            prof = component_profiles(plan, text_dim, latent_channels, pooled_dim)[comp]
            if text:
                lo = min(p.unet_batch[0] for p in plans)
                hi = max(p.unet_batch[2] for p in plans)
                opt = plans[0].unet_batch[1]
                prof = {"input_ids": ((lo, 77), (opt, 77), (hi, 77))}
            fp16 = precision == "fp16" and not (comp == "vae_decoder" and vae_fp32)
            name = "all" if text else plan.name
            out.append({
                "component": comp, "plan": name, "file": f"{comp}/{name}.plan",
                "fp16": fp16, "refittable": refit,
                "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in prof.items()},
                "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL,
            })
    return out


def timing_cache_path(store_root: Path, trt_version: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU architecture, shared by all entries of a store."""
    return store_root / ".timing-cache" / f"trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {}


def build_engine_file(onnx_path: Path, out_path: Path, item: dict, timing_cache: Path) -> None:
    """Build one engine with Polygraphy and save it (TensorRT + CUDA required)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, p in item["profile"].items():
        profile.add(name, min=p["min"], opt=p["opt"], max=p["max"])
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        fp16=item["fp16"], refittable=item["refittable"], profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        builder_optimization_level=item["builder_optimization_level"],
    )
    network = network_from_onnx_path(str(onnx_path))
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    if engine is None:
        raise UserError(f"TensorRT could not build {item['file']} from {onnx_path} (see TensorRT's log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, path=str(out_path))


def engine_outputs_finite(engine_path: Path, feeds: dict) -> bool:
    """Run an engine once on ``feeds`` (numpy) and say whether every output is finite."""
    import numpy as np
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        outputs = runner.infer(feeds)
    return all(np.isfinite(np.asarray(v)).all() for v in outputs.values())


class TrtEngine:
    """A TensorRT plan run through TensorRT's API with Polygraphy's CUDA helpers.

    Device buffers are allocated once per input shape and reused; for static shapes the enqueue is
    captured once into a CUDA graph and replayed (falls back to plain enqueue if capture fails).
    """

    def __init__(self, path: Path, engine_dir: Path, use_cuda_graph: bool = True):
        import tensorrt as trt
        from polygraphy import cuda

        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {rebuild_hint(engine_dir)}")
        self.trt, self.cuda = trt, cuda
        logger = trt.Logger(trt.Logger.ERROR)
        with open(path, "rb") as f, trt.Runtime(logger) as runtime:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"engine file {path} could not be deserialized (corrupt, or built by another TensorRT); {rebuild_hint(engine_dir)}")
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
                        f"{rebuild_hint(engine_dir)}")
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    import ctypes

    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    here = f"{major.value}.{minor.value}"
    if built.get("compute_capability") not in (None, here):
        raise UserError(f"{engine_dir} was built for GPU compute capability {built.get('compute_capability')}, this GPU is {here}; "
                        f"{rebuild_hint(engine_dir)}")
