"""Engine backends as plug-ins: one module per backend, all with the same small interface.

The orchestrator (``build_engine``), the runtime, the CLI and bench never name a backend: they ask
this registry. A backend module defines

    NAME            its name on the command line and in manifests
    PRECISIONS      the precisions it builds, e.g. ("fp32", "bf16", "int8")
    SPEED_RANK      {precision: rank}: lower is faster, from our measurements (README, Benchmarks);
                    ``auto`` never picks a backend that measured slower for the same precision
    VERIFY_IN_BUILD whether its engines can run during the build (then each component is checked
                    against PyTorch through the built engine itself)
    REFIT           whether an entry can take new weights without a re-export (``builder/refit.py``)
    REFIT_NEEDS_FLAG whether only engines built with ``--refit`` are refittable (else every entry is)
    ADAPTERS        whether its engines take run-time adapter inputs (``build-engine --adapters``)
    MERGE_EXACT     whether requests merged into one engine call give each one's solo image byte for
                    byte (``serve`` merges by default only then)
    GENAI           optional (False when absent): whether its entries are OpenVINO GenAI folders too
                    (``builder/genai.py`` writes the rest of that layout)
    status() -> (usable, device, reason)         imports and hardware; reason says how to fix it
    precision_refusal(precision, device) -> str | None   optional: why it cannot build ``precision`` on
                                                 ``device`` although PRECISIONS lists it (one line), else None
    default_precision(device, cpu_bf16) -> str   what ``--precision auto`` means for it
    entry_settings(threads, device) -> dict      its manifest section (thread count, hints, ISA)
    build_component(job) -> dict                 one component from the exported ONNX: files + record
    check(manifest, engine_dir) -> list[str]     refuse (UserError) or warn about running here
    load_engine(manifest, engine_dir, component, file, threads) -> Engine
    STATIC_SHAPES   optional (False when absent): whether ``load_engine`` takes ``static=True`` (compile
                    for each call's input shapes; ``generate --shapes``)
    refit_component(job, record) -> dict         optional: new weights into existing engines; without
                                                 it a refit re-derives the component from the patched ONNX
    refit_weight_count(weight_map, modules) -> int  optional: engine weights a refit sets (recorded)
    INT8_SCHEMES    optional, where "int8" is in PRECISIONS: {scheme: what it quantizes}, and
    DEFAULT_INT8_SCHEME  the one ``--int8-scheme auto`` takes; an int8 component's job carries the
                    scheme and its calibration feeds (``builder/quantize.py``)

Modules are imported lazily: the lean runtime imports only the backend an entry uses, and no
backend imports torch at module level.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..confine import inside
from ..errors import UserError

REGISTRY = {
    "onnxruntime": "lcm_export.backends.onnxruntime",
    "openvino": "lcm_export.backends.openvino",
    "tensorrt": "lcm_export.backends.tensorrt",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
GPU_ORDER = ("tensorrt", "onnxruntime")
"""On a GPU, TensorRT first (the fast path), then ONNX Runtime's CUDA provider."""


class RefitImpossible(Exception):
    """A weights-only update cannot take this change: the build falls back to the full path, saying why."""


THREADS_ENV = "LCM_EXPORT_THREADS"
CUDA_GRAPHS_ENV = "LCM_EXPORT_CUDA_GRAPHS"
"""\"1\" turns CUDA graphs on in the GPU runtimes (TensorRT, ONNX Runtime's CUDA provider): off until a GPU run
validates them."""


