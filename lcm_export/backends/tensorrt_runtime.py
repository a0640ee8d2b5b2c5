"""The TensorRT runtime: ``TrtEngine`` (one plan through TensorRT's API and Polygraphy's CUDA
helpers), device-resident buffers (``DevArray``, ``TrtDevice``) for the device loop
(``runtime/device_loop.py``), CUDA graphs, and finding the CUDA runtime library.

Everything here runs against stub TensorRT/CUDA objects in the tests (``tests/backends``); none of it
has run on real TensorRT yet (no machine we have can install it; see the README).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EngineError, UserError
from . import CUDA_GRAPHS_ENV, cuda_graphs_enabled, rebuild_hint  # noqa: F401 (shared with ONNX Runtime's CUDA runtime)


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
        shape = shape_of(feeds[name])
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



def shape_of(value) -> tuple[int, ...]:
    """The shape of a host array or a device array (``DevArray``)."""
    return tuple(int(v) for v in (value.shape if hasattr(value, "shape") else np.shape(value)))


def _ok(result, what: str, label: str) -> None:
    """TensorRT's setters and execute_async_v3 return False instead of raising."""
    if not result:
        raise UserError(f"{label}: TensorRT {what} failed (see TensorRT's log above)")


CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal

# ----------------------------------------------------------------------------------------------
# One stream and one lock per process. Every TrtEngine enqueues on the same CUDA stream, so work
# handed from one engine to the next (UNet -> LCM step -> VAE) is ordered without events or host
# syncs; the lock keeps each engine's "set shapes and addresses, enqueue" atomic and keeps other
# threads' work out of a CUDA-graph capture. One GPU runs one UNet call at a time anyway.

_GPU_LOCK = threading.RLock()
_STREAMS: dict[int, tuple[object, object]] = {}


def shared_stream(cuda):
    """The process's stream for the CUDA module ``cuda`` (Polygraphy's, or a test's stub)."""
    with _GPU_LOCK:
        if id(cuda) not in _STREAMS:
            _STREAMS[id(cuda)] = (cuda, cuda.Stream())
        return _STREAMS[id(cuda)][1]


