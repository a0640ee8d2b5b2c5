"""`lcm-export bench` on the tiny model: report.json against a schema, report.md, valid PNGs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

SCHEMA = json.loads((Path(__file__).parents[1] / "lcm_export" / "data" / "bench_report.schema.json").read_text())


UNET_CALLS: list[float] = []
"""Every UNet engine call of the bench run, timed independently by a wrapper around the backend."""


@pytest.fixture(scope="module")
def report_dir(demo_engine, tmp_path_factory):
    import time

    from lcm_export.backends import onnxruntime as backend
    from lcm_export.cli import main

    real = backend.OrtEngine.run_all

    def timed(self, feeds, names=None):
        t0 = time.perf_counter()
        out = real(self, feeds, names)
        if "sample" in feeds:
            UNET_CALLS.append(time.perf_counter() - t0)
        return out

    out = tmp_path_factory.mktemp("bench")
    backend.OrtEngine.run_all = timed
    try:
        code = main(["bench", "--engine-dir", str(demo_engine), "--runs", "2", "--warmup", "1", "--solvers", "lcm:2,ddim:3,dpm:2,dpmpp:2",
                     "--resolution", "64x96", "--guidance", "2.0", "--out", str(out), "--quiet"])
    finally:
        backend.OrtEngine.run_all = real
    assert code == 0
    return out


def test_report_json_schema_and_ratios(report_dir):
    r = json.loads((report_dir / "report.json").read_text())
    jsonschema.validate(r, SCHEMA)
    assert r["resolution"] == "64x96" and r["guidance"] == 2.0
    eng, eager = r["paths"]["engine"]["stages"], r["paths"]["eager"]["stages"]
    # the engine's UNet figures against the calls timed independently (the last 2 runs x 4 steps;
    # the first 4 calls are the warm-up run): each reported step is its call plus a little bookkeeping
    timed = np.array(UNET_CALLS[-8:])
    assert len(UNET_CALLS) == (1 + 2) * 4 and eng["unet_step"]["n"] == 2 * 4  # every step of every timed run
    for key, want in (("median_s", np.median(timed)), ("p90_s", np.percentile(timed, 90)), ("min_s", timed.min())):
        assert want <= eng["unet_step"][key] <= want * 1.3 + 2e-3, (key, eng["unet_step"][key], want)
    ratio = r["ratios"]["eager"]["unet_step"]
    assert eager["unet_step"]["median_s"] / (np.median(timed) * 1.3 + 2e-3) <= ratio <= eager["unet_step"]["median_s"] / np.median(timed)
    for s in ("text_encoder", "vae_decoder", "end_to_end"):
        assert r["ratios"]["eager"][s] > 0 and eng[s]["min_s"] <= eng[s]["median_s"] <= eng[s]["p90_s"]
    assert eng["end_to_end"]["min_s"] >= 4 * timed.min()  # a whole run holds at least its 4 UNet calls
    assert [(s["solver"], s["steps"]) for s in r["solvers"]] == [
        ("LCMScheduler", 2), ("DDIMScheduler", 3), ("DPMSolver", 2), ("DPMSolver++", 2), ("LCMScheduler", 4)]
    assert r["flops"]["unet_batch"] == 2  # guidance 2.0: UNet at 2B
    assert r["cold_start"]["engine"]["torch_loaded"] is False
    assert r["flops"]["engine"]["flops_per_s"] == pytest.approx(r["flops"]["unet_step_flops"] / eng["unet_step"]["median_s"])


def test_report_md_and_charts(report_dir):
    md = (report_dir / "report.md").read_text()
    for needle in ("Latency per stage", "Speed-up", "Solver comparison", "Cold start", "GFLOP/s"):
        assert needle in md
    for name in ("stages.png", "solvers.png"):
        with Image.open(report_dir / name) as im:
            im.verify()
            assert im.format == "PNG"


@pytest.mark.parametrize("args,needle", [
    (["--solvers", "euler:4"], "unknown solver"), (["--solvers", "ddim:0"], "positive integer"),
    (["--solvers", "ddim:x"], "positive integer"), (["--runs", "0"], "at least 1"),
    (["--baselines", "jit"], "unknown"), (["--resolution", "512x512"], "was not built"),
])
def test_bad_input(demo_engine, tmp_path, capsys, args, needle):
    code, _, err = run_cli(["bench", "--engine-dir", demo_engine, "--out", tmp_path / "r", "--quiet", *args], capsys)
    assert code == 2 and needle in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


def test_engine_dir_without_manifest(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    code, _, err = run_cli(["bench", "--engine-dir", tmp_path / "e", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "no manifest.json" in err


def test_unet_flops_include_attention(demo_pipe):
    """The FLOP count against my own count: convs and linears by module hooks, attention as
    QK^T + PV from each attention's sequence lengths (2 FLOP per multiply-add)."""
    import torch

    from lcm_export.bench_torch import unet_flops

    unet, total, hooks = demo_pipe.unet, [0], []

    def conv(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        b, sq, inner = x.shape[0], x.shape[1], m.inner_dim
        sk = sq if ctx is None else ctx.shape[1]
        total[0] += 2 * 2 * b * sq * sk * inner  # scores and weighted sum, all heads together

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif type(m).__name__ == "Attention":
            hooks.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 12), torch.full((2,), 999), encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim))
    finally:
        for h in hooks:
            h.remove()
    assert any(type(m).__name__ == "Attention" for m in unet.modules())
    assert unet_flops(demo_pipe, 2, (64, 96)) == total[0]