def cuda_graphs_enabled(env) -> bool:
    """CUDA graphs are off unless $LCM_EXPORT_CUDA_GRAPHS is 1/true/on: no GPU run has validated them yet."""
    return str(env.get(CUDA_GRAPHS_ENV, "")).strip().lower() in ("1", "true", "on", "yes")


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (UserError for an unknown one)."""
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}: choose {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


@dataclass(frozen=True)
class Choice:
    backend: str
    device: str
    precision: str
    why: str = ""


def _statuses() -> dict[str, tuple[bool, str, str]]:
    return {n: get(n).status() for n in REGISTRY}


def choose(backend: str = "auto", precision: str = "auto", cpu_bf16: bool | None = None,
           statuses: dict[str, tuple[bool, str, str]] | None = None, cpu_int8: bool | None = None) -> Choice:
    """Pick (backend, device, precision) for ``--backend`` / ``--precision``. Pure given ``statuses``
    ({name: (usable, device, reason)}), ``cpu_bf16`` (whether the CPU has native bf16) and ``cpu_int8``
    (whether int8 engines were measured no slower than fp32 / bf16 on its class: ``_cpu.int8_pays``).

    auto precision: fp16 on a GPU backend; on CPU bf16 where the CPU has native bf16 (AMX or
    AVX512_BF16) and a usable backend builds it, else fp32. auto backend: a usable GPU backend
    first (TensorRT, then ONNX Runtime on CUDA); on CPU, among the usable backends that build the
    precision, the one with the best measured SPEED_RANK. auto precision never picks int8 (a quality
    trade: ``--preset fast`` or ``--precision int8`` asks for it).
    """
    from .._cpu import int8_pays, native_bf16

    if precision not in ("auto", *PRECISIONS):
        raise UserError(f"--precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    statuses = _statuses() if statuses is None else statuses
    cpu_bf16 = native_bf16() if cpu_bf16 is None else cpu_bf16
    cpu_int8 = int8_pays() if cpu_int8 is None else cpu_int8
    mods = {n: get(n) for n in REGISTRY}

    if backend != "auto":
        mod = get(backend)
        ok, device, reason = statuses[backend]
        if not ok:
            raise UserError(f"--backend {backend}: {reason}")
        if precision == "auto":
            return Choice(backend, device, mod.default_precision(device, cpu_bf16), "auto precision")
        if precision not in mod.PRECISIONS:
            others = [n for n, m in mods.items() if precision in m.PRECISIONS]
            where = " on an NVIDIA GPU" if precision == "fp16" else ""
            raise UserError(f"--precision {precision} is not built by {backend} (it builds {', '.join(mod.PRECISIONS)}); "
                            f"use --backend {' or '.join(others)}{where}, or --precision {' or '.join(mod.PRECISIONS)}")
        refusal = getattr(mod, "precision_refusal", lambda p, d: None)(precision, device)
        if refusal:
            raise UserError(refusal)
        _check_bf16(precision, device, cpu_bf16)
        _check_int8(precision, device, cpu_int8)
        return Choice(backend, device, precision)

    usable = {n: s for n, s in statuses.items() if s[0]}
    gpu = [n for n in GPU_ORDER if n in usable and usable[n][1] == "cuda"]
    if gpu and precision in ("auto", "fp16", "fp32"):
        for n in gpu:
            p = mods[n].default_precision("cuda", cpu_bf16) if precision == "auto" else precision
            if p in mods[n].PRECISIONS and not getattr(mods[n], "precision_refusal", lambda p, d: None)(p, "cuda"):
                return Choice(n, "cuda", p, "GPU backend")
    cpu = [n for n in REGISTRY if n in usable and usable[n][1] == "cpu"]
    if precision == "auto":
        precision = "bf16" if cpu_bf16 and any("bf16" in mods[n].PRECISIONS for n in cpu) else "fp32"
    _check_bf16(precision, "cpu", cpu_bf16)
    _check_int8(precision, "cpu", cpu_int8)
    serving = [n for n in cpu if precision in mods[n].PRECISIONS]
    if not serving:
        builders = [n for n in REGISTRY if precision in mods[n].PRECISIONS]
        why = "; ".join(f"{n}: {statuses[n][2]}" for n in builders)
        raise UserError(f"no usable backend builds {precision} on this machine ({why})")
    best = min(serving, key=lambda n: mods[n].SPEED_RANK[precision])
    return Choice(best, "cpu", precision, "fastest measured CPU backend for " + precision)


def _check_bf16(precision: str, device: str, cpu_bf16: bool) -> None:
    if precision == "bf16" and device == "cpu" and not cpu_bf16:
        raise UserError("--precision bf16: this CPU has no native bf16 (neither AMX nor AVX512_BF16), so bf16 would run "
                        "emulated, slower than fp32; use --precision fp32 (or auto)")
    if precision == "fp16" and device == "cpu":
        raise UserError("--precision fp16 needs a GPU (--backend tensorrt, or onnxruntime with its CUDA provider: "
                        "onnxruntime-gpu); on CPUs use --precision bf16 (native bf16 CPUs) or fp32")


def _check_int8(precision: str, device: str, cpu_int8: bool) -> None:
    if precision == "int8" and device == "cpu" and not cpu_int8:
        raise UserError("--precision int8: int8 engines have not been measured faster than fp32 on this CPU class "
                        "(AVX-512 without VNNI, or no AVX2): an int8 UNet's speed is not measured here (it may be no faster) "
                        "and it loses quality; use --precision auto (bf16 or fp32), or --preset fast without --precision "
                        "(it then builds that UNet with the tiny VAE decoder)")


def builds_int8(statuses: dict[str, tuple[bool, str, str]] | None = None) -> bool:
    """Whether a usable CPU backend here builds int8 engines."""
    statuses = _statuses() if statuses is None else statuses
    return any(s[0] and s[1] == "cpu" and "int8" in get(n).PRECISIONS for n, s in statuses.items())


def int8_scheme(backend: str, scheme: str) -> str:
    """``--int8-scheme`` resolved for ``backend``: ``auto`` is its DEFAULT_INT8_SCHEME (UserError for an unknown one)."""
    mod = get(backend)
    schemes = getattr(mod, "INT8_SCHEMES", {})
    if scheme == "auto":
        return mod.DEFAULT_INT8_SCHEME
    if scheme not in schemes:
        raise UserError(f"--int8-scheme {scheme!r}: choose auto, {', '.join(schemes)}")
    return scheme


def thread_count(explicit: int | None, recorded: int | None) -> int | None:
    """Threads for an engine: the caller's, else $LCM_EXPORT_THREADS, else the entry's recorded default;
    at most this machine's usable cores (for every backend: more threads than cores only time-slice the
    same cores, and ONNX Runtime would start every one of them — 10,000 asked for became ~28,700 threads)."""
    from .._cpu import usable_cores

    if explicit is not None:
        if not isinstance(explicit, int) or isinstance(explicit, bool) or explicit < 1:
            raise UserError(f"threads {explicit!r}: must be a whole number >= 1")
        return min(explicit, usable_cores())
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"{THREADS_ENV}={env!r}: must be a whole number >= 1 (or unset it to use the entry's default)")
        return min(n, usable_cores())
    return min(recorded, usable_cores()) if recorded else recorded


def manifest_problems(m: dict) -> list[str]:
    """The values only the entry's backend reads (``store.manifest_problems`` calls this once the common
    fields are sound): each component's precision among those the backend builds
    (``COMPONENT_PRECISIONS``, else ``PRECISIONS``), its own component fields (``COMPONENT_FIELDS``) and
    its manifest section (``SECTION``: {key: check}; a key may be absent, a present one must pass)."""
    mod = get(m["backend"])
    allowed = getattr(mod, "COMPONENT_PRECISIONS", mod.PRECISIONS)
    out = []
    for comp, c in m["components"].items():
        p = c.get("precision", "fp32")
        if p not in allowed:
            out.append(f"component {comp!r} has precision {json.dumps(p)[:40]}, which {mod.NAME} does not run (it runs "
                       f"{', '.join(allowed)})")
        for key, ok in getattr(mod, "COMPONENT_FIELDS", {}).items():
            if key in c and not ok(c[key], c):
                out.append(f"component {comp!r} has a malformed {key!r}: {json.dumps(c[key])[:60]}")
    section = m.get(mod.NAME, {})
    if not isinstance(section, dict):
        return out + [f"the manifest's {mod.NAME!r} section is not an object"]
    for key, ok in getattr(mod, "SECTION", {}).items():
        if key in section and not ok(section[key]):
            out.append(f"the manifest's {mod.NAME}.{key} is malformed: {json.dumps(section[key])[:60]}")
    return out


def is_threads(v) -> bool:
    """A recorded thread count: a whole number >= 1."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def rebuild_hint(engine_dir: Path) -> str:
    return f"rebuild it with `lcm-export build-engine --engine-dir {engine_dir} --force`"


