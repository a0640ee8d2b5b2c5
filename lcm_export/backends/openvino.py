"""OpenVINO engines on the CPU: fp32, or bf16 where the CPU computes bf16 natively (AMX, AVX512_BF16).

Built from the exported ONNX (ONNX stays the interchange format). Each component stores one file pair,
``openvino_model.xml`` / ``.bin`` (``IR_NAME``: the names OpenVINO GenAI and optimum-intel read; ``builder/genai.py``):
the OpenVINO IR, its weights once, in the form the engine computes from
(fp32; fp16 for components that run in bf16, which the CPU plugin converts to bf16 as it compiles; the
int8 UNet as NNCF writes it). No compiled blob: it was a second full copy of the weights (SD 1.5 UNet
fp32: 3.44 GB) for 4-5 s of a UNet's load (importing it 5.5-6.9 s, compiling the IR 9.9-11.5 s, the first
inference the same after either; 2 shared cores of an AMX Xeon, benchmarks/reports/footprint-xeon-amx-sd15).
Entries of the previous layout (recipe 6: ``model.xml`` with a compiled ``model.blob``) are read as they are: their blob is
imported when this OpenVINO and CPU match the manifest's, else their IR is compiled.

Memory: the CPU plugin repacks every weight into its own buffers (anonymous memory) while it compiles
and on the first inference; the mapped weights file it read them from stays resident beside that copy
(file-backed pages: 2x the weights in RSS). So the loader maps the weights file itself, read-only
(``_MappedFile``), hands OpenVINO the IR over that mapping, and returns the mapped pages to the page
cache (``madvise(MADV_DONTNEED)``) while it compiles and until the first inference has run, and after
each inference of a new shape: a page the plugin still reads is mapped in again from the page cache.
Measured (SD 1.5 UNet alone, a fresh process, 256², one inference): peak RSS fp32 7.0 GB (the IR compiled
as before) -> 3.7 GB (3.44 GB of weights); bf16 from the fp16 IR 1.9 GB (1.72 GB of weights).

Precision: OpenVINO's CPU plugin picks bf16 by itself on bf16 CPUs, so fp32 is always asked for
explicitly (``INFERENCE_PRECISION_HINT=f32``). In a bf16 entry, every component in
``BF16_COMPONENTS`` runs in bf16; the others stay fp32 (see that constant for the measurements).
A bf16 entry loaded on a CPU without native bf16 runs in fp32 (the runtime asks for f32 there rather
than let OpenVINO emulate bf16 on AVX-512 CPUs), with a warning: the IR's weights are fp16 (finer than
bf16), so the images are as good or better, only not faster.

int8 (``--precision int8``, the CPU classes of ``_cpu.INT8_MEASURED``: AMX, VNNI, AVX2): the UNet is
quantized after training with NNCF (the quantizer OpenVINO's own Stable Diffusion recipes use),
calibrated on the entry's own LCM trajectories (``builder/quantize.py``); its IR then holds int8 weights
and FakeQuantize nodes, which the CPU plugin runs as int8 kernels, with the rest of the graph in bf16
(native-bf16 CPUs) or fp32. The other components run as in a bf16 entry (bf16 where native, else fp32).
The scheme is one of ``INT8_SCHEMES``, recorded in the component's ``quantization``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .._util import folder_bytes, writing
from ..adapters.spec import INPUT_PREFIX
from ..errors import UserError
from . import entry_file, is_str_list, is_threads, rebuild_hint, thread_count

ADAPTER_INPUTS = INPUT_PREFIX + "."

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
SPEED_RANK = {"fp32": 1, "bf16": 0, "int8": 0}
"""bf16: only OpenVINO builds it. fp32: faster than ONNX Runtime for every SD 1.5 component at 256² and
512² (UNet 952 vs 998 ms and 4.56 vs 4.86 s; VAE decoder 2.91 vs 3.06 s and 12.2 vs 12.4 s; 2 cores of an
AMD EPYC, reports cpu-backends-256/512)."""
VERIFY_IN_BUILD = True
REFIT = True
"""Refit: a new IR from the patched exported graph (constants replaced)."""
REFIT_NEEDS_FLAG = False
"""Every entry is refittable (its exported graph is kept beside the store, ``store.manifest.refit_source_dir``):
``--refit`` changes nothing."""
ADAPTERS = True
"""Adapter branches take their factors as inputs with a dynamic rank (``adapters/graph.py``)."""
MERGE_EXACT = False
"""A merged batch may pick other kernels than a solo call (not measured byte-exact): ``serve`` merges
requests only when ``--max-batch-size`` asks."""
BF16_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
"""Components that run in bf16 in a bf16 entry. Measured per component (benchmarks/cpu_backends.py,
reports/cpu-backends-512: SD 1.5 configs at 512², AVX512_BF16 CPU): bf16 is 1.9x (text encoder),
2.05x (UNet) and 1.9x (VAE decoder) faster than fp32; the 4-step image is at 49.6 dB PSNR against
all-fp32 with every component in bf16, and keeping one in fp32 buys 0.1 dB (text encoder), 1.5 dB
(VAE: +5.2 s) or 5.6 dB (UNet: +7.7 s). Every component pays, so all run in bf16."""
INT8_COMPONENTS = ("unet",)
"""Components quantized in an int8 entry: the UNet is ~90 % of an image's compute (4 calls); the text
encoder runs once and the VAE decoder's quality shows directly in the pixels, so both stay as in a
bf16 entry (the tiny decoder, ``--vae-decoder``, is the VAE's speed option)."""
INT8_SCHEMES = {
    "w8a8": "full int8: weights and activations of every convolution and matrix product (nncf.quantize, "
            "ModelType.TRANSFORMER, SmoothQuant and bias correction off, as OpenVINO's Stable Diffusion recipes)",
    "w8a8-sq": "full int8 with SmoothQuant on the matrix products (alpha 0.95, NNCF's transformer default)",
    "hybrid": "optimum-intel's hybrid mode: int8 weights only for the matrix products with weights (they compute in "
              "bf16/fp32), full int8 for convolutions and the attention products",
    "w8": "int8 weights only (nncf.compress_weights INT8_ASYM): every product computes in bf16/fp32; smaller, "
          "barely faster on a compute-bound UNet (benchmarks/reports/cpu-fast)",
}
DEFAULT_INT8_SCHEME = "w8a8"
"""Measured (benchmarks/reports/cpu-fast: demo:sd15-full, 2 cores of an AMD EPYC Zen 4 with AVX512_VNNI, 3
interleaved rounds, 3 held-out prompts): the fastest scheme whose worst image passes the int8 gate. UNet step
at 512² / 256²: w8a8 1.448 / 0.307 s (1.58x / 1.68x the bf16 step), w8a8-sq 1.521 / 0.307 s, w8 2.200 /
0.445 s (bf16: 2.290 / 0.516 s); worst 4-step image against PyTorch fp32 42.6 dB (w8a8), 43.1 dB (w8a8-sq),
48.8 dB (w8), SSIM 0.999-1.000 (bf16: 49.2 dB). hybrid was not in that run."""
NNCF_HINT = "pip install nncf (part of lcm-export's [build] extra)"
INSTALL_HINT = "pip install 'openvino>=2024.0' (part of lcm-export's base install)"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
IR_NAME = "openvino_model"
"""Each component's IR is ``<component>/openvino_model.xml`` + ``.bin``: the names OpenVINO GenAI's
``Text2ImagePipeline`` (and optimum-intel) read, so an entry is also a GenAI folder."""
IR_XML = f"{IR_NAME}.xml"
STATIC_SHAPES = True
"""``load_engine(..., static=True)``: each engine compiled for its call's input shapes (``OvEngine``)."""
GENAI = True
"""An entry is also an OpenVINO GenAI model folder (``builder/genai.py`` writes the rest of that layout)."""
GENAI_INPUT_TYPES = {"unet": {"timestep": "i64"}}  # names of ov.Type members
"""Inputs whose IR element type is what GenAI feeds rather than what was exported: GenAI sets the UNet's
``timestep`` as an i64 tensor (our graph takes float32). The IR takes i64 and converts it to f32 as its first
operation, so nothing else changes; the lean runtime's float32 timesteps (LCM's are whole numbers) are
converted to i64 by OpenVINO when fed."""
SECTION = {  # the manifest section's values the runtime reads (checked with the manifest's schema)
    "version": lambda v: isinstance(v, str), "inference_num_threads": is_threads, "cpu_flags": is_str_list,
}
COMPONENT_FIELDS = {"compiled_blob": lambda v, c: isinstance(v, str) and v in c.get("files", []),  # recipe-6 entries
                    "inference_precision": lambda v, c: v in OV_PRECISION}
"""Component fields the runtime reads, checked on load (``store.manifest_problems``)."""


def status() -> tuple[bool, str, str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False, "cpu", f"the openvino package is not installed: {INSTALL_HINT}"
    return True, "cpu", "ok"


def default_precision(device: str, cpu_bf16: bool) -> str:
    return "bf16" if cpu_bf16 else "fp32"


def _version() -> str:
    import openvino as ov

    return ov.get_version()


def entry_settings(threads: int | None, device: str) -> dict:
    from .._cpu import recorded_flags, usable_cores

    return {"version": _version(), "device": "CPU", "inference_num_threads": threads or usable_cores(),
            "performance_hint": "LATENCY", "num_streams": 1, "cpu_flags": recorded_flags()}


def compile_config(precision: str, threads: int | None) -> dict:
    cfg = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def component_precision(entry_precision: str, comp: str, cpu_bf16: bool) -> str:
    """What ``comp`` runs in, in an entry of ``entry_precision`` (bf16 / int8 entries: see BF16_COMPONENTS,
    INT8_COMPONENTS; an int8 entry's other components are bf16 where the CPU has native bf16, else fp32)."""
    if entry_precision == "int8" and comp in INT8_COMPONENTS:
        return "int8"
    if entry_precision in ("bf16", "int8") and comp in BF16_COMPONENTS and (entry_precision == "bf16" or cpu_bf16):
        return "bf16"
    return "fp32"


def quantize(model, scheme: str, calibration: list):
    """``model`` (an ov.Model of the fp32 graph) quantized by NNCF with ``scheme`` (INT8_SCHEMES), calibrated
    on ``calibration`` (the graph's feeds, one dict per UNet call); returns (model, record)."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    except ImportError:
        raise UserError(f"--precision int8 needs NNCF to quantize the UNet: {NNCF_HINT}") from None
    if scheme not in INT8_SCHEMES:
        raise UserError(f"int8 scheme {scheme!r}: choose {', '.join(INT8_SCHEMES)}")
    if not calibration:
        raise ValueError("int8 quantization needs calibration feeds")
    rec = {"scheme": scheme, "what": INT8_SCHEMES[scheme], "tool": f"nncf {nncf.__version__}"}
    with _quiet_nncf():
        return _quantize(nncf, AdvancedSmoothQuantParameters, model, scheme, calibration, rec)


def _quantize(nncf, AdvancedSmoothQuantParameters, model, scheme, calibration, rec):
    if scheme == "w8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM), {**rec, "weights": "int8_asym per channel"}
    ignored = None
    if scheme == "hybrid":
        names = _weighted_matmuls(model)  # before compression: then their weights are plain constants
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        ignored = nncf.IgnoredScope(names=names)
        rec["weights_only_matmuls"] = len(names)
    alpha = 0.95 if scheme == "w8a8-sq" else -1
    adv = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha),
                                              disable_bias_correction=True)
    model = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(calibration), ignored_scope=ignored, advanced_parameters=adv)
    return model, {**rec, "smooth_quant_alpha": alpha, "bias_correction": False, "subset_size": len(calibration),
                   "model_type": "transformer", "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())}


class _quiet_nncf:
    """NNCF logs every quantizer it places (INFO, to stdout) and draws rich progress bars on stdout: the build
    shows its own progress, so both are held back (errors still raise)."""

    def __enter__(self):
        import contextlib
        import io
        import logging

        self.logger = logging.getLogger("nncf")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        self.redirect = contextlib.redirect_stdout(io.StringIO())
        self.redirect.__enter__()

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)
        self.logger.setLevel(self.level)


def _weighted_matmuls(model) -> list[str]:
    """Names of the MatMuls with a constant (weight) input: the layers hybrid mode keeps weights-only."""
    out = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for i in range(2):
            src = op.input_value(i).get_node()
            if src.get_type_name() == "Convert":
                src = src.input_value(0).get_node()
            if src.get_type_name() == "Constant":
                out.append(op.get_friendly_name())
                break
    return out


def build_component(job) -> dict:
    """ONNX -> the IR, its weights once in the form this component computes from: fp32; fp16 where it runs in
    bf16 (the CPU plugin converts them to bf16 as it compiles); int8: NNCF's quantized model (its other
    constants fp16 where they run in bf16)."""
    import openvino as ov

    from .._cpu import native_bf16

    comp = job.component
    precision = component_precision(job.precision, comp, native_bf16())
    runs_in = precision
    folder = job.out_dir / comp
    folder.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    model = core.read_model(str(job.onnx))
    extra = {}
    if precision == "int8":
        model, extra["quantization"] = quantize(model, job.int8_scheme or DEFAULT_INT8_SCHEME, job.calibration)
        runs_in = extra["inference_precision"] = "bf16" if native_bf16() else "fp32"
    model = genai_inputs(model, comp)
    need = int(folder_bytes(job.onnx) * 1.3)  # IR = the weights (.bin, <= the fp32 ONNX) + a text graph (.xml; measured <= 1.3x the ONNX)
    with writing(folder / IR_XML, need):  # a full disk: RuntimeError "basic_ios::clear: iostream error"
        ov.save_model(model, str(folder / IR_XML), compress_to_fp16=runs_in == "bf16")
    del model
    files = [f"{comp}/{IR_XML}", f"{comp}/{IR_NAME}.bin"]
    return {"engines": {"*": f"{comp}/{IR_XML}"}, "files": files, "precision": precision, **extra}


def genai_inputs(model, comp: str):
    """``model`` with the input element types GenAI feeds (``GENAI_INPUT_TYPES``): a Convert at the input,
    the graph after it unchanged."""
    import openvino as ov

    types = {n: t for n, t in GENAI_INPUT_TYPES.get(comp, {}).items()
             if any(n in i.get_names() and i.get_element_type() != getattr(ov.Type, t) for i in model.inputs)}
    if not types:
        return model
    ppp = ov.preprocess.PrePostProcessor(model)
    for name, t in types.items():
        ppp.input(name).tensor().set_element_type(getattr(ov.Type, t))
    return ppp.build()


def ov_message(exc: Exception) -> str:
    """The line of an OpenVINO error that says what is wrong (its first lines are C++ source locations)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    said = [l for l in lines if not l.startswith("Exception from ")]
    return ((said or lines or [type(exc).__name__])[0])[:200]


def check(manifest: dict, engine_dir: Path) -> list[str]:
    from .._cpu import INT8_CLASS_NAMES, int8_class, int8_pays, native_bf16

    ok, _, reason = status()
    if not ok:
        raise UserError(f"{engine_dir} holds OpenVINO engines but {reason}")
    warnings = []
    bf16 = [c for c, r in manifest.get("components", {}).items() if r.get("precision") == "bf16"]
    if bf16 and not native_bf16():
        warnings.append(f"{engine_dir} was built for bf16 ({', '.join(bf16)}), but this CPU has no native bf16 "
                        "(AMX / AVX512_BF16): it runs in fp32, correct but no faster; for the fastest entry here, "
                        f"{rebuild_hint(engine_dir)}")
    int8 = [c for c, r in manifest.get("components", {}).items() if r.get("precision") == "int8"]
    if int8 and not int8_pays():
        warnings.append(f"{engine_dir} has an int8 {', '.join(int8)}, but int8 has not been measured on this CPU class "
                        f"({INT8_CLASS_NAMES[int8_class()]}): it runs, with the same images, at a speed not measured here "
                        "(it may be slower than a bf16 or fp32 entry); for the entry lcm-export picks here, "
                        f"{rebuild_hint(engine_dir)} --precision auto")
    return warnings


def _blob_usable(manifest: dict) -> bool:
    """A recipe-6 entry's compiled blob: importable when this OpenVINO and CPU are the ones it was built with."""
    from .._cpu import recorded_flags

    section = manifest.get("openvino", {})
    return section.get("version") == _version() and section.get("cpu_flags") == recorded_flags()


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None,
                static: bool = False):
    """``static``: compile for each call's input shapes (see ``OvEngine``) instead of the entry's dynamic ones;
    a component of an entry from before build recipe 7 with a usable compiled blob runs the blob as built."""
    from .._cpu import native_bf16

    section = manifest.get("openvino", {})
    rec = manifest["components"][component]
    n = thread_count(threads, section.get("inference_num_threads"))
    built = run_precision(rec)
    precision = built
    if precision == "bf16" and not native_bf16():  # OpenVINO would emulate bf16 on AVX-512 CPUs without it: run fp32
        precision = "fp32"
    usable = rec.get("compiled_blob") and _blob_usable(manifest) and precision == built
    blob = entry_file(engine_dir, rec["compiled_blob"]) if usable else None
    return OvEngine(path, precision, n, engine_dir, blob, static and blob is None)  # a compiled blob runs as it was built


