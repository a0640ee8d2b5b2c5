"""The lean runtime end to end: parity with diffusers, per-stage timings, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from lcm_export.errors import UserError
from lcm_export.runtime import LCMPipeline, NonFiniteOutput


def _diffusers_images(pipe, prompt, steps, guidance, latents, noise):
    """diffusers' StableDiffusionPipeline + LCMScheduler with our latents and step noise injected."""
    from diffusers import LCMScheduler
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    queue = [torch.from_numpy(n) for n in noise]
    original = lcm_mod.randn_tensor
    lcm_mod.randn_tensor = lambda *a, **k: queue.pop(0)
    try:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                   height=latents.shape[2] * 8, width=latents.shape[3] * 8, output_type="np").images
    finally:
        lcm_mod.randn_tensor = original
    assert not queue
    return out


def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_parity_with_diffusers(demo_engine, fused_pipe, steps, guidance, hw):
    runtime = LCMPipeline.from_engine_dir(demo_engine)
    rng = np.random.default_rng(42)
    latents = rng.standard_normal((1, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    noise = [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps - 1)]
    prompt = "a photo of an astronaut riding a horse"
    ours = runtime(prompt, steps=steps, guidance=guidance, height=hw[0], width=hw[1], latents=latents,
                   step_noise=noise, output_type="np")
    ref = _diffusers_images(fused_pipe, prompt, steps, guidance, latents, noise)
    assert ours.shape == ref.shape == (1, hw[0], hw[1], 3)
    assert 0.02 < ref.std()  # a real image, not a flat one that any output would match
    value = psnr(ours, ref)
    assert value >= 40, f"PSNR {value:.1f} dB"


def test_guidance_changes_the_image(demo_engine):
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    a = pipe("a cat", guidance=1.0, output_type="np")
    b = pipe("a cat", guidance=8.0, output_type="np")
    c = pipe("a cat", guidance=1.0, output_type="np")
    assert np.array_equal(a, c)  # seeded: deterministic
    assert psnr(a, b) < 40


def test_timings_and_batch(demo_engine, monkeypatch):
    """Timings against independently timed values: each engine call timed by a wrapper around the
    backend (engine time), and the whole call timed from outside (an upper bound on total)."""
    import time

    from lcm_export.backends import onnxruntime as backend

    calls = []
    real = backend.OrtEngine.run_all

    def timed(self, feeds, names=None):
        t0 = time.perf_counter()
        out = real(self, feeds, names)
        calls.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(backend.OrtEngine, "run_all", timed)
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    t0 = time.perf_counter()
    imgs = pipe("", steps=3, batch=2, guidance=2.0)  # empty prompt allowed; CFG runs UNet at 2B
    wall = time.perf_counter() - t0
    assert len(imgs) == 2 and imgs[0].size == (64, 64)
    t = pipe.last_timings
    assert len(calls) == 1 + 3 + 1  # text encoder, 3 UNet steps, VAE
    assert len(t.unet) == 3 and all(u >= c for u, c in zip(t.unet, calls[1:4]))
    assert t.text_encoder >= calls[0] and t.vae_decoder >= calls[4]
    # each stage's figure is its engine call plus at most a little bookkeeping
    assert t.engines == pytest.approx(sum(calls), abs=0.005 + 0.1 * sum(calls))
    assert sum(calls) <= t.total <= wall


@pytest.mark.parametrize("kwargs,needle", [
    ({"steps": 0}, "from 1 to 50"), ({"steps": 51}, "from 1 to 50"), ({"guidance": -1.0}, "from 0 to 30"),
    ({"guidance": float("nan")}, "from 0 to 30"), ({"batch": 0}, "from 1 to 64"),
    ({"height": 128, "width": 128}, "built: 64x64, 64x96"),
])
def test_bad_arguments(demo_engine, kwargs, needle):
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        pipe("x", **kwargs)


def test_generate_cli_writes_images_and_timing(demo_engine, tmp_path, capsys):
    code, out, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "hi", "--batch", "2",
                              "--resolution", "64x96", "--out", tmp_path / "img.png", "--json"], capsys)
    assert code == 0, err
    from PIL import Image

    for i in range(2):
        assert Image.open(tmp_path / f"img-{i}.png").size == (96, 64)
    timing = json.loads(out.strip().splitlines()[-1])
    assert timing["overhead"] >= 0 and len(timing["unet_steps"]) == 4
    assert "runtime overhead" in out


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "from 1 to 50"), (["--resolution", "128x128"], "built: 64x64, 64x96"),
    (["--guidance", "-2"], "from 0 to 30"), (["--batch", "0"], "from 1 to 64"),
])
def test_generate_cli_bad_input(demo_engine, tmp_path, capsys, args, needle):
    code, _, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "x", "--out", tmp_path / "o.png", *args], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_missing_dir_and_bad_schema(demo_engine, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--engine-dir", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "entry"
    shutil.copytree(demo_engine, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["generate", "--engine-dir", bad, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "schema version 99" in err and "rebuild" in err


def test_corrupt_engine_file(demo_engine, tmp_path, capsys):
    bad = tmp_path / "entry"
    shutil.copytree(demo_engine, bad)
    f = bad / "unet" / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    code, _, err = run_cli(["generate", "--engine-dir", bad, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "corrupt or truncated" in err and "unet/model.onnx" in err and err.count("\n") == 1


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_nan_is_reported_not_written(demo_engine, tmp_path, capsys, monkeypatch, component):
    from lcm_export.backends import onnxruntime as engines

    real_run = engines.OrtEngine.run

    def poisoned(self, feeds):
        out = real_run(self, feeds)
        if ("sample" in feeds and component == "unet") or ("latent" in feeds and component == "vae_decoder"):
            out = out.copy()
            out.flat[0] = np.inf
        return out

    monkeypatch.setattr(engines.OrtEngine, "run", poisoned)
    code, _, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 1 and f"the {component} engine produced NaN/inf" in err and err.count("\n") == 1  # an engine failure
    if component == "unet":
        assert "at step 1" in err
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(NonFiniteOutput):
        LCMPipeline.from_engine_dir(demo_engine)("x")


def test_graph_for_another_cpu_isa_is_refused(demo_engine, tmp_path, capsys):
    from lcm_export._cpu import cpu_isa

    m = json.loads((demo_engine / "manifest.json").read_text())
    assert m["onnxruntime"]["cpu_isa"] == cpu_isa() and m["onnxruntime"]["stored_optimization"] == "ORT_ENABLE_ALL"
    bad = tmp_path / "entry"
    shutil.copytree(demo_engine, bad)
    m["onnxruntime"]["cpu_isa"] = "some-other-isa"
    (bad / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["generate", "--engine-dir", bad, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "optimized for some-other-isa CPUs" in err and "--force" in err and err.count("\n") == 1