@dataclass
class ComponentJob:
    """What a backend needs to build one component (built by the orchestrator)."""

    component: str
    onnx: Path
    """The exported fp32 ONNX graph (the interchange format)."""
    out_dir: Path
    """The entry's temporary folder; files go under ``out_dir/component/``."""
    plans: list
    """ShapePlans the entry covers."""
    precision: str
    """The entry's precision; the backend records what each component really runs in."""
    dims: dict
    section: dict
    """The backend's manifest section (from ``entry_settings``); a backend may add to it."""
    vae_fp32: bool = False
    refit: bool = False
    store_root: Path | None = None
    int8_scheme: str | None = None
    """int8 entries: the quantization scheme (one of the backend's INT8_SCHEMES)."""
    calibration: list | None = None
    """int8 entries: the UNet's feeds along the entry's own LCM trajectories (``builder/quantize.py``)."""
    sample_feeds: dict = field(default_factory=dict)
    """Seeded real inputs at the first plan's size (TensorRT's fp16 overflow probe)."""
    previous: Path | None = None
    """Refit: the entry being updated (its current engine files are read from there)."""


SHAPES = ("auto", "static", "dynamic")
"""How the runtime compiles an entry's engines: ``static`` for each call's shapes (backends with
STATIC_SHAPES), ``dynamic`` as built, ``auto`` static where the backend can."""