def run_precision(rec: dict) -> str:
    """The inference precision a component was compiled with: its precision, or for an int8 component the
    precision of its unquantized operations (``inference_precision``)."""
    precision = rec.get("precision", "fp32")
    return rec.get("inference_precision", "fp32") if precision == "int8" else precision


class _MappedFile:
    """A file mapped read-only (PROT_READ: a write into it faults instead of changing weights), as a numpy
    array OpenVINO may share (its Python API takes writable arrays only; it never writes constants).
    ``drop()`` returns the resident pages to the page cache (the file is unchanged: a page read again is
    mapped in again). Unmapped when the last reference (OpenVINO's constants hold the array) goes.
    Where POSIX mmap is missing, a copy-on-write ``np.memmap`` whose ``drop`` does nothing."""

    def __init__(self, path: Path):
        import ctypes
        import mmap
        import os

        size = path.stat().st_size
        self._drop = None
        if os.name != "posix" or size == 0:
            self.array = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        buf = (ctypes.c_uint8 * size).from_address(addr)
        buf._unmap = _Unmap(libc, addr, size)  # lives as long as the buffer: the array's base holds it
        self.array = np.ctypeslib.as_array(buf)
        advice = getattr(mmap, "MADV_DONTNEED", 4)
        self._drop = lambda: libc.madvise(addr, size, advice)

    def drop(self) -> None:
        if self._drop is not None:
            self._drop()


