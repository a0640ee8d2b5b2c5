"""ONNX Runtime on a device: IO binding on device buffers, the device loop's protocol
(``runtime/device_loop.py``) and CUDA graphs per fixed shape.

- ``OrtDevice``: buffers (``OrtValue`` s on an ORT device, ``"cuda"`` on GPUs; ``"cpu"`` works the same
  way, which is how the tests drive every line of this file without a GPU), copies and timing.
  ``upload`` (``OrtValue.update_inplace``) and ``download`` (``OrtValue.numpy``) are the only host<->device
  copies the engines and the loop make, so counting them counts every copy.
- ``OrtDeviceEngine``: one ONNX Runtime session (or one per fixed shape, with CUDA graphs) with inputs and
  outputs bound by pointer (``io_binding.bind_input`` / ``bind_output`` with the buffer's address), so a
  view (the first rows of a buffer) binds without a copy. Host arrays passed in are first uploaded into the
  engine's own buffers for that shape (reused), so every input the session sees is on the device.
  ``run_device`` leaves the outputs on the device; ``run`` / ``run_all`` copy them back.
- CUDA graphs (``graphs=True``; the CUDA provider's ``enable_cuda_graph``): ONNX Runtime captures a graph
  only when every node runs on the CUDA provider, and with dynamic input shapes the shape arithmetic
  (Shape, Gather, Concat, ...) runs on the CPU. So each fixed input shape gets its own session with the
  graph's symbolic dimensions pinned (``add_free_dimension_override_by_name``: ``B``, ``h``, ``w``), in
  which ONNX Runtime folds that arithmetic away; every input and output is bound to a buffer whose address
  never changes for that shape, and each set of bound addresses gets its own ``gpu_graph_id`` (the device
  loop's ping-pong buffers: two graphs per engine), at most ``MAX_GRAPHS`` per session (then
  ``gpu_graph_id=-1``: a plain run). A replayed graph reads its inputs from the captured addresses without
  looking at the binding, which is why the graph id is keyed by addresses. Costs: a session per shape holds
  its own copy of the weights on the GPU (1.7 GB for the SD 1.5 UNet in fp16), so at most
  ``MAX_STATIC_SESSIONS`` per engine (further shapes run in the dynamic session, without graphs); where
  ONNX Runtime refuses the capture at session creation, that shape runs in the dynamic session too and the
  reason is kept in ``graph_notes``.
- Ordering: every session run returns after ONNX Runtime synchronized its stream (its default), and the
  copies are synchronous, so one engine's output is complete before the next engine reads it; a
  process-wide lock keeps other threads' CUDA calls out of a graph capture (ONNX Runtime captures in global
  mode). ``mark``/``elapsed`` are therefore host clock readings around finished work.

None of this has run on a GPU yet: on CPU the tests run it with the CPU provider standing in (same calls,
same bindings; ``graphs=True`` there exercises the per-shape sessions and graph ids, which the CPU
provider ignores).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EngineError, UserError
from . import rebuild_hint

MAX_GRAPHS = 4
"""CUDA graphs per fixed-shape session (the device loop needs two: its ping-pong buffers)."""
MAX_STATIC_SESSIONS = 4
"""Fixed-shape sessions per engine; each holds the weights again on the GPU."""
CUDA_PROVIDER_OPTIONS = {
    "device_id": "0",
    "arena_extend_strategy": "kSameAsRequested",  # ORT's Stable Diffusion demo and CUDA-graph examples use it
    "cudnn_conv_algo_search": "EXHAUSTIVE",  # ORT's default: best algorithms, searched on each shape's first run
    "cudnn_conv_use_max_workspace": "1",
    "do_copy_in_default_stream": "1",
    "use_tf32": "0",  # fp32 parts exact: fp32 components are gated against PyTorch fp64 (verify.py), TF32 would fail it
}
"""The CUDA provider's options for every session (recorded in the manifest); ``enable_cuda_graph`` is set
per session (fixed-shape sessions with graphs on)."""

_GPU_LOCK = threading.RLock()
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
       "tensor(int64)": np.int64, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class DevBuf:
    """A device buffer (or a view of the start of one): address, shape, numpy dtype and the ``OrtValue``
    holding the memory (None for a view)."""

    ptr: int
    shape: tuple
    dtype: np.dtype
    owner: object = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class OrtDevice:
    """Buffers, copies and timing on an ONNX Runtime device (``"cuda"``, or ``"cpu"`` for tests)."""

    def __init__(self, kind: str = "cuda", device_id: int = 0):
        self.kind, self.device_id = kind, int(device_id)

    def empty(self, shape, dtype) -> DevBuf:
        import onnxruntime as ort

        shape, dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        with _GPU_LOCK:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, self.kind, self.device_id)
        return DevBuf(int(value.data_ptr()), shape, dtype, value)

    def view(self, arr: DevBuf, shape) -> DevBuf:
        """The first ``prod(shape)`` elements of ``arr`` as ``shape``."""
        view = DevBuf(arr.ptr, tuple(int(v) for v in shape), arr.dtype)
        if view.nbytes > arr.nbytes:
            raise EngineError(f"a device view of shape {view.shape} does not fit in a buffer of shape {arr.shape}")
        return view

    def upload(self, host, into: DevBuf) -> DevBuf:
        if into.owner is None:
            raise EngineError("upload into a device view: upload into the buffer it views")
        if tuple(np.shape(host)) != into.shape:
            raise EngineError(f"upload of shape {np.shape(host)} into a device buffer of shape {into.shape}")
        with _GPU_LOCK:
            into.owner.update_inplace(np.ascontiguousarray(host, dtype=into.dtype))
        return into

    def download(self, arr: DevBuf) -> np.ndarray:
        if arr.owner is None:
            raise EngineError("download of a device view: download the buffer it views")
        with _GPU_LOCK:
            return np.array(arr.owner.numpy(), copy=True)

    def synchronize(self) -> None:
        """Nothing to wait for: every session run and copy has finished when it returns."""

    def free(self, arr: DevBuf) -> None:
        """The memory goes with the last reference to ``arr.owner``."""

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed(self, marks: list) -> list[float]:
        return [b - a for a, b in zip(marks, marks[1:])]

    def discard(self, marks: list) -> None:
        pass


_DEVICES: dict[tuple[str, int], OrtDevice] = {}


def shared_device(kind: str = "cuda", device_id: int = 0) -> OrtDevice:
    """One ``OrtDevice`` per device for the process: every engine's copies go through it."""
    with _GPU_LOCK:
        return _DEVICES.setdefault((kind, int(device_id)), OrtDevice(kind, device_id))


