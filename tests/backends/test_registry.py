"""The backend registry: ``auto`` precision and backend selection on mocked CPUs, and the errors."""

from __future__ import annotations

import pytest

from lcm_export import backends
from lcm_export._cpu import cpu_isa, int8_class, int8_pays, native_bf16, native_int8, recorded_flags
from lcm_export.errors import UserError

CPU_ONLY = {"onnxruntime": (True, "cpu", "ok"), "openvino": (True, "cpu", "ok"),
            "tensorrt": (False, "cuda", "TensorRT is not installed; install it")}
NO_OV = {**CPU_ONLY, "openvino": (False, "cpu", "the openvino package is not installed: pip install openvino")}
GPU = {**CPU_ONLY, "tensorrt": (True, "cuda", "ok")}

SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx2", "fma"}
ZEN4 = {"avx512f", "avx512_bf16", "avx2", "fma"}
ZEN3 = {"avx2", "avx", "fma", "sse4_1"}
SKYLAKE_X = {"avx512f", "avx2", "fma"}
ZEN4_FULL = ZEN4 | {"avx512_vnni"}  # as /proc/cpuinfo lists a Zen 4
CASCADE_LAKE = SKYLAKE_X | {"avx512_vnni"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}


@pytest.mark.parametrize("flags, expected", [(SAPPHIRE_RAPIDS, True), (ZEN4_FULL, True), (CASCADE_LAKE, True), (ALDER_LAKE, True),
                                             (ZEN4, False), (ZEN3, False), (SKYLAKE_X, False), (set(), False)])
def test_native_int8_from_flags(flags, expected):
    assert native_int8(flags) is expected


@pytest.mark.parametrize("flags, cls, pays", [(SAPPHIRE_RAPIDS, "amx", True), (ZEN4_FULL, "vnni", True), (CASCADE_LAKE, "vnni", True),
                                              (ALDER_LAKE, "vnni", True), (ZEN3, "avx2", True), (SKYLAKE_X, "avx512", False),
                                              (ZEN4, "avx512", False), ({"sse4_1", "avx"}, "other", False), (set(), "other", False)])
def test_int8_rule_by_measured_cpu_class(flags, cls, pays):
    """int8 builds where it was measured no slower than fp32 / bf16: AMX, VNNI and AVX2-only (Zen 3, issue 29);
    AVX-512 without VNNI is unmeasured and stays refused."""
    assert int8_class(flags) == cls and int8_pays(flags) is pays


@pytest.mark.parametrize("flags, expected", [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (ZEN3, False), (SKYLAKE_X, False), (set(), False)])
def test_native_bf16_from_flags(flags, expected):
    assert native_bf16(flags) is expected


def test_recorded_flags_and_isa():
    assert recorded_flags(SAPPHIRE_RAPIDS | {"sse2", "pni"}) == sorted(["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"])
    assert cpu_isa(ZEN3) == "avx2" and cpu_isa(SAPPHIRE_RAPIDS) == "avx512f"
    assert "avx_vnni" in recorded_flags(ALDER_LAKE) and "avx512_vnni" in recorded_flags(CASCADE_LAKE)  # int8 speed


@pytest.mark.parametrize("flags, want", [(SAPPHIRE_RAPIDS, ("openvino", "bf16")), (ZEN4, ("openvino", "bf16")),
                                         (ZEN3, ("openvino", "fp32")), (SKYLAKE_X, ("openvino", "fp32"))])
def test_auto_on_cpus(flags, want):
    c = backends.choose("auto", "auto", cpu_bf16=native_bf16(flags), statuses=CPU_ONLY)
    assert (c.backend, c.precision, c.device) == (*want, "cpu")


def test_auto_without_openvino_falls_back_to_fp32():
    c = backends.choose("auto", "auto", cpu_bf16=True, statuses=NO_OV)
    assert (c.backend, c.precision) == ("onnxruntime", "fp32")


