"""Resolution -> shape plans -> (min, opt, max) per input: pure functions, checked by hand."""

from __future__ import annotations

import pytest

from lcm_export.core.shapes import component_profiles, plan_shapes, size_multiple, unet_batch_range, validate_resolution
from lcm_export.errors import UserError


def test_size_multiple():
    assert size_multiple(4) == 64  # SD 1.5 / SDXL-style 4 down blocks: 8 * 2**3
    assert size_multiple(2) == 16
    assert size_multiple(1) == 8


@pytest.mark.parametrize("guidance,want", [("off", (2, 2, 2)), ("on", (4, 4, 4)), ("auto", (2, 2, 4))])
def test_unet_batch(guidance, want):
    assert unet_batch_range(2, guidance) == want


def test_static_plans_and_profiles():
    plans = plan_shapes([(512, 512), (512, 768), (512, 512)], None, 1, "auto", 64)
    assert [p.name for p in plans] == ["512x512", "512x768"]  # duplicates dropped, order kept
    prof = component_profiles(plans[1], text_dim=768)
    assert prof["unet"]["sample"] == ((1, 4, 64, 96), (1, 4, 64, 96), (2, 4, 64, 96))
    assert prof["unet"]["timestep"] == ((1,), (1,), (2,))
    assert prof["unet"]["encoder_hidden_states"] == ((1, 77, 768), (1, 77, 768), (2, 77, 768))
    assert prof["vae_decoder"]["latent"] == ((1, 4, 64, 96),) * 3
    assert prof["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (2, 77))
    assert plans[0].static and plans[0].covers(512, 512) and not plans[0].covers(512, 768)


def test_dynamic_plan():
    (p,) = plan_shapes([(512, 640)], ((256, 256), (768, 1024)), 2, "on", 64)
    assert p.name == "dyn-256x256-768x1024" and not p.static
    assert (p.min_hw, p.opt_hw, p.max_hw) == ((256, 256), (512, 640), (768, 1024))
    prof = component_profiles(p, 768)
    assert prof["unet"]["sample"] == ((4, 4, 32, 32), (4, 4, 64, 80), (4, 4, 96, 128))
    (q,) = plan_shapes([], ((256, 256), (768, 768)), 1, "off", 64)
    assert q.opt_hw == (512, 512)  # midpoint, rounded to the multiple


@pytest.mark.parametrize("res,dyn,needle", [
    ([(510, 512)], None, "multiples of 8"),
    ([(0, 512)], None, "positive"),
    ([(-64, 512)], None, "positive"),
    ([(520, 512)], None, "multiples of 64"),
    ([(1024, 512)], ((256, 256), (768, 768)), "outside the dynamic range"),
    ([], ((768, 768), (256, 256)), "must not exceed"),
    ([], None, "no resolution"),
])
def test_bad_resolutions(res, dyn, needle):
    with pytest.raises(UserError, match=needle):
        plan_shapes(res, dyn, 1, "auto", 64)


def test_bad_batch_and_guidance():
    with pytest.raises(UserError, match="from 1 to 64"):
        unet_batch_range(0, "auto")
    with pytest.raises(UserError, match="from 1 to 64"):  # bounded: a build's shapes grow with it
        unet_batch_range(1_000_000, "auto")
    with pytest.raises(UserError, match="auto, on or off"):
        unet_batch_range(1, "sometimes")
    validate_resolution(64, 64, 64)