def numpy_dtype(ort_type: str) -> np.dtype:
    if ort_type not in _NP:
        raise EngineError(f"unsupported ONNX Runtime tensor type {ort_type}")
    return np.dtype(_NP[ort_type])


def session_options(opt_level: str, threads: int | None, overrides: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in (overrides or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    return so


def providers_for(kind: str, options: dict | None, graph: bool) -> list:
    """ORT providers for an OrtDevice kind; the CUDA provider with ``options`` and ``enable_cuda_graph``."""
    if kind != "cuda":
        return ["CPUExecutionProvider"]
    opts = {**CUDA_PROVIDER_OPTIONS, **(options or {}), "enable_cuda_graph": "1" if graph else "0"}
    return [("CUDAExecutionProvider", {k: str(v) for k, v in opts.items()}), "CPUExecutionProvider"]


def fixed_dims(dims: dict[str, list], shapes: dict[str, tuple]) -> dict[str, int] | None:
    """{symbolic dimension name: value} pinning every symbolic dimension of the inputs to the shapes of
    one call, or None when that is impossible (an unnamed dimension, or one name with two values). Pure."""
    out: dict[str, int] = {}
    for name, declared in dims.items():
        shape = shapes[name]
        if len(shape) != len(declared):
            return None
        for d, v in zip(declared, shape):
            if isinstance(d, int):
                if d != v:
                    return None
                continue
            if not d or out.get(d, v) != v:
                return None
            out[d] = int(v)
    return out


class _Shape:
    """What one input shape key holds: the session it runs in, whether graphs are on there, its own
    input/output buffers (allocated on first need) and the graph id of each set of bound addresses."""

    def __init__(self, session, graphs: bool):
        self.session, self.graphs = session, graphs
        self.inputs: dict[str, DevBuf] = {}
        self.outputs: dict[str, DevBuf] = {}
        self.graph_ids: dict[tuple, int] = {}
        self.output_shapes: dict[str, tuple] | None = None
        if graphs:  # a fixed-shape session knows its output shapes: its outputs get buffers of their own
            shapes = {o.name: tuple(o.shape) for o in session.get_outputs()}
            if all(all(isinstance(d, int) for d in s) for s in shapes.values()):
                self.output_shapes = shapes


class OrtDeviceEngine:
    """An ONNX Runtime graph on a device, with IO binding (see the module docstring). Offers ``run``,
    ``run_all`` (host arrays or device buffers in, host arrays out), ``run_device`` (device buffers out),
    ``inputs``, ``outputs``, ``dtypes``, ``device`` and ``lcm_step`` ({guidance: step engine}, set by the
    backend for a UNet), which is what the device loop asks of an engine."""

    def __init__(self, path: Path, device: str = "cuda", provider_options: dict | None = None, threads: int | None = None,
                 opt_level: str = "ORT_ENABLE_ALL", engine_dir: Path | None = None, graphs: bool = False,
                 device_id: int = 0):
        import onnxruntime as ort

        self._ort = ort
        path = Path(path)
        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {rebuild_hint(engine_dir or path.parent.parent)}")
        self.path, self.engine_dir, self.label = path, engine_dir or path.parent.parent, f"{path.parent.name}/{path.name}"
        self.device = shared_device(device, device_id)
        self.provider_options = dict(provider_options or {})
        self.threads, self.opt_level = threads, opt_level
        self.graphs = bool(graphs)
        self.dynamic = self._session({}, False)
        if device == "cuda" and self.dynamic.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError(f"{self.label}: ONNX Runtime did not start its CUDA provider (providers in use: "
                            f"{', '.join(self.dynamic.get_providers())}); install onnxruntime-gpu matching this machine's CUDA")
        ins, outs = self.dynamic.get_inputs(), self.dynamic.get_outputs()
        self.inputs, self.outputs = [i.name for i in ins], [o.name for o in outs]
        self.dtypes = {a.name: numpy_dtype(a.type) for a in ins + outs}
        self.dims = {i.name: list(i.shape) for i in ins}
        self.shapes: dict[tuple, _Shape] = {}
        self.graph_notes: list[str] = []
        self.lcm_step: dict[bool, "OrtDeviceEngine"] = {}

    # ------------------------------------------------------------------------------------------
    def _session(self, overrides: dict, graph: bool):
        so = session_options(self.opt_level, self.threads, overrides)
        try:
            return self._ort.InferenceSession(str(self.path), so, providers=providers_for(
                self.device.kind, self.provider_options, graph))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            if graph:
                raise
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"engine file {self.path} is corrupt or truncated ({first}); {rebuild_hint(self.engine_dir)}") from None

    def _shape_for(self, key: tuple, shapes: dict[str, tuple]) -> _Shape:
        """The session and buffers for one input shape key: a fixed-shape session with graphs where asked
        and possible, else the dynamic session."""
        if key in self.shapes:
            return self.shapes[key]
        entry = None
        if self.graphs and sum(1 for s in self.shapes.values() if s.graphs) < MAX_STATIC_SESSIONS:
            pinned = fixed_dims(self.dims, shapes)
            if pinned is None:
                self.graph_notes.append(f"{self.label}: shapes {shapes} cannot be pinned by name; no CUDA graph for them")
            else:
                try:
                    entry = _Shape(self._session(pinned, True), True)
                except Exception as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    self.graph_notes.append(f"{self.label}: no CUDA graph for {pinned} ({first})")
        self.shapes[key] = entry or _Shape(self.dynamic, False)
        return self.shapes[key]

    def _own(self, store: dict, name: str, shape: tuple) -> DevBuf:
        buf = store.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = store[name] = self.device.empty(shape, self.dtypes[name])
        return buf

    def _check(self, name: str, buf: DevBuf) -> None:
        if buf.dtype != self.dtypes[name]:
            raise EngineError(f"{self.label}: device buffer for {name!r} is {buf.dtype}, the engine takes {self.dtypes[name]}")

    def _launch(self, feeds: dict, out: dict | None) -> dict[str, DevBuf]:
        """Bind every input (device buffers by address; host arrays uploaded into this engine's own
        buffers for the shape) and every output (``out``'s buffers, this engine's own for a fixed-shape
        session, else allocated by ONNX Runtime on the device), run, return {output: device buffer}."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"{self.label}: input {missing[0]!r} is missing")
        shapes = {n: feeds[n].shape if isinstance(feeds[n], DevBuf) else tuple(int(v) for v in np.shape(feeds[n]))
                  for n in self.inputs}
        dev, kind, dev_id = self.device, self.device.kind, self.device.device_id
        with _GPU_LOCK:
            entry = self._shape_for(tuple(shapes[n] for n in self.inputs), shapes)
            binding = entry.session.io_binding()
            addrs = []
            for name in self.inputs:
                value = feeds[name]
                if not isinstance(value, DevBuf):
                    value = dev.upload(value, self._own(entry.inputs, name, shapes[name]))
                self._check(name, value)
                binding.bind_input(name, kind, dev_id, value.dtype.type, list(value.shape), value.ptr)
                addrs.append(value.ptr)
            fixed = entry.output_shapes
            results, allocated = {}, False
            for name in self.outputs:
                dst = (out or {}).get(name)
                if dst is None and fixed is not None:
                    dst = self._own(entry.outputs, name, fixed[name])
                if dst is None:  # the dynamic session: ONNX Runtime allocates it on the device
                    binding.bind_output(name, kind, dev_id)
                    allocated = True
                    continue
                self._check(name, dst)
                if fixed is not None and tuple(dst.shape) != fixed[name]:
                    raise EngineError(f"{self.label}: output buffer for {name!r} has shape {dst.shape}, the engine writes {fixed[name]}")
                binding.bind_output(name, kind, dev_id, dst.dtype.type, list(dst.shape), dst.ptr)
                results[name] = dst
                addrs.append(dst.ptr)
            self._run(entry, binding, None if allocated else tuple(addrs))
            if allocated:
                for name, v in zip(self.outputs, binding.get_outputs()):  # every bound output, in binding order
                    if name not in results:
                        results[name] = DevBuf(int(v.data_ptr()), tuple(v.shape()), self.dtypes[name], v)
        return {n: results[n] for n in self.outputs}

    def _run(self, entry: _Shape, binding, addrs: tuple | None) -> None:
        """One run; in a fixed-shape session with graphs, under the graph id of this set of addresses."""
        options = None
        if entry.graphs:
            options = self._ort.RunOptions()
            gid = -1
            if addrs is not None:
                gid = entry.graph_ids.get(addrs, -1)
                if gid < 0 and len(entry.graph_ids) < MAX_GRAPHS:
                    gid = entry.graph_ids[addrs] = len(entry.graph_ids)
            options.add_run_config_entry("gpu_graph_id", str(gid))
        entry.session.run_with_iobinding(binding, options)

    # ------------------------------------------------------------------------------------------
    def run_device(self, feeds: dict, out: dict[str, DevBuf] | None = None) -> dict[str, DevBuf]:
        """Run without copying the outputs back. Outputs go to ``out``'s buffers where given, else to
        this engine's own (valid until its next call with the same shapes) or ONNX Runtime's."""
        return self._launch(feeds, out)

    def run_all(self, feeds: dict) -> list[np.ndarray]:
        """Every output copied to the host, in the graph's order (under the lock: another thread's call with the
        same shapes would write this engine's own output buffers)."""
        with _GPU_LOCK:
            results = self._launch(feeds, None)
            return [self.device.download(results[n]) for n in self.outputs]

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_all(feeds)[0]

    def graph_counts(self) -> dict[tuple, int]:
        """{input shape key: graphs assigned} for the fixed-shape sessions (what tests and reports read)."""
        return {k: len(s.graph_ids) for k, s in self.shapes.items() if s.graphs}

    def close(self) -> None:
        for step in self.lcm_step.values():
            step.close()
        self.shapes.clear()
        self.dynamic = None
