"""ONNX Runtime engines: an ORT-optimized graph per component, provider and thread settings recorded.

The stored graph is optimized at ``ORT_ENABLE_EXTENDED`` (constant folding, node fusions) for the
provider it was built for. Layout-specific rewrites (``ORT_ENABLE_ALL``'s NCHWc blocking on CPU)
depend on the CPU's vector width, so the runtime applies them when it loads the graph, on the
machine that runs it. ``onnxruntime.transformers.optimizer(model_type="unet")`` is not used: it
crashes under numpy 2.4 and its fusions (NhwcConv, GroupNorm) are CUDA-only.
"""

from __future__ import annotations

import os
from pathlib import Path

STORED_LEVEL = "ORT_ENABLE_EXTENDED"
RUNTIME_LEVEL = "ORT_ENABLE_ALL"
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def providers_for(device: str) -> list[str]:
    """ORT providers for ``cuda`` or ``cpu`` (CPU is always the fallback)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def optimize_graph(src: Path, dst: Path, providers: list[str]) -> dict:
    """Write ``src`` optimized at STORED_LEVEL to ``dst``; return the settings to record."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, STORED_LEVEL)
    so.optimized_model_filepath = str(dst)
    size = sum(f.stat().st_size for f in src.parent.iterdir() if f.name.startswith(src.name))
    if size > EXTERNAL_DATA_THRESHOLD:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    dst.parent.mkdir(parents=True, exist_ok=True)
    ort.InferenceSession(str(src), so, providers=providers)
    return {"stored_optimization": STORED_LEVEL, "runtime_optimization": RUNTIME_LEVEL, "providers": providers}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
