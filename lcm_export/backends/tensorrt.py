"""TensorRT engines through Polygraphy's API (never a CLI): fp16, optimisation profiles, a timing
cache shared across builds, a refittable option, and an fp32 VAE decoder when fp16 overflows.

Two TensorRT lines are supported (``build_config``):
- TensorRT 10: the exported fp32 ONNX, weakly typed, with the builder's fp16 flag;
- TensorRT 11: strong typing is always on and the fp16 flag is gone, so the precision lives in the
  graph: the fp32 ONNX is converted to fp16 with fp32 inputs/outputs (``fp16_onnx``).
fp32 engines allow TF32 on both (Polygraphy clears it unless asked).

Everything that can be decided without TensorRT is a pure function here (``build_plan``,
``build_config``, ``check_feeds``, ``cuda_runtime_dirs``) and is tested on CPU machines, as is
``TrtEngine``'s control flow against stub objects; the functions that import TensorRT run only where
it and a CUDA GPU exist. None of it has run on real TensorRT yet (see the README).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..shapes import ShapePlan, component_profiles
from . import rebuild_hint

NAME = "tensorrt"
PRECISIONS = ("fp16", "fp32")
SPEED_RANK = {"fp16": 0, "fp32": 0}
VERIFY_IN_BUILD = False  # parity is ONNX vs PyTorch; benchmarks/gpu_check.py checks the engines on a GPU
REFIT = True
"""Refit: engines built with --refit take new weights through TensorRT's refitter, fed the patched ONNX
(weights are named after the ONNX initializers); never run here (no TensorRT), the plan is unit-tested."""

INSTALL_HINT = ("install TensorRT on a machine with an NVIDIA GPU: pip install 'lcm-export[tensorrt]' "
                "--extra-index-url https://pypi.nvidia.com (or use --backend onnxruntime)")
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default: good engines without hour-long builds
TESTED_MAJORS = (10, 11)  # pyproject's tensorrt extra pins <12 to match
CUDA_GRAPHS_ENV = "LCM_EXPORT_CUDA_GRAPHS"  # "1" turns CUDA graphs on (off until a GPU run validates them)


def status() -> tuple[bool, str, str]:
    ok, why = tensorrt_status()
    return ok, "cuda", "ok" if ok else f"{why}; {INSTALL_HINT}"


def default_precision(device: str, cpu_bf16: bool) -> str:
    return "fp16"


def entry_settings(threads: int | None, device: str) -> dict:
    return {}


def refit_component(job, record: dict) -> dict:
    """New weights into the refittable engines of ``record``: TensorRT's ONNX-parser refitter reads
    the patched exported graph (``job.onnx``) and sets every weight by its initializer name. Anything
    it cannot do raises RefitImpossible (the build then takes the full path, saying why)."""
    import tensorrt as trt

    from . import RefitImpossible

    ensure_cuda_runtime()
    builds = {i["file"]: i for i in job.section.get("builds", [])}
    logger = trt.Logger(trt.Logger.ERROR)
    for plan, file in record["engines"].items():
        item = builds.get(file)
        if item is None or not item.get("refittable"):
            raise RefitImpossible(f"{file} was not built refittable (build with --refit)")
        if build_config(item, trt.__version__)["onnx"] == "fp16":
            raise RefitImpossible(f"TensorRT {trt.__version__} builds fp16 engines from a converted fp16 graph, whose "
                                  "weights the refitter cannot take from the fp32 export; refitting them is not supported yet")
        with trt.Runtime(logger) as runtime:
            engine = runtime.deserialize_cuda_engine((job.previous / file).read_bytes())
        if engine is None:
            raise RefitImpossible(f"{job.previous / file} could not be deserialized for a refit")
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(job.onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RefitImpossible(f"TensorRT could not read the new weights for {file} ({errors or 'no detail'})")
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise RefitImpossible(f"TensorRT could not refit {file}" + (f" (weights missing: {', '.join(missing[:5])})" if missing else ""))
        out = job.out_dir / file
        out.parent.mkdir(parents=True, exist_ok=True)
        with engine.serialize() as blob, open(out, "wb") as f:
            f.write(blob)
    return {"refitted": True}


def build_component(job) -> dict:
    """One engine per shape plan (text encoders: one for all), fp16 VAE rebuilt in fp32 on overflow."""
    import tensorrt as trt

    ensure_cuda_runtime()
    dims = job.dims
    items = build_plan([job.component], job.plans, dims["text_dim"], job.precision, job.vae_fp32, job.refit,
                       dims["latent_channels"], dims["pooled_dim"])
    if "tensorrt" not in job.section:
        job.section.update({"tensorrt": trt.__version__, **gpu_info(), "builds": []})
    cache = timing_cache_path(job.store_root, trt.__version__, job.section.get("compute_capability", "unknown"))
    job.section["timing_cache"] = str(cache)
    graphs = {"fp32": job.onnx}

    def graph_for(cfg: dict) -> Path:  # the fp16 graph is converted once per component, on first need
        if cfg["onnx"] not in graphs:
            graphs[cfg["onnx"]] = fp16_onnx(job.onnx, job.onnx.with_name("model.fp16.onnx"))
        return graphs[cfg["onnx"]]

    for item in items:
        cfg = build_config(item, trt.__version__)
        build_engine_file(graph_for(cfg), job.out_dir / item["file"], item, cache, cfg)
        if item["component"] == "vae_decoder" and item["fp16"] and job.sample_feeds:
            if not engine_outputs_finite(job.out_dir / item["file"], job.sample_feeds):
                item["fp16"] = False
                item["fp32_reason"] = "fp16 overflow (non-finite output) detected after build"
                cfg = build_config(item, trt.__version__)
                build_engine_file(graph_for(cfg), job.out_dir / item["file"], item, cache, cfg)
        item["typing"] = "strong" if cfg["strongly_typed"] else "weak"
    job.section["builds"] += items
    fp16 = [i["fp16"] for i in items]
    return {"engines": {i["plan"]: i["file"] for i in items}, "files": [i["file"] for i in items],
            "precision": "fp16" if all(fp16) else ("fp32" if not any(fp16) else "mixed"),
            "parity_note": "ONNX vs PyTorch fp32; run benchmarks/gpu_check.py for TensorRT fp16 parity"}


def check(manifest: dict, engine_dir: Path) -> list[str]:
    check_tensorrt_compat(manifest, engine_dir)
    return []


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    return TrtEngine(path, engine_dir, profile=entry_profile(manifest, engine_dir, path),
                     use_cuda_graph=cuda_graphs_enabled(os.environ))


def entry_profile(manifest: dict, engine_dir: Path, path: Path) -> dict | None:
    """The optimisation profile an engine file was built with, from the manifest's build records."""
    try:
        rel = Path(path).resolve().relative_to(Path(engine_dir).resolve()).as_posix()
    except ValueError:
        rel = Path(path).as_posix()
    for item in manifest.get(NAME, {}).get("builds", []):
        if item.get("file") == rel:
            return item.get("profile")
    return None