def test_auto_on_gpu_is_tensorrt_fp16():
    c = backends.choose("auto", "auto", cpu_bf16=True, statuses=GPU)
    assert (c.backend, c.device, c.precision) == ("tensorrt", "cuda", "fp16")
    both = {**GPU, "onnxruntime": (True, "cuda", "ok")}  # onnxruntime-gpu installed beside TensorRT
    assert backends.choose("auto", "auto", cpu_bf16=True, statuses=both).backend == "tensorrt"
    no_trt = {**both, "tensorrt": (False, "cuda", "TensorRT is not installed")}
    c = backends.choose("auto", "auto", cpu_bf16=True, statuses=no_trt)
    assert (c.backend, c.device, c.precision) == ("onnxruntime", "cuda", "fp16")  # its CUDA fp16 graphs (issue 22)


def test_auto_never_picks_the_slower_backend(monkeypatch):
    """For a precision both CPU backends build, auto takes the lower measured SPEED_RANK, whichever it is."""
    ort, ov = backends.get("onnxruntime"), backends.get("openvino")
    assert "fp32" in ort.PRECISIONS and "fp32" in ov.PRECISIONS
    faster = min(("onnxruntime", "openvino"), key=lambda n: backends.get(n).SPEED_RANK["fp32"])
    assert backends.choose("auto", "fp32", cpu_bf16=True, statuses=CPU_ONLY).backend == faster
    slower = ({"onnxruntime": ov, "openvino": ort}[faster])
    monkeypatch.setattr(slower, "SPEED_RANK", {**slower.SPEED_RANK, "fp32": -1})  # now the other one measured faster
    assert backends.choose("auto", "fp32", cpu_bf16=True, statuses=CPU_ONLY).backend != faster


@pytest.mark.parametrize("backend, precision, cpu_bf16, statuses, msg", [
    ("tensorrt", "bf16", True, GPU, "--precision bf16 is not built by tensorrt"),
    ("onnxruntime", "bf16", True, CPU_ONLY, "use --backend openvino"),
    ("onnxruntime", "fp16", True, CPU_ONLY, "no fast fp16 kernels"),
    ("openvino", "fp16", True, CPU_ONLY, "use --backend onnxruntime or tensorrt on an NVIDIA GPU"),
    ("openvino", "bf16", False, CPU_ONLY, "no native bf16"),
    ("auto", "bf16", False, CPU_ONLY, "no native bf16"),
    ("auto", "fp16", True, CPU_ONLY, "--precision fp16 needs a GPU"),
    ("auto", "bf16", True, NO_OV, "openvino: the openvino package is not installed"),
    ("tensorrt", "auto", True, CPU_ONLY, "--backend tensorrt: TensorRT is not installed"),
    ("openvino", "fp64", True, CPU_ONLY, "--precision 'fp64': choose auto"),
    ("coreml", "auto", True, CPU_ONLY, "unknown backend 'coreml'"),
])
def test_bad_choices_are_one_line_errors(backend, precision, cpu_bf16, statuses, msg):
    with pytest.raises(UserError) as e:
        backends.choose(backend, precision, cpu_bf16=cpu_bf16, statuses=statuses)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_int8_is_openvino_where_int8_pays():
    for backend in ("auto", "openvino"):
        for flags in (CASCADE_LAKE, ZEN3):
            c = backends.choose(backend, "int8", cpu_bf16=False, cpu_int8=int8_pays(flags), statuses=CPU_ONLY)
            assert (c.backend, c.device, c.precision) == ("openvino", "cpu", "int8")
    # on a GPU machine too: int8 is a CPU entry (TensorRT builds no int8 here)
    assert backends.choose("auto", "int8", cpu_bf16=True, cpu_int8=True, statuses=GPU).backend == "openvino"
    # auto never picks int8: it is a quality trade asked for by --precision int8 or --preset fast
    assert backends.choose("auto", "auto", cpu_bf16=True, cpu_int8=True, statuses=CPU_ONLY).precision == "bf16"