@dataclass(frozen=True)
class DevArray:
    """A device buffer the device loop owns (or a view of the start of one): pointer, shape and
    numpy dtype, kept here so nothing reads Polygraphy's warning ``DeviceArray.dtype`` getter."""

    ptr: int
    shape: tuple
    dtype: np.dtype
    owner: object = None
    """The Polygraphy ``DeviceArray`` holding the memory (None for a view)."""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class TrtDevice:
    """Device memory, copies and timing on the shared stream, for the device loop.

    ``upload`` and ``download`` are the only host<->device copies the loop makes; ``mark``/``elapsed``
    time GPU work with CUDA events, so the loop never synchronizes to measure a step. Everything that
    touches the stream takes the process's GPU lock, as engine calls do, so none of it can land inside
    another thread's CUDA-graph capture. Uploads come from ordinary (pageable) host memory: CUDA may
    stage such a copy synchronously; they are small (a step's noise, 40 bytes of coefficients)."""

    def __init__(self, cuda, stream, cudart=None):
        self.cuda, self.stream, self._cudart = cuda, stream, cudart

    def _lib(self):
        if self._cudart is None:
            self._cudart = self.cuda.wrapper().handle
        return self._cudart

    def empty(self, shape, dtype) -> DevArray:
        shape, dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        owner = self.cuda.DeviceArray(shape=shape, dtype=dtype)
        return DevArray(int(owner.ptr), shape, dtype, owner)

    def view(self, arr: DevArray, shape) -> DevArray:
        """The first ``prod(shape)`` elements of ``arr`` as ``shape`` (e.g. the conditional half's twin)."""
        view = DevArray(arr.ptr, tuple(int(v) for v in shape), arr.dtype)
        if view.nbytes > arr.nbytes:
            raise EngineError(f"a device view of shape {view.shape} does not fit in a buffer of shape {arr.shape}")
        return view

    def upload(self, host: np.ndarray, into: DevArray) -> DevArray:
        if into.owner is None or tuple(np.shape(host)) != into.shape:
            raise EngineError(f"upload of shape {np.shape(host)} into a device buffer of shape {into.shape}")
        host = np.ascontiguousarray(host, dtype=into.dtype)
        with _GPU_LOCK:
            into.owner.copy_from(host, stream=self.stream)
        return into

    def download(self, arr: DevArray) -> np.ndarray:
        """Copy to a new host array and wait for it (the stream's earlier work included)."""
        if arr.owner is None:
            raise EngineError("download of a device view: download the buffer it views")
        host = np.empty(arr.shape, arr.dtype)
        with _GPU_LOCK:  # the sync too: synchronizing a stream another thread is capturing would break the capture
            arr.owner.copy_to(host, stream=self.stream)
            self.stream.synchronize()
        return host

    def synchronize(self) -> None:
        with _GPU_LOCK:
            self.stream.synchronize()

    def free(self, arr: DevArray) -> None:
        if arr.owner is not None:
            arr.owner.free()

    def mark(self):
        """A CUDA event recorded on the stream now."""
        lib, ev = self._lib(), ctypes.c_void_p()
        with _GPU_LOCK:
            if lib.cudaEventCreate(ctypes.byref(ev)) != 0:
                raise EngineError("CUDA could not create an event")
            if lib.cudaEventRecord(ev, ctypes.c_void_p(self.stream.ptr)) != 0:
                lib.cudaEventDestroy(ev)
                raise EngineError("CUDA could not record an event on the stream")
        return ev

    def elapsed(self, marks: list) -> list[float]:
        """Seconds between consecutive marks (after a synchronize); destroys the events."""
        lib, out = self._lib(), []
        for a, b in zip(marks, marks[1:]):
            ms = ctypes.c_float()
            rc = lib.cudaEventElapsedTime(ctypes.byref(ms), a, b)
            out.append(ms.value / 1e3 if rc == 0 else float("nan"))
        self.discard(marks)
        return out

    def discard(self, marks: list) -> None:
        """Destroy events (CUDA releases a pending one once it completes)."""
        lib = self._lib()
        for ev in marks:
            lib.cudaEventDestroy(ev)