def cuda_graphs_enabled(env) -> bool:
    """CUDA graphs are off unless $LCM_EXPORT_CUDA_GRAPHS is 1/true/on: no GPU run has validated them yet."""
    return str(env.get(CUDA_GRAPHS_ENV, "")).strip().lower() in ("1", "true", "on", "yes")


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


def trt_major(version: str) -> int:
    """10 for '10.15.1.29'. UserError for a version string that does not start with a number."""
    m = re.match(r"\s*(\d+)\.", str(version) + ".")
    if not m:
        raise UserError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1))


def build_config(item: dict, trt_version: str) -> dict:
    """How to build one ``build_plan`` item with this TensorRT. Pure.

    Returns ``{"onnx": "fp32" | "fp16", "strongly_typed": bool, "config": CreateConfig keyword arguments}``.
    TensorRT 10: the fp32 graph, weakly typed, ``fp16=True`` for fp16 engines. TensorRT 11 and later:
    no precision flags exist; fp16 engines are built from the fp16 graph (fp32 I/O), strongly typed.
    fp32 engines: ``tf32=True`` (TF32 matmuls/convs; Polygraphy disables TF32 unless asked).
    """
    major = trt_major(trt_version)
    if major < TESTED_MAJORS[0]:
        raise UserError(f"TensorRT {trt_version} is too old: lcm-export builds with TensorRT 10 or 11 "
                        "(pip install 'lcm-export[tensorrt]' --extra-index-url https://pypi.nvidia.com)")
    fp16 = bool(item["fp16"])
    config = {"tf32": not fp16, "refittable": bool(item["refittable"]),
              "builder_optimization_level": item["builder_optimization_level"]}
    if major == 10:
        return {"onnx": "fp32", "strongly_typed": False, "config": {**config, "fp16": fp16}}
    # 11+: strong typing is always on; the STRONGLY_TYPED creation flag is accepted and ignored
    return {"onnx": "fp16" if fp16 else "fp32", "strongly_typed": True, "config": config}


