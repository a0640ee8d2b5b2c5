"""benchmarks/gpu_check.py on CPU: its image parity restores what it patches, so bench can run after it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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

    from lcm_export.bench_torch import torch_call

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