class TrtEngine:
    """A TensorRT plan run through TensorRT's API with Polygraphy's CUDA helpers.

    - Inputs are checked against the entry's optimisation profile before anything reaches the GPU,
      and every TensorRT call's bool result is checked.
    - ``run``/``run_all``: host arrays in, host arrays out. ``run_device``: device arrays in and out,
      no copy and no sync (the device loop's path); host arrays may be mixed in (copied to this
      engine's own input buffers, in stream order). ``run_all`` also takes device-array inputs.
    - Own buffers are allocated once per input shape and reused; numpy dtypes are cached at load
      (Polygraphy 0.53's ``DeviceArray.dtype`` getter warns on every call and changes type in 0.55).
    - CUDA graphs (``use_cuda_graph``, off by default): per shape and set of buffer addresses, the
      first call is a plain enqueue and sync (warm-up: TensorRT's lazy initialisation must not be
      captured); the second captures in thread-local mode, and a failed capture or enqueue discards
      the graph and turns graphs off for this engine. Graphs are destroyed by ``close``.
    - Threads: every engine enqueues on the process's one stream under one lock (``shared_stream``).
      The alternative, an execution context (and stream, buffers, graphs) per thread, would duplicate
      the activation memory per thread for little gain: one UNet call already fills the GPU.
      Concurrent callers queue instead.
    - ``lcm_step``: for a UNet engine, {guidance: LCM step engine} when the entry has them.
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
        self.stream = shared_stream(cuda)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers: dict[tuple, dict[str, object]] = {}
        self.graphs: dict[tuple, ctypes.c_void_p] = {}
        self.warm: set[tuple] = set()
        self.use_cuda_graph = bool(use_cuda_graph)
        self._lock = _GPU_LOCK
        self.device = TrtDevice(cuda, self.stream, cudart)
        self.lcm_step: dict[bool, "TrtEngine"] = {}

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

    def _device_ok(self, name: str, arr: DevArray, shape: tuple) -> int:
        if arr.dtype != self.dtypes[name] or tuple(arr.shape) != tuple(shape):
            raise EngineError(f"{self.label}: device buffer for {name!r} is {arr.dtype} {arr.shape}, the engine needs "
                              f"{self.dtypes[name]} {tuple(shape)}")
        return arr.ptr

    def _launch(self, feeds: dict, out: dict | None) -> dict:
        """Under the lock: set shapes, bind inputs (device arrays as they are; host arrays copied into
        this engine's buffers), bind outputs (``out``'s device arrays, else this engine's), enqueue.
        Returns {output name: device buffer}."""
        check_feeds(self.profile, feeds, self.label)
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"{self.label}: input {missing[0]!r} is missing")
        shapes = tuple(shape_of(feeds[n]) for n in self.inputs)
        bufs = self._buffers_for(shapes)
        addrs = {}
        for name, shape in zip(self.inputs, shapes):
            _ok(self.context.set_input_shape(name, shape), f"set_input_shape({name}, {shape})", self.label)
            value = feeds[name]
            if isinstance(value, DevArray):
                addrs[name] = self._device_ok(name, value, shape)
            else:
                bufs[name].copy_from(np.ascontiguousarray(value, dtype=self.dtypes[name]), stream=self.stream)
                addrs[name] = bufs[name].ptr
        results = {}
        for name in self.outputs:
            dst = (out or {}).get(name)
            if dst is not None:
                addrs[name] = self._device_ok(name, dst, bufs[name].shape)
                results[name] = dst
            else:
                addrs[name] = bufs[name].ptr
                results[name] = bufs[name]
        for name, ptr in addrs.items():
            _ok(self.context.set_tensor_address(name, ptr), f"set_tensor_address({name})", self.label)
        self._enqueue((shapes, tuple(addrs.values())))
        return results

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict) -> list[np.ndarray]:
        """Every output copied to the host, in the graph's order (waits for the stream)."""
        with self._lock:
            results = self._launch(feeds, None)
            hosts = []
            for name in self.outputs:
                buf = results[name]
                host = np.empty(buf.shape, dtype=self.dtypes[name])
                buf.copy_to(host, stream=self.stream)
                hosts.append(host)
            self.stream.synchronize()
        return hosts

    def run_device(self, feeds: dict, out: dict[str, DevArray] | None = None) -> dict:
        """Enqueue one call without copying outputs or waiting. Outputs go to ``out``'s buffers where
        given, else to this engine's own (valid until its next call with the same shapes)."""
        with self._lock:
            return self._launch(feeds, out)

    def _execute(self) -> None:
        _ok(self.context.execute_async_v3(self.stream.ptr), "execute_async_v3", self.label)

    def _enqueue(self, key: tuple) -> None:
        """Plain enqueue, or a CUDA graph: warm-up first, capture on the second call, replay after."""
        if not self.use_cuda_graph:
            return self._execute()
        if key in self.graphs:
            if self._lib().cudaGraphLaunch(self.graphs[key], ctypes.c_void_p(self.stream.ptr)) == 0:
                return None
            self._drop_graphs()  # a launch failure: back to plain enqueues
            return self._execute()
        if key not in self.warm:
            self._execute()
            self.stream.synchronize()
            self.warm.add(key)
            return None
        exe = self._capture()
        if exe is None:
            return self._execute()
        self.graphs[key] = exe
        if self._lib().cudaGraphLaunch(exe, ctypes.c_void_p(self.stream.ptr)) != 0:
            self._drop_graphs()
            return self._execute()
        return None

    def _lib(self):
        return self.device._lib()

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
        """Destroy CUDA graphs and free this engine's device buffers (idempotent; the shared stream
        lives as long as the process)."""
        with self._lock:
            for step in self.lcm_step.values():
                step.close()
            if self.graphs:
                self._drop_graphs()
            for bufs in self.buffers.values():
                for buf in bufs.values():
                    buf.free()
            self.buffers.clear()
            self.context = None

    def __enter__(self) -> "TrtEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