def fp16_onnx(src: Path, dst: Path) -> Path:
    """``src`` (fp32 ONNX) converted to fp16 with fp32 inputs and outputs (casts at the edges), the
    precision TensorRT 11 builds in. Weights go to one external data file beside ``dst``, so graphs
    over 2 GB (SDXL's UNet) save too. Uses onnxruntime's converter (a base dependency), which keeps
    its block list of ops in fp32 and clamps constants to the fp16 range."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=_over_2gb(src))
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return dst


def _over_2gb(path: Path) -> bool:
    size = sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file())
    return size > 2 * 1024**3 - 2**20  # shape inference needs the model in one protobuf


def build_engine_file(onnx_path: Path, out_path: Path, item: dict, timing_cache: Path, cfg: dict) -> None:
    """Build one engine with Polygraphy (serialized once: ``engine_bytes_from_network``) and save it.

    Polygraphy reports every failure (parser errors, unavailable flags, an empty engine) by raising
    ``PolygraphyException``; that becomes a one-line UserError (TensorRT's own log is above it)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for name, p in item["profile"].items():
        profile.add(name, min=p["min"], opt=p["opt"], max=p["max"])
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        network = network_from_onnx_path(str(onnx_path), strongly_typed=cfg["strongly_typed"])
        config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
                              **cfg["config"])
        data = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    except PolygraphyException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"TensorRT could not build {item['file']} from {onnx_path}: {first} (TensorRT's log is above)") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)


def engine_outputs_finite(engine_path: Path, feeds: dict) -> bool:
    """Run an engine once on ``feeds`` (numpy) and say whether every output is finite."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        outputs = runner.infer(feeds)
    return all(np.isfinite(np.asarray(v)).all() for v in outputs.values())


# ----------------------------------------------------------------------------------------------
# CUDA runtime library: CUDA 12 wheels put libcudart in nvidia/cuda_runtime/lib, CUDA 13 wheels in
# nvidia/cu13/lib. Polygraphy's loader (0.53) searches LD_LIBRARY_PATH, system folders and the CUDA 12
# layout only, so we add whichever wheel folder exists to LD_LIBRARY_PATH before its first use.

WHEEL_LAYOUTS = {13: ("nvidia", "cu13", "lib"), 12: ("nvidia", "cuda_runtime", "lib")}


def cuda_runtime_dirs(site_dirs, prefer: int | None = None) -> list[Path]:
    """Folders holding ``libcudart.so*`` in pip's CUDA 12 or 13 wheel layouts under ``site_dirs``,
    the ``prefer``-ed CUDA major first (the one TensorRT was built for). Pure but for listing folders."""
    majors = sorted(WHEEL_LAYOUTS, key=lambda m: (m != prefer, -m))
    out = []
    for major in majors:
        for site in site_dirs:
            d = Path(site).joinpath(*WHEEL_LAYOUTS[major])
            if d.is_dir() and any(d.glob("libcudart.so*")) and d not in out:
                out.append(d)
    return out


def tensorrt_cuda_major(dist_names) -> int | None:
    """The CUDA major TensorRT's wheels were built for, from installed distribution names
    ('tensorrt-cu13-libs' -> 13); None when they do not say."""
    for name in dist_names:
        m = re.match(r"tensorrt[-_]cu(\d+)", str(name).lower())
        if m:
            return int(m.group(1))
    return None


_CUDART_READY = False


def ensure_cuda_runtime() -> None:
    """Make Polygraphy's CUDA wrapper find libcudart in either wheel layout (once per process)."""
    global _CUDART_READY
    if _CUDART_READY:
        return
    from importlib import metadata

    try:
        names = [d.metadata["Name"] or "" for d in metadata.distributions()]
    except Exception:  # a broken distribution must not stop us
        names = []
    dirs = cuda_runtime_dirs([p for p in sys.path if p and os.path.isdir(p)], tensorrt_cuda_major(names))
    if dirs:
        current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(list(dict.fromkeys([str(d) for d in dirs] + current)))
    _CUDART_READY = True


# ----------------------------------------------------------------------------------------------
# Runtime

