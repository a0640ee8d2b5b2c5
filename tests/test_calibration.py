"""int8 calibration data: the UNet inputs of the entry's own 4-step LCM trajectories, checked against
diffusers' own pieces (its LCMScheduler's timesteps, its text encoder, the seeded latents)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_export.builder.quantize import CALIBRATION_PROMPTS, calibration_record, unet_calibration_feeds
from lcm_export.builder.verify import seeded_inputs


@pytest.fixture(scope="module")
def feeds(demo_pipe):
    return unet_calibration_feeds(demo_pipe, (64, 64), prompts=CALIBRATION_PROMPTS[:3])


def test_one_feed_per_unet_call_with_the_exported_graphs_inputs(feeds, demo_pipe):
    assert len(feeds) == 3 * 4
    d = demo_pipe.unet.config.cross_attention_dim
    for f in feeds:
        assert list(f) == ["sample", "timestep", "encoder_hidden_states"]  # components.component_io order
        assert f["sample"].shape == (1, 4, 8, 8) and f["sample"].dtype == np.float32
        assert f["timestep"].shape == (1,) and f["timestep"].dtype == np.float32
        assert f["encoder_hidden_states"].shape == (1, 77, d)


def test_timesteps_are_the_lcm_schedulers(feeds, demo_pipe):
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(demo_pipe.scheduler.config)
    sched.set_timesteps(4)
    want = [float(t) for t in sched.timesteps]
    assert len(set(want)) == 4
    for i in range(3):
        assert [float(f["timestep"][0]) for f in feeds[4 * i:4 * i + 4]] == want


def test_trajectories_start_at_the_seeded_latents_and_carry_each_prompts_embedding(feeds, demo_pipe):
    from diffusers import LCMScheduler

    sigma = LCMScheduler.from_config(demo_pipe.scheduler.config).init_noise_sigma
    for i, prompt in enumerate(CALIBRATION_PROMPTS[:3]):
        latents, _ = seeded_inputs(4, (64, 64), 4, seed=1000 + i)
        np.testing.assert_allclose(feeds[4 * i]["sample"], latents * sigma, rtol=0, atol=1e-6)
        ids = demo_pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = demo_pipe.text_encoder(ids)[0].numpy()
        for f in feeds[4 * i:4 * i + 4]:
            np.testing.assert_allclose(f["encoder_hidden_states"], emb, rtol=0, atol=1e-5)
    # later steps move: the trajectory, not four copies of the start
    assert not np.allclose(feeds[0]["sample"], feeds[1]["sample"])


def test_the_prompt_set_covers_the_unconditional_embedding_and_the_record_says_what_it_is():
    assert "" in CALIBRATION_PROMPTS and len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS) == 8
    rec = calibration_record((64, 96), 32)
    assert rec["samples"] == 32 and rec["prompts"] == 8 and rec["steps"] == 4 and rec["resolution"] == "64x96"


def test_sdxl_feeds_carry_the_added_conditioning():
    from lcm_export.sources.demo import build_demo_pipeline

    pipe = build_demo_pipeline("sdxl")
    f = unet_calibration_feeds(pipe, (64, 64), prompts=("a cat",), steps=2)
    assert len(f) == 2 and list(f[0]) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    np.testing.assert_array_equal(f[0]["time_ids"], [[64, 64, 0, 0, 64, 64]])
