"""OpenVINO engines on the CPU: fp32, or bf16 where the CPU computes bf16 natively (AMX, AVX512_BF16).

Built from the exported ONNX (ONNX stays the interchange format). Each component stores
  - ``model.xml`` / ``model.bin``: OpenVINO IR with fp32 weights (the portable form);
  - ``model.blob``: the compiled model (``CompiledModel.export_model``) for this OpenVINO version, CPU
    and precision, imported memory-mapped at load (SD 1.5 UNet: 0.8 s, against 1.8-4.6 s to compile
    the IR and 17 s to import the same blob from bytes).
The runtime imports the blob when the manifest's OpenVINO version and CPU flags match this machine,
and otherwise compiles the IR (slower start, same results) with a one-line warning.

Precision: OpenVINO's CPU plugin picks bf16 by itself on bf16 CPUs, so fp32 is always asked for
explicitly (``INFERENCE_PRECISION_HINT=f32``). In a bf16 entry, every component in
``BF16_COMPONENTS`` runs in bf16; the others stay fp32 (see that constant for the measurements).
A bf16 entry loaded on a CPU without native bf16 runs in fp32 (the runtime asks for f32 there rather
than let OpenVINO emulate bf16 on AVX-512 CPUs), with a warning: the IR's weights are fp32, so the
images are as good or better, only not faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._util import folder_bytes, writing
from ..errors import UserError
from . import is_str_list, is_threads, rebuild_hint, thread_count

NAME = "openvino"
PRECISIONS = ("fp32", "bf16")
SPEED_RANK = {"fp32": 1, "bf16": 0}
"""bf16: only OpenVINO builds it. fp32: faster than ONNX Runtime for every SD 1.5 component at 256² and
512² (UNet 952 vs 998 ms and 4.56 vs 4.86 s; VAE decoder 2.91 vs 3.06 s and 12.2 vs 12.4 s; reports
cpu-backends-256/512)."""
VERIFY_IN_BUILD = True
REFIT = True
"""Refit: new IR and compiled blob from the patched exported graph (constants replaced, recompiled)."""
BF16_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
"""Components that run in bf16 in a bf16 entry. Measured per component (benchmarks/cpu_backends.py,
reports/cpu-backends-512: SD 1.5 configs at 512², AVX512_BF16 CPU): bf16 is 1.9x (text encoder),
2.05x (UNet) and 1.9x (VAE decoder) faster than fp32; the 4-step image is at 49.6 dB PSNR against
all-fp32 with every component in bf16, and keeping one in fp32 buys 0.1 dB (text encoder), 1.5 dB
(VAE: +5.2 s) or 5.6 dB (UNet: +7.7 s). Every component pays, so all run in bf16."""
INSTALL_HINT = "pip install 'openvino>=2024.0' (part of lcm-export's base install)"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
SECTION = {  # the manifest section's values the runtime reads (checked with the manifest's schema)
    "version": lambda v: isinstance(v, str), "inference_num_threads": is_threads, "cpu_flags": is_str_list,
}
COMPONENT_FIELDS = {"compiled_blob": lambda v, c: isinstance(v, str) and v in c.get("files", [])}


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


def build_component(job) -> dict:
    """ONNX -> IR (fp32 weights) + the compiled blob for this CPU and precision."""
    import openvino as ov

    comp = job.component
    precision = "bf16" if job.precision == "bf16" and comp in BF16_COMPONENTS else "fp32"
    folder = job.out_dir / comp
    folder.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    model = core.read_model(str(job.onnx))
    need = int(folder_bytes(job.onnx) * 1.3)  # IR = the fp32 weights (.bin) + a text graph (.xml; measured <= 1.3x the ONNX)
    with writing(folder / "model.xml", need):  # a full disk: RuntimeError "basic_ios::clear: iostream error"
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    del model
    compiled = core.compile_model(str(folder / "model.xml"), "CPU", compile_config(precision, job.section["inference_num_threads"]))
    stream = compiled.export_model()  # a BytesIO in current releases (bytes in some older ones)
    del compiled
    with writing(folder / "model.blob"), open(folder / "model.blob", "wb") as f:
        f.write(stream.getbuffer() if hasattr(stream, "getbuffer") else stream)
    del stream
    files = [f"{comp}/model.xml", f"{comp}/model.bin", f"{comp}/model.blob"]
    return {"engines": {"*": f"{comp}/model.xml"}, "files": files, "precision": precision,
            "compiled_blob": f"{comp}/model.blob"}


def ov_message(exc: Exception) -> str:
    """The line of an OpenVINO error that says what is wrong (its first lines are C++ source locations)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    said = [l for l in lines if not l.startswith("Exception from ")]
    return ((said or lines or [type(exc).__name__])[0])[:200]


