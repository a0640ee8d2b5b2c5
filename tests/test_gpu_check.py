"""benchmarks/gpu_check.py on CPU: its image parity restores what it patches, so bench can run after it; which engine it
times (faked availability); without an engine on the GPU it still reports the PyTorch baselines and solvers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_parity_restores_diffusers_noise_and_scheduler(demo_engine, fused_pipe):
    import diffusers.schedulers.scheduling_lcm as lcm_mod
    import numpy as np
    import torch

    from lcm_export.bench.baselines import torch_call

    gpu_check = _load()
    assert "randn_tensor =" not in SCRIPT.read_text()  # no monkeypatch of its own
    before_randn, before_sched = lcm_mod.randn_tensor, fused_pipe.scheduler
    sched = json.loads((Path(demo_engine) / "scheduler" / "scheduler_config.json").read_text())
    got = gpu_check.image_parity(Path(demo_engine), (64, 64), fused_pipe, sched)
    assert got["device_loop"] is False  # an ONNX Runtime entry: host loop both times
    assert got["psnr_db_device_loop"] == got["psnr_db_host_loop"] >= 30
    assert lcm_mod.randn_tensor is before_randn and fused_pipe.scheduler is before_sched
    with torch.no_grad():  # the bench step that used to meet an empty noise queue
        img = torch_call(fused_pipe, np.zeros((1, 4, 8, 8), np.float32), 4, 1.0, (64, 64))
    assert np.isfinite(img).all()



TRT_MISSING = (False, "TensorRT is not installed")


@pytest.mark.parametrize("avail, backend, why", [
    ({"cuda": True, "tensorrt": (True, "ok"), "ort_cuda": False}, "tensorrt", "TensorRT fp16"),
    ({"cuda": True, "tensorrt": TRT_MISSING, "ort_cuda": True}, "onnxruntime", "TensorRT is not installed: ONNX Runtime fp32 on its CUDA provider"),
    ({"cuda": True, "tensorrt": TRT_MISSING, "ort_cuda": False}, None, "TensorRT is not installed and onnxruntime has no CUDAExecutionProvider"),
    ({"cuda": False, "tensorrt": (False, "no CUDA GPU is visible"), "ort_cuda": True}, "onnxruntime", "no CUDA GPU: ONNX Runtime fp32 on the CPU"),
    ({"cuda": False, "tensorrt": TRT_MISSING, "ort_cuda": False}, "onnxruntime", "no CUDA GPU: ONNX Runtime fp32 on the CPU"),
])
def test_engine_to_time(avail, backend, why):
    """Which engine the check times, from faked availability: never a CPU engine against GPU baselines."""
    got, reason = _load().engine_to_time(**avail)
    assert got == backend and why in reason


@pytest.fixture
def no_engine_here(tmp_path, monkeypatch):
    """A CUDA machine without TensorRT or the ONNX Runtime CUDA provider, as the check sees it; building or
    benchmarking an engine raises."""
    import lcm_export.bench.harness
    import lcm_export.builder.build_engine

    def no(*a, **k):
        raise AssertionError("no engine may be built or timed here")

    monkeypatch.setattr(lcm_export.builder.build_engine, "build_engine", no)
    monkeypatch.setattr(lcm_export.bench.harness, "run_bench", no)
    monkeypatch.chdir(tmp_path)
    return {"cuda": True, "tensorrt": TRT_MISSING, "ort_cuda": False}


def test_without_an_engine_the_baselines_and_solvers_are_still_reported(no_engine_here, tmp_path, capsys):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    native = "fp16" if device == "cuda" else "fp32"
    parts = {}
    ok = _load().check_model("demo:sd15", (64, 64), 1, parts, avail=no_engine_here, baselines=("eager", "bf16"), solver_runs=1,
                             reports=tmp_path / "reports")
    out = tmp_path / "reports" / "gpu-demo-sd15-64x64"
    g = json.loads((out / "gpu_check.json").read_text())
    assert ok and not (out / "report.json").exists() and not (tmp_path / "engines").exists()
    assert g["engine"]["backend"] is None and "no CUDAExecutionProvider" in g["engine"]["why"]
    assert parts["bench engine"] == {"ran": False, "why": g["engine"]["why"]} == g["parts"]["bench engine"]
    assert parts["bench eager"] == {"ran": True} and g["paths"]["eager"]["precision"] == native and g["paths"]["bf16"]["precision"] == "bf16"
    from lcm_export._cpu import native_bf16
    from lcm_export.bench.baselines import NO_NATIVE_BF16

    ran = ("eager", "bf16") if device == "cuda" or native_bf16() else ("eager",)
    if "bf16" not in ran:  # a CPU without native bf16: skipped with the reason, as bench does
        assert parts["bench bf16"] == {"ran": False, "why": NO_NATIVE_BF16} and g["paths"]["bf16"]["skipped"] == NO_NATIVE_BF16
    else:
        assert parts["bench bf16"] == {"ran": True}
    assert all(g["paths"][b]["stages"]["unet_step"]["n"] == 4 for b in ran)  # 1 run x 4 steps
    assert [(s["solver"], s["steps"], s["path"]) for s in g["solvers"]] == [
        ("LCMScheduler", 4, "diffusers eager"), ("DDIMScheduler", 32, "diffusers eager"),
        ("DPMSolver", 16, "diffusers eager"), ("DPMSolver++", 8, "diffusers eager")]
    assert all(s["median_s"] > 0 and s["n"] == 1 for s in g["solvers"]) and g["failures"] == []
    assert g["machine"]["cpu"] and g["device"] == device and "torch" in g["versions"]
    printed = capsys.readouterr().out
    assert "bench engine: skipped — TensorRT is not installed" in printed and "DDIMScheduler 32 steps" in printed


def test_a_failed_baseline_fails_the_check(no_engine_here, tmp_path, capsys, monkeypatch):
    from lcm_export.bench import baselines as bench_torch

    def fails(pipe, *a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(bench_torch, "time_torch", fails)
    parts = {}
    ok = _load().check_model("demo:sd15", (64, 64), 1, parts, avail=no_engine_here, baselines=("eager",), solver_runs=1,
                             reports=tmp_path / "reports")
    g = json.loads((tmp_path / "reports" / "gpu-demo-sd15-64x64" / "gpu_check.json").read_text())
    assert not ok and parts["bench eager"] == {"ran": False, "why": "RuntimeError: injected failure"}
    assert g["failures"] == [{"row": "paths.eager", "error": "RuntimeError: injected failure"}]
    assert "FAILED paths.eager: RuntimeError: injected failure" in capsys.readouterr().out
