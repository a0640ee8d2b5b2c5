"""The CPU's vector ISA: it decides ONNX Runtime's NCHWc block size, so an ORT_ENABLE_ALL-optimized
graph saved on one CPU is only valid on CPUs of the same ISA. Standard library only (lean)."""

from __future__ import annotations

import platform

ISA_ORDER = ("avx512f", "avx2", "avx", "sse4_1")


def cpu_isa() -> str:
    """The widest of avx512f / avx2 / avx / sse4_1 this CPU has, or the machine name elsewhere."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for isa in ISA_ORDER:
        if isa in flags:
            return isa
    return platform.machine() or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the default thread count for ONNX Runtime and torch)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