def check(manifest: dict, engine_dir: Path) -> list[str]:
    from .._cpu import native_bf16

    ok, _, reason = status()
    if not ok:
        raise UserError(f"{engine_dir} holds OpenVINO engines but {reason}")
    warnings = []
    bf16 = [c for c, r in manifest.get("components", {}).items() if r.get("precision") == "bf16"]
    if bf16 and not native_bf16():
        warnings.append(f"{engine_dir} was built for bf16 ({', '.join(bf16)}), but this CPU has no native bf16 "
                        "(AMX / AVX512_BF16): it runs in fp32, correct but no faster; for the fastest entry here, "
                        f"{rebuild_hint(engine_dir)}")
    return warnings


def _blob_usable(manifest: dict) -> bool:
    from .._cpu import recorded_flags

    section = manifest.get("openvino", {})
    return section.get("version") == _version() and section.get("cpu_flags") == recorded_flags()


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    from .._cpu import native_bf16

    section = manifest.get("openvino", {})
    rec = manifest["components"][component]
    n = thread_count(threads, section.get("inference_num_threads"))
    precision = rec.get("precision", "fp32")
    if precision == "bf16" and not native_bf16():  # OpenVINO would emulate bf16 on AVX-512 CPUs without it: run fp32
        precision = "fp32"
    usable = rec.get("compiled_blob") and _blob_usable(manifest) and precision == rec.get("precision", "fp32")
    return OvEngine(path, precision, n, engine_dir, engine_dir / rec["compiled_blob"] if usable else None)


class OvEngine:
    """One compiled OpenVINO model and one infer request (calls are serialized by the caller)."""

    def __init__(self, xml: Path, precision: str, threads: int | None, engine_dir: Path, blob: Path | None = None):
        import openvino as ov

        for p in (xml, xml.with_suffix(".bin")):
            if not p.is_file():
                raise UserError(f"engine file {p} is missing; {rebuild_hint(engine_dir)}")
        core = ov.Core()
        cfg = compile_config(precision, threads)
        self.compiled = None
        if blob is not None and blob.is_file():
            # memory-mapped, not read: importing the SD 1.5 UNet's 3.4 GB blob from bytes took 17.2 s, from
            # a mapped tensor 0.8 s (compiling the IR: 2-4.6 s). Copy-on-write so OpenVINO may take it as
            # writable; it is never written. Kept alive with the engine (the import may reference it).
            # An OpenVINO that cannot import it (older Python API, damaged blob) falls back to the IR.
            try:
                self._blob = np.memmap(blob, dtype=np.uint8, mode="c")
                self.compiled = core.import_model(ov.Tensor(self._blob, shared_memory=True), "CPU", cfg)
                self.source = "blob"
            except Exception:  # noqa: BLE001 - any failure here has the IR as its remedy
                self._blob = self.compiled = None
        try:
            if self.compiled is None:
                self.compiled = core.compile_model(str(xml), "CPU", cfg)
                self.source = "ir"
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ traces
            first = ov_message(exc)
            raise UserError(f"engine file {xml} (or its .bin/.blob) is corrupt or truncated ({first}); {rebuild_hint(engine_dir)}") from None
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.precision = precision

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feeds)  # share_outputs=False: copies, safe across calls
        return [np.asarray(res[o]) for o in self.outputs]