def check_feeds(profile: dict | None, feeds: dict, label: str) -> None:
    """Every input inside the engine's optimisation profile, else a one-line UserError. Pure.

    Axis 0 is the batch: the UNet runs at 2 x batch with guidance > 1, so an entry built with
    ``--guidance off`` refuses guidance there; the other axes are the image size."""
    if not profile:
        return
    for name, p in profile.items():
        if name not in feeds:
            raise UserError(f"{label}: input {name!r} is missing")
        shape = tuple(int(v) for v in np.shape(feeds[name]))
        lo, hi = tuple(p["min"]), tuple(p["max"])
        if len(shape) != len(lo):
            raise UserError(f"{label}: input {name!r} has shape {shape}, the engine takes rank {len(lo)}")
        if not lo[0] <= shape[0] <= hi[0]:
            raise UserError(f"{label}: batch {shape[0]} is outside the built range {lo[0]}..{hi[0]} (guidance > 1 doubles "
                            f"the UNet batch); rebuild with a larger --batch, or --guidance on")
        bad = [i for i in range(1, len(shape)) if not lo[i] <= shape[i] <= hi[i]]
        if bad:
            built = "x".join(f"{a}" if a == b else f"{a}..{b}" for a, b in zip(lo[1:], hi[1:]))
            raise UserError(f"{label}: input {name!r} shape {'x'.join(map(str, shape[1:]))} (after the batch) is outside "
                            f"the built {built}; rebuild with this --resolution")


def _ok(result, what: str, label: str) -> None:
    """TensorRT's setters and execute_async_v3 return False instead of raising."""
    if not result:
        raise UserError(f"{label}: TensorRT {what} failed (see TensorRT's log above)")


CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal


