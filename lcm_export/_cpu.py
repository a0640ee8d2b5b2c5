"""The CPU's vector ISA: it decides ONNX Runtime's NCHWc block size, so an ORT_ENABLE_ALL-optimized
graph saved on one CPU is only valid on CPUs of the same ISA. Standard library only (lean)."""

from __future__ import annotations

import platform

ISA_ORDER = ("avx512f", "avx2", "avx", "sse4_1")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags that give native bf16 matrix arithmetic (Intel AMX tiles; AVX-512 BF16 dot products)."""
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
"""CPU flags that give int8 dot-product instructions (Intel AMX int8 tiles; AVX-512 VNNI; AVX-VNNI). Where int8
engines are built is decided by the measured CPU class instead (``int8_pays``): on AVX2 without these
instructions the w8a8 UNet still measured faster than fp32."""
RECORDED_FLAGS = ISA_ORDER + BF16_FLAGS + ("amx_tile", "amx_int8", "avx512_vnni", "avx_vnni", "fma")


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512_BF16): bf16 engines pay only there."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def native_int8(flags: set[str] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (AMX-INT8, AVX512_VNNI or AVX_VNNI): a fact of the CPU,
    recorded; the int8 rule is ``int8_pays``."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in INT8_FLAGS)


INT8_MEASURED = {
    "amx": "Intel Xeon with AMX-INT8: these CPUs have AVX512_VNNI too (the vnni class's instructions at least), and int8 "
           "runs on AMX tiles",
    "vnni": "AMD EPYC Zen 4 (AVX512_VNNI, AVX512_BF16): w8a8 UNet step 1.68x faster than bf16 at 256², 1.58x at 512² "
            "(demo:sd15-full, benchmarks/reports/cpu-fast)",
    "avx2": "AMD EPYC Zen 3 (AVX2 only: no AVX-512, no VNNI): w8a8 UNet step 1.10x faster than fp32 at 256² in an "
            "interleaved same-process A/B, 1.17-1.33x in a side-by-side run (demo:sd15-full; issue 29's measurements)",
}
"""CPU classes (``int8_class``) where an OpenVINO int8 (w8a8) UNet was measured no slower than the same entry at
fp32 / bf16, with the measurement (``amx`` is not measured on its own: those CPUs have the ``vnni`` class's
instructions too, measured on Zen 4). ``avx512`` (AVX-512 without VNNI: Skylake-X) has not been measured: int8 stays
refused there (conservative) until it is; ``other`` (no AVX2) too."""
INT8_CLASS_NAMES = {"amx": "AMX-INT8", "vnni": "AVX512_VNNI / AVX_VNNI", "avx512": "AVX-512 without VNNI",
                    "avx2": "AVX2 without VNNI", "other": "no AVX2"}


def int8_class(flags: set[str] | None = None) -> str:
    """The CPU's class for int8 engines: ``amx`` (AMX-INT8), ``vnni`` (AVX512_VNNI or AVX_VNNI), ``avx512``
    (AVX-512 without VNNI), ``avx2`` (AVX2 without VNNI or AVX-512) or ``other``."""
    flags = cpu_flags() if flags is None else flags
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def int8_pays(flags: set[str] | None = None) -> bool:
    """Whether an int8 UNet was measured no slower than fp32 / bf16 on this CPU's class (``INT8_MEASURED``): where
    ``--precision int8`` builds and ``--preset fast`` picks int8."""
    return int8_class(flags) in INT8_MEASURED


def recorded_flags(flags: set[str] | None = None) -> list[str]:
    """The ISA flags an entry's manifest records (those that decide speed and compatibility)."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in RECORDED_FLAGS if f in flags)


def cpu_isa(flags: set[str] | None = None) -> str:
    """The widest of avx512f / avx2 / avx / sse4_1 this CPU has, or the machine name elsewhere."""
    flags = cpu_flags() if flags is None else flags
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