class _Unmap:
    def __init__(self, libc, addr: int, size: int):
        self.libc, self.addr, self.size = libc, addr, size

    def __del__(self):
        self.libc.munmap(self.addr, self.size)


class _Reclaim:
    """Drops ``mapped``'s resident pages every ``period`` seconds until ``stop()``: while the CPU plugin
    compiles and runs its first inference it reads each weight once to repack it, and the pages it read
    would otherwise stay resident beside its copy (peak RSS 2x the weights)."""

    def __init__(self, mapped: _MappedFile, period: float = 0.05):
        self.mapped, self.period = mapped, period
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ov-reclaim", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.done.wait(self.period):
            self.mapped.drop()

    def stop(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self.thread.join()
        self.mapped.drop()


class OvEngine:
    """One compiled OpenVINO model and one infer request (calls are serialized by the caller).

    ``static``: the IR is read at load and compiled at the first call, reshaped to that call's input shapes
    (every input but the adapter factors, whose rank stays free; with no adapter active, the IR with its
    branches cut out); a call with other shapes, or a switch between no adapter and some, compiles again, in
    place of the last. The CPU plugin runs a static-shape model faster (a 256² SD 1.5 UNet step 19 % faster on
    an AMX Xeon: benchmarks/reports/competitors-256/static_ab.md); the weights are still held once. Dynamic
    (the default) compiles once for every size and batch the entry was built for: for callers that mix them."""

    def __init__(self, xml: Path, precision: str, threads: int | None, engine_dir: Path, blob: Path | None = None,
                 static: bool = False):
        import openvino as ov

        for p in (xml, xml.with_suffix(".bin")):
            if not p.is_file():
                raise UserError(f"engine file {p} is missing; {rebuild_hint(engine_dir)}")
        core = ov.Core()
        cfg = compile_config(precision, threads)
        self.compiled = self._mapped = self._reclaim = self._model = self.request = None
        self._core, self._cfg, self._xml, self._engine_dir = core, cfg, xml, engine_dir
        self._static_key: tuple | None = None
        """(branches cut out?, input shapes) the static model was compiled for (None: not compiled yet, or dynamic)."""
        self._plain_model = self._xml_bytes = None
        self._no_plain = False
        if blob is not None and blob.is_file():
            # a recipe-6 entry's blob, mapped (importing the SD 1.5 UNet's 3.4 GB blob from bytes took 17.2 s,
            # from a mapped tensor 0.8 s). An OpenVINO that cannot import it (damaged blob) falls back to the IR.
            try:
                self._mapped = _MappedFile(blob)
                self._reclaim = _Reclaim(self._mapped)
                self.compiled = core.import_model(ov.Tensor(self._mapped.array, shared_memory=True), "CPU", cfg)
                self.source = "blob"
            except Exception:  # noqa: BLE001 - any failure here has the IR as its remedy
                if self._reclaim is not None:
                    self._reclaim.stop()
                self._mapped = self._reclaim = self.compiled = None
        try:
            if self.compiled is None:
                self._mapped = _MappedFile(xml.with_suffix(".bin"))
                self._reclaim = None if static else _Reclaim(self._mapped)  # static: each compile starts its own
                text = xml.read_bytes()
                model = core.read_model(text, ov.Tensor(self._mapped.array, shared_memory=True))
                if static:
                    self._model, self._xml_bytes = model, text  # compiled at the first call, for its shapes
                else:
                    self.compiled = core.compile_model(model, "CPU", cfg)
                del model  # the compiled model keeps what it needs
                self.source = "ir"
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ traces
            self._failed(exc)
        ports = self.compiled if self.compiled is not None else self._model
        if self.compiled is not None:
            self.request = self.compiled.create_infer_request()
        self.n_outputs = len(ports.outputs)
        self.precision = precision
        self._sticky = {n for i in ports.inputs for n in i.get_names() if n.startswith(ADAPTER_INPUTS)}
        """Adapter factor inputs: set on the request once and kept while the caller passes the same arrays."""
        self._bound: dict[str, np.ndarray] = {}
        self._shapes: set = set()
        """Feed shapes run so far: a new one may make the plugin read (and repack) weights again; their pages go after."""
        self._lock = threading.Lock()  # one infer request: calls from several threads take turns

    def _failed(self, exc: Exception):
        if self._reclaim is not None:
            self._reclaim.stop()
        first = ov_message(exc)
        raise UserError(f"engine file {self._xml} (or its .bin/.blob) is corrupt or truncated ({first}); "
                        f"{rebuild_hint(self._engine_dir)}") from None

    def _static_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compile for ``feeds`` unless the last compile was for the same; return what the compiled model takes.
        Adapter factors: with none active (every rank 0) the IR without its branches runs (``_plain``: the speed
        of an entry built without ``--adapters``); with some active, the branches keep a free rank, so that
        switching between adapters compiles nothing (only a switch between none and some does)."""
        import openvino as ov

        active = any(np.size(v) for k, v in feeds.items() if k in self._sticky)
        plain = bool(self._sticky) and not active and self._plain() is not None
        if plain:
            feeds = {k: v for k, v in feeds.items() if k not in self._sticky}
        shapes = tuple(sorted((k, np.shape(v)) for k, v in feeds.items() if k not in self._sticky))
        if (plain, shapes) != self._static_key:
            self.request = self.compiled = self._static_key = None  # the last compiled model's memory goes first
            self._bound, self._shapes = {}, set()  # its first inference repacks weights again: their pages go after
            if self._reclaim is not None:
                self._reclaim.stop()
            self._reclaim = _Reclaim(self._mapped)  # the pages this compile reads go while it runs
            model = self._plain_model if plain else self._model
            try:
                model.reshape({k: ov.PartialShape(list(v)) for k, v in shapes})
                self.compiled = self._core.compile_model(model, "CPU", self._cfg)
                self.request = self.compiled.create_infer_request()
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line C++ traces
                self.request = self.compiled = None
                self._reclaim.stop()
                described = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes)
                raise UserError(f"{self._xml}: OpenVINO could not compile it for these shapes ({described}): "
                                f"{ov_message(exc)}; run with --shapes dynamic, or if the entry is damaged "
                                f"{rebuild_hint(self._engine_dir)}") from None
            self._static_key = (plain, shapes)
        return feeds

    def _plain(self):
        """The IR with its adapter branches cut out (each branch's Add replaced by the layer's own output, the
        factor inputs removed), read once; None where the branches cannot all be found by name."""
        if self._plain_model is None and not self._no_plain:
            import re

            import openvino as ov

            self._no_plain = True  # unless all goes well: the branches then run at rank 0
            try:
                model = self._core.read_model(self._xml_bytes, ov.Tensor(self._mapped.array, shared_memory=True))
                merge = re.compile(r"/adapter/[^/]+/\d+/Add")
                cut = 0
                for op in model.get_ops():
                    if op.get_type_name() == "Add" and merge.fullmatch(op.get_friendly_name()):
                        op.output(0).replace(op.input_value(0))
                        cut += 1
                factors = [p for p in model.get_parameters() if any(n.startswith(ADAPTER_INPUTS) for n in p.output(0).get_names())]
                left = [op for op in model.get_ordered_ops() if op.get_friendly_name().startswith("/adapter/")
                        and op.get_type_name() != "Parameter"]
                if cut * 3 != len(factors) or left:  # an IR whose branches are not where the build wrote them
                    return None
                for p in factors:
                    model.remove_parameter(p)
                model.validate_nodes_and_infer_types()
            except Exception:  # noqa: BLE001 - the branched IR still runs
                return None
            self._plain_model, self._no_plain = model, False
        return self._plain_model

    def __del__(self):
        reclaim = getattr(self, "_reclaim", None)
        if reclaim is not None:  # an engine dropped before its first inference: its thread ends too
            reclaim.done.set()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._model is not None:
                feeds = self._static_feeds(feeds)
            if self._sticky:
                import openvino as ov

                fresh = {}
                for k, v in feeds.items():
                    if k not in self._sticky:
                        fresh[k] = v
                    elif self._bound.get(k) is not v:  # the runtime's arrays are never written: identity = same values
                        self.request.set_tensor(k, ov.Tensor(np.ascontiguousarray(v), shared_memory=True))
                        self._bound[k] = v
                feeds = fresh
            res = self.request.infer(feeds)  # share_outputs=False: copies, safe across calls
            shapes = tuple(sorted((k, np.shape(v)) for k, v in feeds.items()))
            if shapes not in self._shapes:  # the first inference of a shape repacks weights: drop what it read
                self._shapes.add(shapes)
                self._reclaim.stop()
            return [np.asarray(res[i]) for i in range(self.n_outputs)]