class TrtEngine:
    """A TensorRT plan run through TensorRT's API with Polygraphy's CUDA helpers.

    - Inputs are checked against the entry's optimisation profile before anything reaches the GPU,
      and every TensorRT call's bool result is checked.
    - Device buffers are allocated once per input shape and reused; numpy dtypes are cached at load
      (Polygraphy 0.53's ``DeviceArray.dtype`` getter warns on every call and changes type in 0.55).
    - CUDA graphs (``use_cuda_graph``, off by default): per shape, the first call is a plain enqueue
      and sync (warm-up: TensorRT's lazy initialisation must not be captured); the second captures
      in thread-local mode, and a failed capture or enqueue discards the graph and turns graphs off
      for this engine. Graphs are destroyed by ``close``.
    - Thread safety: one lock per engine serialises calls. The alternative, one execution context
      (and stream, buffers, graphs) per thread, would duplicate the activation memory per thread for
      little gain: one UNet call already fills the GPU. Concurrent callers queue instead.
    """

    def __init__(self, path: Path, engine_dir: Path, profile: dict | None = None, use_cuda_graph: bool = False):
        import tensorrt as trt

        ensure_cuda_runtime()
        from polygraphy import cuda

        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {rebuild_hint(engine_dir)}")
        logger = trt.Logger(trt.Logger.ERROR)
        with open(path, "rb") as f, trt.Runtime(logger) as runtime:
            engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise UserError(f"engine file {path} could not be deserialized (corrupt, or built by another TensorRT); {rebuild_hint(engine_dir)}")
        label = f"{path.parent.name} engine {path.parent.name}/{path.name}"
        self._setup(engine, trt, cuda, profile, label, use_cuda_graph)

    @classmethod
    def from_engine(cls, engine, trt, cuda, profile: dict | None = None, label: str = "engine",
                    use_cuda_graph: bool = False, cudart=None) -> "TrtEngine":
        """An engine around an already deserialized ICudaEngine (and the modules to use with it)."""
        self = cls.__new__(cls)
        self._setup(engine, trt, cuda, profile, label, use_cuda_graph, cudart)
        return self

    def _setup(self, engine, trt, cuda, profile, label, use_cuda_graph, cudart=None) -> None:
        self.trt, self.cuda, self.engine, self.profile, self.label = trt, cuda, engine, profile, label
        self.context = engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{label}: TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers: dict[tuple, dict[str, object]] = {}
        self.graphs: dict[tuple, ctypes.c_void_p] = {}
        self.warm: set[tuple] = set()
        self.use_cuda_graph = bool(use_cuda_graph)
        self._cudart = cudart
        self._lock = threading.Lock()

    def _buffers_for(self, shapes: tuple) -> dict:
        if shapes not in self.buffers:
            for name, shape in zip(self.inputs, shapes):
                _ok(self.context.set_input_shape(name, shape), f"set_input_shape({name}, {shape})", self.label)
            bufs = {}
            for name in self.inputs + self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UserError(f"{self.label}: TensorRT left {name!r} with an unresolved shape {shape}")
                bufs[name] = self.cuda.DeviceArray(shape=shape, dtype=self.dtypes[name])
            self.buffers[shapes] = bufs
        return self.buffers[shapes]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.profile, feeds, self.label)
        shapes = tuple(tuple(int(v) for v in np.shape(feeds[n])) for n in self.inputs)
        with self._lock:
            bufs = self._buffers_for(shapes)
            for name, shape in zip(self.inputs, shapes):
                _ok(self.context.set_input_shape(name, shape), f"set_input_shape({name}, {shape})", self.label)
                bufs[name].copy_from(np.ascontiguousarray(feeds[name], dtype=self.dtypes[name]), stream=self.stream)
            for name, buf in bufs.items():
                _ok(self.context.set_tensor_address(name, buf.ptr), f"set_tensor_address({name})", self.label)
            self._enqueue(shapes)
            hosts = []
            for name in self.outputs:
                host = np.empty(bufs[name].shape, dtype=self.dtypes[name])
                bufs[name].copy_to(host, stream=self.stream)
                hosts.append(host)
            self.stream.synchronize()
        return hosts

    def _execute(self) -> None:
        _ok(self.context.execute_async_v3(self.stream.ptr), "execute_async_v3", self.label)

    def _enqueue(self, shapes: tuple) -> None:
        """Plain enqueue, or a CUDA graph: warm-up first, capture on the second call, replay after."""
        if not self.use_cuda_graph:
            return self._execute()
        if shapes in self.graphs:
            if self._lib().cudaGraphLaunch(self.graphs[shapes], ctypes.c_void_p(self.stream.ptr)) == 0:
                return None
            self._drop_graphs()  # a launch failure: back to plain enqueues
            return self._execute()
        if shapes not in self.warm:
            self._execute()
            self.stream.synchronize()
            self.warm.add(shapes)
            return None
        exe = self._capture()
        if exe is None:
            return self._execute()
        self.graphs[shapes] = exe
        if self._lib().cudaGraphLaunch(exe, ctypes.c_void_p(self.stream.ptr)) != 0:
            self._drop_graphs()
            return self._execute()
        return None

    def _lib(self):
        if self._cudart is None:
            self._cudart = self.cuda.wrapper().handle
        return self._cudart

    def _capture(self):
        """One enqueue captured into an instantiated graph (CUDA 12/13 signature), or None."""
        lib, stream = self._lib(), ctypes.c_void_p(self.stream.ptr)
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        if lib.cudaStreamBeginCapture(stream, CAPTURE_MODE_THREAD_LOCAL) != 0:
            self.use_cuda_graph = False
            return None
        enqueued = self.context.execute_async_v3(self.stream.ptr)
        ended = lib.cudaStreamEndCapture(stream, ctypes.byref(graph)) == 0  # always end the capture
        ok = bool(enqueued) and ended and graph.value is not None
        if ok:  # cudaGraphInstantiate(cudaGraphExec_t*, cudaGraph_t, unsigned long long flags)
            ok = lib.cudaGraphInstantiate(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)) == 0
        if graph.value is not None:
            lib.cudaGraphDestroy(graph)  # the executable graph keeps what it needs
        if not ok:
            if exe.value is not None:
                lib.cudaGraphExecDestroy(exe)
            lib.cudaGetLastError()  # clear the capture error so the plain enqueue runs
            self.use_cuda_graph = False
            return None
        return exe

    def _drop_graphs(self) -> None:
        lib = self._lib() if self.graphs else None
        for exe in self.graphs.values():
            lib.cudaGraphExecDestroy(exe)
        self.graphs.clear()
        self.use_cuda_graph = False

    def close(self) -> None:
        """Destroy CUDA graphs, free device buffers and the stream (idempotent)."""
        with self._lock:
            if self.graphs:
                self._drop_graphs()
            for bufs in self.buffers.values():
                for buf in bufs.values():
                    buf.free()
            self.buffers.clear()
            if getattr(self, "stream", None) is not None:
                self.stream.free()
                self.stream = None
            self.context = None

    def __enter__(self) -> "TrtEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    ensure_cuda_runtime()
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    rc = lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    rc = rc or lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    if rc != 0:
        raise UserError(f"{engine_dir} holds TensorRT engines but the CUDA runtime found no usable GPU here (CUDA error {rc})")
    here = f"{major.value}.{minor.value}"
    if built.get("compute_capability") not in (None, here):
        raise UserError(f"{engine_dir} was built for GPU compute capability {built.get('compute_capability')}, this GPU is {here}; "
                        f"{rebuild_hint(engine_dir)}")
