"""ONNX Runtime engines: an ORT-optimized graph per component, provider and thread settings recorded.
fp32 on CPUs and on the CUDA provider; fp16 on the CUDA provider only (``onnxruntime_fp16.py``: the
graph fused and converted the way ONNX Runtime's Stable Diffusion tooling does it). On CUDA the engines
bind device buffers and keep the latents on the GPU between steps (``onnxruntime_runtime.py``).

CPU: the stored graph is optimized at ``ORT_ENABLE_ALL``, NCHWc layout included, so loading it
takes about 1 s instead of the 5-8 s ORT spends re-optimizing the SD 1.5 UNet at every start
(measured here; see benchmarks/reports/ort-settings-256). The NCHWc block size follows the CPU's
vector ISA, so the manifest records it (``cpu_isa``) and the runtime refuses a graph built for
another ISA, with a rebuild hint. CUDA fp32: the graph is stored at ``ORT_ENABLE_EXTENDED`` and the
runtime applies ``ORT_ENABLE_ALL`` at load. CUDA fp16: the fused fp16 graph is stored as converted and
``ORT_ENABLE_ALL`` is applied at load. Every CUDA entry also gets the LCM step graphs (``step_graph.py``)
beside its UNet, for the device loop. Attention is left as exported (MatMul-Softmax-MatMul):
fusing it with ``onnxruntime.transformers.optimizer`` into Attention/MultiHeadAttention measured no
faster on CPU for SD 1.5 or SDXL (benchmarks/attention_ab.py, reports/attention-fusion*); fp16 CUDA
graphs are fused (ONNX Runtime's CUDA kernels for them are what its own SD pipeline uses).
Intra-op thread spinning is off: with one session per component on few cores, a session's
spinning workers compete with the next session's (measured no slower for the UNet alone).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._util import folder_bytes, writing
from ..errors import UserError
from . import CUDA_GRAPHS_ENV, cuda_graphs_enabled, entry_file, is_str_list, is_threads, rebuild_hint, thread_count

NAME = "onnxruntime"
PRECISIONS = ("fp32", "fp16")
SPEED_RANK = {"fp32": 2, "fp16": 1}
"""fp32: measured slower than OpenVINO fp32 for every SD 1.5 component at 256² and 512² (by 2-9 %, on 2 cores
of an AMD EPYC; benchmarks/reports/cpu-backends-{256,512}), so ``auto`` prefers OpenVINO for fp32 too.
fp16: not measured yet; ranks only matter among CPU backends, and fp16 is refused on CPUs."""
FP16_CPU_WHY = "ONNX Runtime's CPU provider has no fast fp16 kernels (nor any for the fused GroupNorm/attention ops)"
GRAPH_COMPONENTS = ("unet", "vae_decoder")
"""Components whose CUDA sessions (and the UNet's LCM step engines) capture CUDA graphs per fixed shape when
$LCM_EXPORT_CUDA_GRAPHS=1; the text encoders run once per image, without."""
STEP_FILES = {"plain": "lcm_step.onnx", "cfg": "lcm_step_cfg.onnx"}
"""The LCM step graphs written beside a CUDA entry's UNet (without and with guidance), fp32."""
VERIFY_IN_BUILD = True
REFIT = True
"""Refit: the stored graph is re-optimized from the patched exported graph (weights are pre-packed)."""
REFIT_NEEDS_FLAG = False
"""Every entry is refittable (its exported graph is kept beside the store, ``store.manifest.refit_source_dir``):
``--refit`` changes nothing."""
ADAPTERS = True
"""Adapter branches take their factors as ordinary inputs (``adapters/graph.py``)."""
MERGE_EXACT = True
"""Requests merged into one engine call give each request's solo image byte for byte (measured on the CPU:
tests/serving/test_batching.py), so ``serve`` merges by default on CPU entries (not on CUDA, unmeasured)."""

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
    return "fp16" if device == "cuda" else "fp32"  # its CPU provider has no fast bf16 or fp16 kernels


def precision_refusal(precision: str, device: str) -> str | None:
    """fp16 is built for the CUDA provider only: one line saying why, elsewhere."""
    if precision == "fp16" and device != "cuda":
        return ("--precision fp16 with --backend onnxruntime runs on ONNX Runtime's CUDA provider only (onnxruntime-gpu on an "
                f"NVIDIA GPU; this onnxruntime has none): {FP16_CPU_WHY}; use --precision fp32 here, or bf16 with --backend openvino")
    return None


def entry_settings(threads: int | None, device: str) -> dict:
    from .._cpu import usable_cores

    stored, at_load = LEVELS[device]
    info = {"stored_optimization": stored, "runtime_optimization": at_load, "providers": providers_for(device),
            "allow_spinning": False, "intra_op_threads": threads or usable_cores(), "inter_op_threads": 1,
            "execution_mode": "sequential"}
    if device == "cpu":
        from .._cpu import cpu_isa

        info["cpu_isa"] = cpu_isa()
    else:
        from .onnxruntime_runtime import CUDA_PROVIDER_OPTIONS, MAX_GRAPHS, MAX_STATIC_SESSIONS

        info["cuda_provider_options"] = dict(CUDA_PROVIDER_OPTIONS)
        info["cuda_graphs"] = {"enable_cuda_graph": f"on when ${CUDA_GRAPHS_ENV}=1 (off until a GPU run validates them)",
                               "components": [*GRAPH_COMPONENTS, "lcm_step"],
                               "sessions": "one per fixed input shape (symbolic dimensions pinned), gpu_graph_id per bound-buffer set",
                               "max_static_sessions": MAX_STATIC_SESSIONS, "max_graphs_per_session": MAX_GRAPHS}
    return info


def converts_to_fp16(component: str, precision: str, vae_fp32: bool) -> bool:
    """Whether a component of an entry is converted to fp16: every one of an fp16 entry but the VAE decoder
    where it must stay fp32 (``--vae-fp32`` or the VAE's ``force_upcast``, as on TensorRT). Pure."""
    return precision == "fp16" and not (component == "vae_decoder" and vae_fp32)


def build_component(job) -> dict:
    """Store the graph of one component (one graph serves every shape plan): fp32, optimized by ONNX Runtime
    for the device; fp16 (CUDA only), fused and converted (``onnxruntime_fp16.convert``). A CUDA entry's
    UNet gets the LCM step graphs beside it (the device loop)."""
    dst = job.out_dir / job.component / "model.onnx"
    device = "cuda" if "CUDAExecutionProvider" in job.section["providers"] else "cpu"
    rec = {"engines": {"*": f"{job.component}/model.onnx"}, "precision": "fp32"}
    if job.precision == "fp16":
        refusal = precision_refusal("fp16", device)
        if refusal:
            raise UserError(refusal)
        from .onnxruntime_fp16 import convert

        graph = convert(job.onnx, dst, job.component, fp16=converts_to_fp16(job.component, job.precision, job.vae_fp32))
        rec.update({"precision": graph["precision"], "graph": graph})
        if job.component == "vae_decoder" and graph["precision"] == "fp32":
            rec["fp32_reason"] = "the VAE overflows in fp16 (--vae-fp32 or the VAE's force_upcast)"
        job.section["stored_optimization"] = "onnxruntime.transformers fusions + fp16 conversion (no ONNX Runtime pass stored)"
        job.section["runtime_optimization"] = "ORT_ENABLE_ALL"
    else:
        optimize_graph(job.onnx, dst, device)
    if device == "cuda" and job.component == "unet":
        rec["lcm_step"] = {k: f"{job.component}/{f}" for k, f in write_step_graphs(dst.parent).items()}
    rec["files"] = [f"{job.component}/{f.name}" for f in sorted(dst.parent.iterdir())]
    return rec


def write_step_graphs(folder: Path) -> dict[str, str]:
    """The LCM step graphs (``step_graph.py``, fp32, without and with guidance) into ``folder``."""
    from ..core.step_graph import write_lcm_step_onnx

    for cfg, name in STEP_FILES.items():
        write_lcm_step_onnx(folder / name, cfg == "cfg")
    return dict(STEP_FILES)


def check(manifest: dict, engine_dir: Path) -> list[str]:
    """fp16 graphs run on the CUDA provider only: refuse them where there is none. Graphs stored at
    ORT_ENABLE_ALL are laid out for one vector ISA: refuse another CPU's."""
    comps = manifest.get("components", {})
    if any(c.get("precision") == "fp16" for c in comps.values()) and not cuda_available():
        raise UserError(f"{engine_dir} holds ONNX Runtime fp16 graphs for the CUDA provider and this onnxruntime has no "
                        f"CUDAExecutionProvider: {FP16_CPU_WHY}; run it on an NVIDIA GPU with onnxruntime-gpu, or build a "
                        "CPU entry (--precision fp32)")
    built_isa = manifest.get("onnxruntime", {}).get("cpu_isa")
    if built_isa:
        from .._cpu import cpu_isa

        here = cpu_isa()
        if here != built_isa:
            raise UserError(f"{engine_dir} holds ONNX Runtime graphs optimized for {built_isa} CPUs; this CPU is {here}; "
                            f"{rebuild_hint(engine_dir)}")
    return []


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    """CUDA entries where the CUDA provider exists: a device engine (IO binding, the LCM step engines for the
    device loop, CUDA graphs when enabled); otherwise a plain session."""
    cfg = manifest.get("onnxruntime", {})
    if "CUDAExecutionProvider" in cfg.get("providers", []) and cuda_available():
        graphs = cuda_graphs_enabled(os.environ) and component in GRAPH_COMPONENTS
        return load_device_engine(manifest, engine_dir, component, path, threads, "cuda", graphs)
    return OrtEngine(path, cfg.get("providers", ["CPUExecutionProvider"]), thread_count(threads, cfg.get("intra_op_threads")),
                     cfg.get("runtime_optimization", "ORT_ENABLE_ALL"), engine_dir, bool(cfg.get("allow_spinning", False)))


def load_device_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None,
                       device: str = "cuda", graphs: bool = False, steps: dict | None = None):
    """An ``OrtDeviceEngine`` on ``device`` ("cuda"; "cpu" drives the same code in tests) for one component,
    with the UNet's LCM step engines (``steps``: {"plain"|"cfg": path}, default the entry's) attached."""
    from .onnxruntime_runtime import OrtDeviceEngine

    cfg = manifest.get("onnxruntime", {})
    opts, n = cfg.get("cuda_provider_options"), thread_count(threads, cfg.get("intra_op_threads"))
    engine = OrtDeviceEngine(path, device, opts, n, cfg.get("runtime_optimization", "ORT_ENABLE_ALL"), engine_dir, graphs)
    if steps is None:
        rec = manifest.get("components", {}).get(component, {})
        steps = {k: entry_file(engine_dir, f) for k, f in (rec.get("lcm_step") or {}).items()}
    for kind, file in steps.items():
        engine.lcm_step[kind == "cfg"] = OrtDeviceEngine(file, device, opts, n, "ORT_ENABLE_ALL", engine_dir, graphs)
    return engine


class OrtEngine:
    """An ONNX Runtime session over a stored graph, host arrays in and out (IO binding on CUDA)."""

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
