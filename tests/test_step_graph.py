"""The LCM step graph (what a GPU engine runs between UNet calls) in ONNX Runtime, against the numpy
scheduler (bit for bit) and against diffusers' LCMScheduler (independent reference)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import LCMScheduler as RefScheduler

from lcm_export.sources.demo import SCHEDULER_CONFIG
from lcm_export.runtime.device_loop import decoder_affine
from lcm_export.runtime.scheduler import LCMScheduler
from lcm_export.core.step_graph import COEF, lcm_step_onnx, write_lcm_step_onnx


def _session(cfg: bool) -> ort.InferenceSession:
    return ort.InferenceSession(lcm_step_onnx(cfg).SerializeToString(), providers=["CPUExecutionProvider"])


ZERO = np.zeros(1, np.float32)
SD15_VAE = {"scaling_factor": 0.18215}
SDXL_LIKE_VAE = {"scaling_factor": 0.13025, "shift_factor": 0.1, "latents_mean": [0.1, -0.2, 0.3, 0.0],
                 "latents_std": [1.5, 0.5, 2.0, 1.0]}


@pytest.mark.parametrize("prediction_type,clip", [("epsilon", False), ("epsilon", True), ("v_prediction", False),
                                                  ("sample", False)])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_step_graph_is_the_numpy_scheduler_bit_for_bit(prediction_type, clip, guidance):
    cfg = {**SCHEDULER_CONFIG, "prediction_type": prediction_type, "clip_sample": clip, "clip_sample_range": 1.5}
    sched = LCMScheduler.from_config(cfg)
    timesteps = sched.set_timesteps(4)
    sess = _session(guidance > 1)
    rng = np.random.default_rng(1)
    b, shape = 2, (2, 4, 6, 5)
    x = rng.standard_normal(shape, dtype=np.float32)
    affine = decoder_affine(SD15_VAE, 4)
    for i, t in enumerate(timesteps):
        out = rng.standard_normal(((2 if guidance > 1 else 1) * b, *shape[1:]), dtype=np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32) if i < 3 else np.zeros(shape, np.float32)
        nxt, latent, flag = sess.run(None, {"sample": x, "model_output": out, "noise": noise, "vae_affine": affine,
                                            "coef": sched.step_coefficients(int(t), guidance), "nonfinite_in": ZERO})
        assert flag.tolist() == [0.0]
        eps = out if guidance == 1 else out[:b] + np.float32(guidance) * (out[b:] - out[:b])
        want, denoised = sched.step(eps, int(t), x, noise=noise if i < 3 else None)
        np.testing.assert_array_equal(nxt, want if guidance == 1 else np.concatenate([want, want]))
        np.testing.assert_array_equal(latent, denoised / np.float32(0.18215))
        x = want


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_graph_matches_diffusers_lcm_scheduler(prediction_type):
    """Four steps with guidance, driven only by diffusers (its step, our noise), vs the graph."""
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    cfg = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    ref = RefScheduler(**cfg)
    ref.set_timesteps(4)
    ours = LCMScheduler.from_config(cfg)
    ours.set_timesteps(4)
    sess = _session(True)
    rng = np.random.default_rng(2)
    shape = (1, 4, 8, 8)
    x = rng.standard_normal(shape, dtype=np.float32)
    x_ref = torch.from_numpy(x.copy())
    affine = decoder_affine(SD15_VAE, 4)
    original = lcm_mod.randn_tensor
    try:
        for i, t in enumerate(ref.timesteps):
            out = rng.standard_normal((2, *shape[1:]), dtype=np.float32)
            noise = rng.standard_normal(shape, dtype=np.float32)
            lcm_mod.randn_tensor = lambda *a, n=noise, **k: torch.from_numpy(n)
            uncond, cond = torch.from_numpy(out).chunk(2)
            x_ref, den_ref = ref.step(uncond + 3.0 * (cond - uncond), t, x_ref, return_dict=False)
            x, latent, _ = sess.run(None, {"sample": x, "model_output": out, "vae_affine": affine, "nonfinite_in": ZERO,
                                           "noise": noise if i < 3 else np.zeros_like(noise),
                                           "coef": ours.step_coefficients(int(t), 3.0)})
            x = x[:1]
            # torch and the graph round differently (x̂_0 divides by √ᾱ_t ≈ 0.07 at t=999): float32 error, scaled
            np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=2e-6 * np.abs(x_ref.numpy()).max())
        want = den_ref.numpy() / 0.18215
        np.testing.assert_allclose(latent, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    finally:
        lcm_mod.randn_tensor = original


def test_coefficients_layout_and_last_step():
    s = LCMScheduler(**SCHEDULER_CONFIG)
    ts = s.set_timesteps(4)
    c = dict(zip(COEF, s.step_coefficients(int(ts[0]), 8.0)))
    a_t, a_prev = s.alphas_cumprod[999], s.alphas_cumprod[759]
    assert c["k_sample"] == 1 and c["k_eps"] == pytest.approx(np.sqrt(1 - a_t)) and c["k_div"] == pytest.approx(np.sqrt(a_t))
    assert c["sqrt_alpha_prev"] == pytest.approx(np.sqrt(a_prev)) and c["guidance"] == 8
    assert c["clip_lo"] == -np.inf and c["clip_hi"] == np.inf
    last = dict(zip(COEF, s.step_coefficients(int(ts[-1]))))
    assert (last["sqrt_alpha_prev"], last["sqrt_beta_prev"]) == (1, 0)
    assert [s.step_coefficients(int(t))[COEF.index("steps_left")] for t in ts] == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step_coefficients(500)


def test_latent_output_is_the_decoder_input_the_host_path_computes(tmp_path):
    """SDXL-style VAEs (mean/std/shift) and SD 1.5's plain scaling: the graph's ``latent`` equals
    what the host pipeline feeds the decoder (``LCMPipeline._decoder_input``)."""
    from lcm_export.runtime.pipeline import LCMPipeline

    path = write_lcm_step_onnx(tmp_path / "step.onnx", False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sched = LCMScheduler(**SCHEDULER_CONFIG)
    t = int(sched.set_timesteps(1)[0])
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 4), dtype=np.float32)
    for vae in (SD15_VAE, SDXL_LIKE_VAE):
        host = LCMPipeline.__new__(LCMPipeline)
        host._vae_div, host._vae_mul, host._vae_add = decoder_affine(vae, 4)
        _, latent, _ = sess.run(None, {"sample": x, "model_output": x, "noise": np.zeros_like(x), "nonfinite_in": ZERO,
                                       "vae_affine": decoder_affine(vae, 4), "coef": sched.step_coefficients(t)})
        denoised = sched.step(x, t, x)[1]
        np.testing.assert_array_equal(latent, host._decoder_input(denoised.copy()))


@pytest.mark.parametrize("cfg", [False, True])
def test_nonfinite_flag_sees_nan_and_inf_through_clipping_and_carries_over(cfg):
    sess = _session(cfg)
    sched = LCMScheduler.from_config({**SCHEDULER_CONFIG, "clip_sample": True})
    t = int(sched.set_timesteps(4)[-1])
    x = np.zeros((1, 4, 4, 4), np.float32)
    feeds = {"sample": x, "noise": x, "vae_affine": decoder_affine(SD15_VAE, 4), "coef": sched.step_coefficients(t, 2.0)}
    for bad in (np.nan, np.inf, -np.inf):
        out = np.zeros((2 if cfg else 1, 4, 4, 4), np.float32)
        out[-1, 3, 2, 1] = bad  # the conditional half with cfg
        _, latent, flag = sess.run(None, {**feeds, "model_output": out, "nonfinite_in": ZERO})
        assert flag.tolist() == [1.0]
        if bad == np.inf:
            assert np.isfinite(latent).all()  # what the flag is for: clipping hid it
    clean = np.zeros((2 if cfg else 1, 4, 4, 4), np.float32)
    assert sess.run(None, {**feeds, "model_output": clean, "nonfinite_in": np.ones(1, np.float32)})[2].tolist() == [1.0]
    assert sess.run(None, {**feeds, "model_output": clean, "nonfinite_in": ZERO})[2].tolist() == [0.0]
    # the flag is the steps left at the first bad step: a later bad step keeps the earlier, larger value
    first = {**feeds, "coef": sched.step_coefficients(int(sched.timesteps[0]), 2.0), "model_output": out}
    assert sess.run(None, {**first, "nonfinite_in": ZERO})[2].tolist() == [4.0]
    assert sess.run(None, {**feeds, "model_output": out, "nonfinite_in": np.full(1, 4, np.float32)})[2].tolist() == [4.0]
