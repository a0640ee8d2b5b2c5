"""The runtime's host work: post-processing as diffusers does it (bit-exact), outputs by name, and the
overhead measurement with stub engines (a measurement: nothing here asserts a time)."""

from __future__ import annotations

import numpy as np
import pytest


def test_postprocess_matches_diffusers_formula_bit_exact(demo_engine):
    from lcm_export.bench.overhead import stub_pipeline

    pipe = stub_pipeline(demo_engine, (64, 96))
    img = np.random.default_rng(0).standard_normal((2, 3, 64, 96), dtype=np.float32)
    img[0, 0, 0, :4] = [-1.0, 1.0, 0.5 / 255 * 2 - 1, 3.0]
    want = (np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    ims = pipe._postprocess(img, "pil")
    assert [im.size for im in ims] == [(96, 64)] * 2 and all(im.mode == "RGB" for im in ims)
    assert all((np.asarray(im) == w).all() for im, w in zip(ims, want))
    arr = pipe._postprocess(img, "np")
    assert arr.shape == (2, 64, 96, 3) and np.array_equal(arr, np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    again = pipe._postprocess(img * 0, "np")  # the reused buffer never leaks into an earlier result
    assert not np.array_equal(arr, again)


def test_decoder_input_scaling(demo_engine):
    from lcm_export.bench.overhead import stub_pipeline

    pipe = stub_pipeline(demo_engine, (64, 64))
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    scaling = np.float32(pipe.manifest["vae"]["scaling_factor"])
    assert np.array_equal(pipe._decoder_input(x.copy()), x / scaling)
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    pipe.__init__(pipe.manifest | {"vae": {"scaling_factor": 0.5, "latents_mean": mean, "latents_std": std}},
                  pipe.engine_dir, pipe.engines, pipe.tokenizers, pipe.scheduler_config)
    want = x * np.reshape(std, (1, 4, 1, 1)) / 0.5 + np.reshape(mean, (1, 4, 1, 1))
    assert np.allclose(pipe._decoder_input(x.copy()), want, rtol=1e-6)


def test_outputs_by_name_not_position(demo_engine):
    from lcm_export.errors import UserError
    from lcm_export.bench.overhead import FixedEngine, stub_pipeline

    pipe = stub_pipeline(demo_engine, (64, 64))
    pipe.manifest["components"]["text_encoder_2"] = {"outputs": [["hidden_states", "float32", []], ["text_embeds", "float32", []]]}
    eng = FixedEngine({"text_embeds": np.zeros((1, 8), np.float32), "hidden_states": np.ones((1, 77, 16), np.float32)})
    out = pipe._by_name(eng, eng.run_all({"input_ids": np.zeros((1, 77), np.int32)}), "text_encoder_2")
    assert out["hidden_states"].shape == (1, 77, 16) and out["text_embeds"].shape == (1, 8)
    with pytest.raises(UserError, match="no output hidden_states"):
        pipe._by_name(FixedEngine({"a": np.zeros(1), "b": np.zeros(1)}), [np.zeros(1)] * 2, "text_encoder_2")


def test_overhead_measurement_reports_parts(demo_engine):
    from lcm_export.bench.overhead import measure_overhead

    r = measure_overhead(demo_engine, (64, 64), runs=2, warmup=1)
    assert r["resolution"] == "64x64" and r["median_s"] > 0 and r["engines_median_s"] < r["median_s"]
    assert r["postprocess_median_s"] > 0 and "stub engines" in r["method"]


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_overhead_of_the_device_loop_is_measured_on_the_device_loop(demo_engine, guidance):
    from lcm_export.bench.overhead import measure_overhead

    r = measure_overhead(demo_engine, (64, 64), runs=2, warmup=1, guidance=guidance, device_loop=True)
    assert r["loop"] == "device" and "device loop" in r["method"] and r["median_s"] > 0
    assert r["vae_input_median_s"] == 0  # the decoder's input is the step engine's output on the device
    assert measure_overhead(demo_engine, (64, 64), runs=2, warmup=1)["loop"] == "host"
