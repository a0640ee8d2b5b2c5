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

LEVELS = {  # device -> (stored graph level, level applied at load)
    "cpu": ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"),
    "cuda": ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"),
}
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def providers_for(device: str) -> list[str]:
    """ORT providers for ``cuda`` or ``cpu`` (CPU is always the fallback)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


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
    size = sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file())  # the graph + any data it references
    if size > EXTERNAL_DATA_THRESHOLD:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    dst.parent.mkdir(parents=True, exist_ok=True)
    ort.InferenceSession(str(src), so, providers=providers)
    info = {"stored_optimization": stored, "runtime_optimization": at_load, "providers": providers, "allow_spinning": False}
    if device == "cpu":
        info["cpu_isa"] = cpu_isa()
    return info