def static_shapes(manifest: dict, engine_dir: Path, shapes: str) -> bool:
    """Whether ``shapes`` (one of SHAPES) compiles this entry's engines per call shape; refuses ``static``
    where the entry's backend has no such mode (one line)."""
    if shapes not in SHAPES:
        raise UserError(f"--shapes {shapes!r}: choose {', '.join(SHAPES)}")
    name = manifest.get("backend")
    able = name in REGISTRY and bool(getattr(get(name), "STATIC_SHAPES", False))
    if shapes == "static" and not able:
        raise UserError(f"--shapes static: {engine_dir} is a {name} entry, whose engines run with the shapes they were "
                        "built for; leave --shapes out (auto) or build an openvino entry")
    return able and shapes != "dynamic"


def load_engines(manifest: dict, engine_dir: Path, threads: int | None = None, shapes: str = "dynamic") -> tuple[dict, list[str]]:
    """({component: {plan name or '*': engine}}, warnings) for an entry, through its backend; ``shapes``:
    one of SHAPES."""
    name = manifest.get("backend")
    if name not in REGISTRY:
        raise UserError(f"{engine_dir}: unknown backend {name!r} in the manifest; {rebuild_hint(engine_dir)}")
    mod = get(name)
    static = static_shapes(manifest, engine_dir, shapes)
    warnings = mod.check(manifest, engine_dir) or []
    out = {}
    for comp, c in manifest["components"].items():
        out[comp] = {plan: mod.load_engine(manifest, engine_dir, comp, entry_file(engine_dir, f), threads, **({"static": True} if static else {}))
                     for plan, f in c["engines"].items()}
    return out, warnings


def entry_file(engine_dir: Path, rel) -> Path:
    """``engine_dir / rel`` for a path the manifest names, confined to the entry (``confine.inside``)."""
    return inside(engine_dir, rel, f"{Path(engine_dir) / 'manifest.json'}", rebuild_hint(engine_dir))
