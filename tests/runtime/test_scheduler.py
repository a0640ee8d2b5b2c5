"""The numpy LCM scheduler against diffusers' LCMScheduler: timesteps, and a full loop fed the
same model outputs and noise, for all three prediction types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as RefScheduler

from lcm_export.sources.demo import SCHEDULER_CONFIG
from lcm_export.runtime.scheduler import LCMScheduler


@pytest.mark.parametrize("original", [50, 25, 100])
@pytest.mark.parametrize("steps", range(1, 9))
def test_timesteps_match_diffusers(steps, original):
    ref = RefScheduler(**{**SCHEDULER_CONFIG, "original_inference_steps": original})
    ref.set_timesteps(steps)
    ours = LCMScheduler.from_config({**SCHEDULER_CONFIG, "original_inference_steps": original, "_class_name": "x", "unknown": 1})
    got = ours.set_timesteps(steps)
    assert got.dtype == np.int64
    assert got.tolist() == ref.timesteps.tolist()
    assert all(a > b for a, b in zip(got, got[1:]))


def test_four_steps_is_the_documented_schedule():
    s = LCMScheduler(**SCHEDULER_CONFIG)
    assert s.set_timesteps(4).tolist() == [999, 759, 499, 259]


def test_original_steps_override_in_set_timesteps():
    ref = RefScheduler(**SCHEDULER_CONFIG)
    ref.set_timesteps(3, original_inference_steps=20)
    assert LCMScheduler(**SCHEDULER_CONFIG).set_timesteps(3, original_inference_steps=20).tolist() == ref.timesteps.tolist()


LOOP_CASES = [(p, b, a, False) for p in ("epsilon", "v_prediction", "sample") for b, a in (("scaled_linear", True), ("linear", False))]
# zero terminal SNR makes alpha_bar(999) = 0: only defined for v- and sample-prediction
LOOP_CASES += [(p, "scaled_linear", True, True) for p in ("v_prediction", "sample")]


@pytest.mark.parametrize("prediction_type,beta_schedule,alpha_one,zero_snr", LOOP_CASES)
@pytest.mark.parametrize("steps", [1, 4, 6])
def test_full_loop_matches_diffusers(prediction_type, beta_schedule, alpha_one, zero_snr, steps):
    cfg = {**SCHEDULER_CONFIG, "prediction_type": prediction_type, "beta_schedule": beta_schedule,
           "set_alpha_to_one": alpha_one, "rescale_betas_zero_snr": zero_snr}
    ref = RefScheduler(**cfg)
    ref.set_timesteps(steps)
    ours = LCMScheduler.from_config(cfg)
    ours.set_timesteps(steps)
    rng = np.random.default_rng(0)
    shape = (2, 4, 8, 6)
    x_ref = x_ours = rng.standard_normal(shape, dtype=np.float32)
    x_ref = torch.from_numpy(x_ref)
    noises = [rng.standard_normal(shape, dtype=np.float32) for _ in range(steps)]

    import diffusers.schedulers.scheduling_lcm as lcm_mod

    original = lcm_mod.randn_tensor
    queue = list(noises)
    lcm_mod.randn_tensor = lambda *a, **k: torch.from_numpy(queue.pop(0))
    try:
        for i, t in enumerate(ref.timesteps):
            model_out = rng.standard_normal(shape, dtype=np.float32)  # stands in for the UNet
            r = ref.step(torch.from_numpy(model_out), t, x_ref, return_dict=True)
            x_ours, den = ours.step(model_out, int(t), x_ours, noise=noises[i] if i < steps - 1 else None)
            x_ref = r.prev_sample
            for a, b in ((x_ours, x_ref), (den, r.denoised)):
                b = b.numpy()
                rel = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)
                assert rel <= 1e-6, f"step {i}: rel {rel:.2e}"
    finally:
        lcm_mod.randn_tensor = original
    assert len(queue) == 1  # diffusers drew noise on every step but the last, as we did


def test_last_step_needs_no_noise_and_others_do():
    s = LCMScheduler(**SCHEDULER_CONFIG)
    ts = s.set_timesteps(2)
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        s.step(x, int(ts[0]), x)
    prev, den = s.step(x, int(ts[1]), x)
    assert np.array_equal(prev, den)


def test_step_is_pure():
    s = LCMScheduler(**SCHEDULER_CONFIG)
    ts = s.set_timesteps(4)
    rng = np.random.default_rng(1)
    x, m, n = (rng.standard_normal((1, 4, 4, 4), dtype=np.float32) for _ in range(3))
    a = s.step(m, int(ts[1]), x, noise=n)
    b = s.step(m, int(ts[1]), x, noise=n)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_bad_config_and_steps():
    with pytest.raises(ValueError, match="prediction_type"):
        LCMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="between 1 and"):
        LCMScheduler().set_timesteps(51)
