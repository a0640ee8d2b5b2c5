"""The device loop (latents on the GPU between steps) driven on CPU: the demo entry's real ONNX Runtime
engines and the real LCM step graph (in ONNX Runtime) behind a fake "device" made of numpy buffers
that counts every host<->device copy. This checks the loop's plumbing and numbers; it is not a GPU
run (no GPU or TensorRT here: the TensorRT side of the same protocol is tested against stubs in
tests/backends/test_tensorrt.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fake_device import on_fake_device
from lcm_export.runtime import LCMPipeline, NonFiniteOutput
from lcm_export.runtime.device_loop import device_loop_for


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_device_loop_gives_the_host_loop_image_with_no_latents_on_the_host(demo_engine, guidance):
    host = LCMPipeline.from_engine_dir(demo_engine)
    want = host("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np")
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    dev, log = on_fake_device(pipe)
    got = pipe("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    n = 4 if guidance > 1 else 2
    assert dev.downloads == 1  # the 4-byte NaN/inf flag; otherwise nothing but the decoder's output came back
    # uploads: the text embeddings, the first latents, the VAE affine and the flag once, then only each step's noise
    assert dev.uploads == [(n, 77, 32), (n, 4, 8, 8), (3, 4, 1, 1), (1,)] + [(2, 4, 8, 8)] * 4
    assert [e["sample"] and e["encoder_hidden_states"] and not e["timestep"] for e in log["unet"]] == [True] * 4
    assert [e["sample"] and e["model_output"] and e["noise"] and not e["coef"] for e in log["step"]] == [True] * 4
    assert log["vae"] == [{"latent": True}]
    assert len(pipe.last_timings.unet) == 4 and pipe.last_timings.total > 0

    allocs = dev.allocs
    pipe("a red fox", steps=4, guidance=guidance, seed=4, batch=2, output_type="np")
    assert dev.allocs == allocs  # buffers are reused for the same shapes

    pipe.device_loop = False  # the host loop on the same engines: no device calls, same image
    calls, uploads = len(log["step"]), len(dev.uploads)
    np.testing.assert_allclose(pipe("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np"), want,
                               rtol=0, atol=1e-6)
    assert len(log["step"]) == calls and len(dev.uploads) == uploads


def test_device_loop_only_where_a_step_engine_takes_the_guidance_mode(demo_engine):
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    plan = next(iter(pipe.engines["unet"]))
    vae = pipe.engines["vae_decoder"][plan]
    assert device_loop_for(pipe.engines["unet"][plan], False, vae) is None  # ONNX Runtime engines: host loop
    on_fake_device(pipe)
    unet, vae = pipe.engines["unet"][plan], pipe.engines["vae_decoder"][plan]
    del unet.lcm_step[True]
    assert device_loop_for(unet, False, vae) is not None and device_loop_for(unet, True, vae) is None
    unet.lcm_step[True] = unet.lcm_step[False]
    vae.dtypes["latent"] = np.dtype(np.float16)  # a decoder taking fp16 latents: the step graph writes fp32
    assert device_loop_for(unet, True, vae) is None
    vae.dtypes["latent"] = np.dtype(np.float32)
    unet.lcm_step[True].inputs = unet.lcm_step[True].inputs[:-1]  # a step engine of another graph version
    assert device_loop_for(unet, True, vae) is None
    unet.lcm_step[True].inputs.append("nonfinite_in")
    unet.dtypes["out_sample"] = np.dtype(np.float16)  # a UNet with fp16 outputs: the fp32 step graph cannot take it
    assert device_loop_for(unet, True, vae) is None


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps,bad_step", [(1, 0), (3, 0), (3, 1), (3, 2), (4, 3)])
def test_device_loop_names_the_unet_and_step_when_it_produces_nan_or_inf(demo_engine, clip, steps, bad_step):
    """Clipping x̂_0 (clip_sample) would turn an inf UNet output into a finite image: the step engine's
    flag still reports it, with the first bad step (as the host loop's message), and nothing is decoded.
    Odd and even step counts: the flag's ping-pong buffer is read right either way."""
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    pipe.scheduler_config = {**pipe.scheduler_config, "clip_sample": clip}
    dev, log = on_fake_device(pipe)
    for unet in pipe.engines["unet"].values():
        inner, calls = unet._run_all, []

        def poisoned(f, inner=inner, calls=calls):
            calls.append(1)
            out = inner(f)
            if len(calls) >= bad_step + 1:  # from bad_step on: the first bad step is the one named
                out[0][0, 0, 0, 0] = np.inf if len(calls) % 2 else np.nan
            return out

        unet._run_all = poisoned
    with pytest.raises(NonFiniteOutput, match=f"the unet engine produced NaN/inf at step {bad_step + 1} "):
        pipe("a red fox", steps=steps, seed=0)
    assert dev.downloads == 1 and log["vae"] == []


def test_device_loop_releases_events_and_its_lock_when_an_engine_fails(demo_engine):
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    dev, _ = on_fake_device(pipe)
    (unet,) = pipe.engines["unet"].values()
    step = unet.lcm_step[False]
    run_all = step._run_all

    def fail(feeds):
        raise RuntimeError("engine failed")

    step._run_all = fail
    with pytest.raises(RuntimeError, match="engine failed"):
        pipe("a red fox", steps=4, seed=0)
    assert dev.discarded == 1  # the one event recorded before the loop (the failing step recorded none)
    step._run_all = run_all
    assert pipe("a red fox", steps=4, seed=0, output_type="np").shape == (1, 64, 64, 3)  # the loop's lock was released
