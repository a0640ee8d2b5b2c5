"""Merging requests (lcm_export/serve/batching.py), without Ray: each request gets its solo image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lcm_export.errors import EngineError, UserError
from lcm_export.runtime import LCMPipeline
from lcm_export.serve.api import png_bytes
from lcm_export.serve.batching import Done, Job, make_job, pack, run_jobs, run_merged, run_solo, solo_noise


def job(prompt="p", seed=0, batch=1, steps=4, guidance=1.0, neg=None, hw=(64, 64)):
    return Job(prompt, neg, steps, guidance, seed, batch, *hw)


def test_pack_groups_by_key_in_arrival_order_and_caps_images():
    jobs = [job(seed=0), job(steps=2), job(seed=1, batch=2), job(seed=2), job(seed=3), job(steps=2, seed=5),
            job(seed=4, batch=6)]
    assert pack(jobs, 4) == [[0, 2, 3], [4], [6], [1, 5]]
    assert pack(jobs, 1) == [[0], [2], [3], [4], [6], [1], [5]]
    # negative prompt and guidance are part of the key
    assert pack([job(neg="a"), job(neg="b"), job(guidance=2.0), job(guidance=2.0)], 8) == [[0], [1], [2, 3]]


@pytest.mark.parametrize("batch", [1, 2])
def test_solo_noise_is_what_the_solo_call_draws(tiny_entry, batch):
    pipe = LCMPipeline.from_engine_dir(tiny_entry)
    j = make_job(pipe, "a red cube", seed=7, batch=batch, steps=4)
    latents, noise = solo_noise(j, pipe.latent_channels)
    assert len(noise) == 3 and latents.shape == (batch, 4, 8, 8)
    a = pipe("a red cube", seed=7, batch=batch, output_type="np")
    b = pipe("a red cube", seed=12345, batch=batch, latents=latents, step_noise=noise, output_type="np")
    assert np.array_equal(a, b)
    c = pipe("a red cube", seed=8, batch=batch, output_type="np")
    assert not np.array_equal(a, c)  # the seed matters, so the equality above is not vacuous


def _psnr(a: bytes, b: bytes) -> float:
    x = np.asarray(Image.open(io.BytesIO(a)), np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)), np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_merged_call_gives_each_request_its_solo_png(batch4_entry, guidance):
    """3 requests (different prompts and seeds, one of batch 2) = 4 images in one engine call: each
    request's PNG bytes equal its solo call's."""
    pipe = LCMPipeline.from_engine_dir(batch4_entry)
    jobs = [make_job(pipe, p, seed=s, batch=b, guidance=guidance, negative_prompt="blurry" if guidance > 1 else None)
            for p, s, b in (("a red cube", 1, 1), ("a blue sphere on a table", 2, 2), ("", 3, 1))]
    merged = run_merged(pipe, jobs)
    for j, imgs in zip(jobs, merged):
        solo = run_solo(pipe, j)
        assert len(imgs) == len(solo) == j.batch
        for a, b in zip(imgs, solo):
            pa, pb = png_bytes(a), png_bytes(b)
            assert pa == pb, f"merged image differs from solo (PSNR {_psnr(pa, pb):.1f} dB)"


def test_run_jobs_mixes_keys_and_reports_the_call_batch(batch4_entry):
    pipe = LCMPipeline.from_engine_dir(batch4_entry)
    jobs = [make_job(pipe, "a", seed=1), make_job(pipe, "b", seed=2, steps=2), make_job(pipe, "c", seed=3),
            make_job(pipe, "d", seed=4, batch=3)]
    out = run_jobs(pipe, jobs, cap=4)
    assert all(isinstance(o, Done) for o in out)
    assert [o.call_batch for o in out] == [2, 1, 2, 3]  # a+c merged; d alone (2+3 > 4); b alone (other steps)
    for j, o in zip(jobs, out):
        assert [png_bytes(i) for i in o.images] == [png_bytes(i) for i in run_solo(pipe, j)]


class _StubPipe:
    """Fails (EngineError) on prompt 'bad', raises a bare bug on prompt 'bug'; records call batches."""

    latent_channels = 4

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, batch=1, **kw):
        prompts = prompt if isinstance(prompt, list) else [prompt] * batch
        self.calls.append(len(prompts))
        if "bad" in prompts:
            raise EngineError("the unet engine produced NaN/inf at step 1")
        if "bug" in prompts:
            raise ZeroDivisionError("division by zero")
        return [f"img:{p}" for p in prompts]


def test_run_jobs_keeps_failures_per_request():
    pipe = _StubPipe()
    jobs = [job("ok1", 1), job("bad", 2), job("ok2", 3), job("bug", 4, steps=2)]
    out = run_jobs(pipe, jobs, cap=4)
    assert isinstance(out[0], Done) and out[0].images == ["img:ok1"]
    assert isinstance(out[2], Done) and out[2].images == ["img:ok2"]
    assert isinstance(out[1], EngineError) and "NaN" in str(out[1])
    assert isinstance(out[3], EngineError) and str(out[3]) == "internal error: ZeroDivisionError: division by zero"
    assert pipe.calls == [3, 1, 1, 1, 1]  # the merged call failed, so each of its requests ran alone


@pytest.mark.parametrize("kwargs, words", [
    ({"steps": 0}, "steps 0"),
    ({"height": 128, "width": 128}, "128x128 was not built"),
    ({"seed": -1}, "seed -1"),
    ({"height": 64}, "both height and width"),
    ({"prompt": ["a", "b"]}, "prompt must be a string"),
])
def test_make_job_refuses_bad_requests_before_any_engine_runs(tiny_entry, kwargs, words):
    pipe = LCMPipeline.from_engine_dir(tiny_entry)
    args = {"prompt": "x", **kwargs}
    with pytest.raises(UserError, match=words):
        make_job(pipe, **args)


def test_requests_with_other_adapters_never_share_an_engine_call():
    a, b = (("a", 0.8),), (("a", 0.5),)
    jobs = [Job("p", None, 4, 1.0, 0, 1, 64, 64, a), Job("p", None, 4, 1.0, 1, 1, 64, 64, b), Job("p", None, 4, 1.0, 2, 1, 64, 64),
            Job("p", None, 4, 1.0, 3, 1, 64, 64, a)]
    assert pack(jobs, 8) == [[0, 3], [1], [2]]


def test_merged_call_with_adapters_gives_each_request_its_solo_png(adapter_entry):
    pipe = LCMPipeline.from_engine_dir(adapter_entry)
    jobs = [make_job(pipe, p, seed=s, adapters={"a": 0.8, "b": 0.5}) for p, s in (("a red cube", 1), ("", 2), ("a fox", 3))]
    assert len({j.key for j in jobs}) == 1
    for j, imgs in zip(jobs, run_merged(pipe, jobs)):
        assert png_bytes(imgs[0]) == png_bytes(run_solo(pipe, j)[0])
    plain = run_solo(pipe, make_job(pipe, "a red cube", seed=1))
    assert png_bytes(plain[0]) != png_bytes(run_solo(pipe, jobs[0])[0])  # the adapters changed the image
    done = run_jobs(pipe, [make_job(pipe, "a red cube", seed=1, adapters={"a": 0.8}), make_job(pipe, "a red cube", seed=1)], 4)
    assert [d.call_batch for d in done] == [1, 1]  # other adapters: separate calls
    assert png_bytes(done[1].images[0]) == png_bytes(plain[0])
