"""ONNX Runtime engines: an ORT-optimized graph per component, provider and thread settings recorded.

CPU: the stored graph is optimized at ``ORT_ENABLE_ALL``, NCHWc layout included, so loading it
takes about 1 s instead of the 5-8 s ORT spends re-optimizing the SD 1.5 UNet at every start
(measured here; see benchmarks/reports/ort-settings-256). The NCHWc block size follows the CPU's
vector ISA, so the manifest records it (``cpu_isa``) and the runtime refuses a graph built for
another ISA, with a rebuild hint. CUDA: the graph is stored at ``ORT_ENABLE_EXTENDED`` and the
runtime applies ``ORT_ENABLE_ALL`` at load. Attention is left as exported (MatMul-Softmax-MatMul):
fusing it with ``onnxruntime.transformers.optimizer`` into Attention/MultiHeadAttention measured no
faster on CPU for SD 1.5 or SDXL (benchmarks/attention_ab.py, reports/attention-fusion*).
Intra-op thread spinning is off: with one session per component on few cores, a session's
spinning workers compete with the next session's (measured no slower for the UNet alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._util import folder_bytes, writing
from ..errors import UserError
from . import is_str_list, is_threads, rebuild_hint, thread_count

NAME = "onnxruntime"
PRECISIONS = ("fp32",)
SPEED_RANK = {"fp32": 2}
"""Measured slower than OpenVINO fp32 for every SD 1.5 component at 256² and 512² (by 4-9 %;
benchmarks/reports/cpu-backends-{256,512}), so ``auto`` prefers OpenVINO for fp32 too."""
VERIFY_IN_BUILD = True
REFIT = True
"""Refit: the stored graph is re-optimized from the patched exported graph (weights are pre-packed)."""

LEVELS = {  # device -> (stored graph level, level applied at load)
    "cpu": ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"),
    "cuda": ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"),
}
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL")
SECTION = {  # the manifest section's values the runtime reads (checked with the manifest's schema)
    "providers": lambda v: is_str_list(v) and bool(v), "runtime_optimization": lambda v: v in OPT_LEVELS,
    "stored_optimization": lambda v: v in OPT_LEVELS, "intra_op_threads": is_threads,
    "allow_spinning": lambda v: isinstance(v, bool), "cpu_isa": lambda v: isinstance(v, str),
}


def providers_for(device: str) -> list[str]:
    """ORT providers for ``cuda`` or ``cpu`` (CPU is always the fallback)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def status() -> tuple[bool, str, str]:
    """(usable, device, reason): ONNX Runtime is a base dependency; CUDA where onnxruntime-gpu sees a GPU."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, "cpu", "onnxruntime is not installed: pip install onnxruntime"
    return True, "cuda" if cuda_available() else "cpu", "ok"


def default_precision(device: str, cpu_bf16: bool) -> str:
    return "fp32"  # its CPU provider has no fast bf16 or fp16 kernels


def entry_settings(threads: int | None, device: str) -> dict:
    from .._cpu import usable_cores

    stored, at_load = LEVELS[device]
    info = {"stored_optimization": stored, "runtime_optimization": at_load, "providers": providers_for(device),
            "allow_spinning": False, "intra_op_threads": threads or usable_cores(), "inter_op_threads": 1,
            "execution_mode": "sequential"}
    if device == "cpu":
        from .._cpu import cpu_isa

        info["cpu_isa"] = cpu_isa()
    return info


def build_component(job) -> dict:
    """Store the ORT-optimized graph of one component; one graph serves every shape plan."""
    dst = job.out_dir / job.component / "model.onnx"
    device = "cuda" if "CUDAExecutionProvider" in job.section["providers"] else "cpu"
    optimize_graph(job.onnx, dst, device)
    files = [f"{job.component}/{f.name}" for f in sorted(dst.parent.iterdir())]
    return {"engines": {"*": f"{job.component}/model.onnx"}, "files": files, "precision": "fp32"}


def check(manifest: dict, engine_dir: Path) -> list[str]:
    """Graphs stored at ORT_ENABLE_ALL are laid out for one vector ISA: refuse another CPU's."""
    built_isa = manifest.get("onnxruntime", {}).get("cpu_isa")
    if built_isa:
        from .._cpu import cpu_isa

        here = cpu_isa()
        if here != built_isa:
            raise UserError(f"{engine_dir} holds ONNX Runtime graphs optimized for {built_isa} CPUs; this CPU is {here}; "
                            f"{rebuild_hint(engine_dir)}")
    return []


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    cfg = manifest.get("onnxruntime", {})
    return OrtEngine(path, cfg.get("providers", ["CPUExecutionProvider"]), thread_count(threads, cfg.get("intra_op_threads")),
                     cfg.get("runtime_optimization", "ORT_ENABLE_ALL"), engine_dir, bool(cfg.get("allow_spinning", False)))


class OrtEngine:
    """An ONNX Runtime session over a stored graph. CPU: plain run; CUDA: IO binding."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, opt_level: str = "ORT_ENABLE_ALL",
                 engine_dir: Path | None = None, allow_spinning: bool = False):
        import onnxruntime as ort

        if not path.is_file():
            raise UserError(f"engine file {path} is missing; {rebuild_hint(engine_dir or path.parent.parent)}")
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
            raise UserError(f"engine file {path} is corrupt or truncated ({first}); {rebuild_hint(engine_dir or path.parent.parent)}") from None
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


def optimize_graph(src: Path, dst: Path, device: str) -> dict:
    """Write ``src`` optimized for ``device`` to ``dst``; return the settings to record."""
    import onnxruntime as ort

    from .._cpu import cpu_isa

    stored, at_load = LEVELS[device]
    providers = providers_for(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, stored)
    so.log_severity_level = 3  # ORT warns that ENABLE_ALL graphs are hardware-specific: we record and check that
    so.optimized_model_filepath = str(dst)
    size = folder_bytes(src)  # the graph + any data it references
    if size > EXTERNAL_DATA_THRESHOLD:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with writing(dst, size):  # a full disk: InvalidProtobuf "Protobuf serialization failed", not an OSError
        ort.InferenceSession(str(src), so, providers=providers)
    info = {"stored_optimization": stored, "runtime_optimization": at_load, "providers": providers, "allow_spinning": False}
    if device == "cpu":
        info["cpu_isa"] = cpu_isa()
    return info
