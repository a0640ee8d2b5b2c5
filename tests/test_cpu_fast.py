"""benchmarks/cpu_fast.py's pure parts: which entries it builds, and the scheme decision from measured figures
(the end-to-end run is smoke-tested on demo:sd15 by hand: it builds seven entries, too slow for the suite)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "cpu_fast.py"


@pytest.fixture(scope="module")
def cf():
    spec = importlib.util.spec_from_file_location("cpu_fast", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants(cf):
    v = cf.variants(["w8a8", "w8"], "demo:taesd")
    assert list(v) == ["quality", "fast", "tiny-vae", "int8-w8a8", "int8-w8"]
    assert v["fast"] == {"preset": "fast", "vae_decoder": "demo:taesd"} and v["int8-w8"] == {"precision": "int8", "int8_scheme": "w8"}
    assert "vae_decoder" not in v["int8-w8a8"]  # the scheme comparison keeps the base's VAE


def _res(step, psnr_worst, ssim_worst):
    q = {"psnr_db": {"mean": psnr_worst + 1, "worst": psnr_worst}, "ssim": {"mean": 0.99, "worst": ssim_worst}}
    return {"256x256": {"unet_step_s": step / 4, "quality": q}, "512x512": {"unet_step_s": step, "quality": q}}


def test_decision_is_the_fastest_scheme_that_passes_the_gate_at_every_size(cf):
    from lcm_export.builder.verify import INT8_IMAGE_GATE

    g = INT8_IMAGE_GATE
    results = {"int8-w8a8": _res(1.0, g["psnr_db"] - 1, 0.95),       # fastest, but below the PSNR gate
               "int8-w8a8-sq": _res(1.1, g["psnr_db"] + 3, g["ssim"]),  # passes, exactly at the SSIM gate
               "int8-hybrid": _res(1.3, g["psnr_db"] + 8, 0.97),
               "int8-w8": _res(2.0, 45.0, 0.99)}
    d = cf.decide(results, ["w8a8", "w8a8-sq", "hybrid", "w8"], [(256, 256), (512, 512)])
    assert d["at"] == "512x512" and d["choice"] == "w8a8-sq"
    assert [c["passes_gate"] for c in d["candidates"]] == [False, True, True, True]
    results["int8-w8a8-sq"]["256x256"]["quality"] = {"psnr_db": {"mean": 40, "worst": 40}, "ssim": {"mean": 0.5, "worst": 0.5}}
    assert cf.decide(results, ["w8a8", "w8a8-sq", "hybrid", "w8"], [(256, 256), (512, 512)])["choice"] == "hybrid"
    assert cf.decide({}, ["w8a8"], [(256, 256)])["choice"] is None