@pytest.mark.parametrize("backend, flags, statuses, msg", [
    ("auto", {"sse4_1", "avx"}, CPU_ONLY, "int8 engines have not been measured faster than fp32 on this CPU class"),
    ("openvino", SKYLAKE_X, CPU_ONLY, "--precision int8: int8 engines have not been measured faster than fp32"),
    ("auto", ZEN4, CPU_ONLY, "--preset fast"),  # AVX512_BF16 without VNNI: the message names the fallback
    ("onnxruntime", ZEN4_FULL, CPU_ONLY, "--precision int8 is not built by onnxruntime"),
    ("tensorrt", ZEN4_FULL, GPU, "--precision int8 is not built by tensorrt"),
    ("auto", ZEN4_FULL, NO_OV, "no usable backend builds int8 on this machine (openvino: the openvino package is not installed"),
])
def test_int8_refusals_are_one_line(backend, flags, statuses, msg):
    with pytest.raises(UserError) as e:
        backends.choose(backend, "int8", cpu_bf16=native_bf16(flags), cpu_int8=int8_pays(flags), statuses=statuses)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_int8_scheme_resolution():
    ov = backends.get("openvino")
    assert backends.int8_scheme("openvino", "auto") == ov.DEFAULT_INT8_SCHEME in ov.INT8_SCHEMES
    for scheme in ov.INT8_SCHEMES:
        assert backends.int8_scheme("openvino", scheme) == scheme
    with pytest.raises(UserError, match=r"--int8-scheme 'w4': choose auto, w8a8"):
        backends.int8_scheme("openvino", "w4")


def test_builds_int8_follows_the_usable_backends():
    assert backends.builds_int8(CPU_ONLY) and not backends.builds_int8(NO_OV)


def test_explicit_backend_auto_precision():
    assert backends.choose("openvino", "auto", cpu_bf16=True, statuses=CPU_ONLY).precision == "bf16"
    assert backends.choose("openvino", "auto", cpu_bf16=False, statuses=CPU_ONLY).precision == "fp32"
    assert backends.choose("onnxruntime", "auto", cpu_bf16=True, statuses=CPU_ONLY).precision == "fp32"


def test_every_backend_module_has_the_interface():
    for name in backends.names():
        mod = backends.get(name)
        assert mod.NAME == name
        assert set(mod.SPEED_RANK) == set(mod.PRECISIONS)
        for fn in ("status", "default_precision", "entry_settings", "build_component", "check", "load_engine"):
            assert callable(getattr(mod, fn)), (name, fn)


@pytest.mark.parametrize("env, explicit, recorded, want", [("", None, 2, 2), ("3", None, 2, 3), ("", 1, 2, 1), ("4", 1, 2, 1),
                                                       ("", None, None, None)])
def test_thread_count(monkeypatch, env, explicit, recorded, want):
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "usable_cores", lambda: 8)
    monkeypatch.setenv(backends.THREADS_ENV, env)
    assert backends.thread_count(explicit, recorded) == want


@pytest.mark.parametrize("env, explicit, recorded", [("10000", None, 2), ("", 10000, 2), ("", None, 10000), ("9", 12, 2)])
def test_thread_counts_are_clamped_to_the_cores_for_every_backend(monkeypatch, env, explicit, recorded):
    """LCM_EXPORT_THREADS=10000 once made ONNX Runtime start ~28,700 threads: no source of a thread count
    (the caller, the environment, an entry built on a bigger machine) gets more than the cores."""
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "usable_cores", lambda: 8)
    monkeypatch.setenv(backends.THREADS_ENV, env)
    assert backends.thread_count(explicit, recorded) == 8


@pytest.mark.parametrize("env", ["abc", "0", "-2", "1.5"])
def test_bad_thread_env_is_a_user_error(monkeypatch, env):
    monkeypatch.setenv(backends.THREADS_ENV, env)
    with pytest.raises(UserError, match="LCM_EXPORT_THREADS"):
        backends.thread_count(None, 2)
