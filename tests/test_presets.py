"""--preset quality|fast: the pure resolution on CPUs with and without int8 dot products / native bf16, on a
GPU, with explicit flags; what build-engine makes of it (without building); bad values."""

from __future__ import annotations

import pytest

from conftest import needs_openvino, run_cli
from lcm_export.errors import UserError
from lcm_export.builder.presets import PRESETS, TRADES, resolve_preset

# (int8 pays, cpu_bf16) of CPUs we know: Sapphire Rapids (AMX), AMD Zen 4 (AVX512_VNNI + AVX512_BF16),
# Cascade Lake (AVX512_VNNI, no bf16), Alder Lake (AVX_VNNI, no AVX-512), Zen 3 (AVX2 only: int8 measured faster
# than fp32, issue 29), Skylake-X (AVX-512 without VNNI: not measured, int8 not picked)
CPUS = {"sapphire-rapids": (True, True), "zen4": (True, True), "cascade-lake": (True, False),
        "alder-lake": (True, False), "zen3": (True, False), "skylake-x": (False, False)}


def _fast(cpu, **kw):
    int8, bf16 = CPUS[cpu]
    args = dict(preset="fast", precision="auto", vae_decoder=None, family="sd15", demo=False, device="cpu",
                cpu_int8=int8, int8_builder=True, cpu_bf16=bf16)
    args.update(kw)
    return resolve_preset(**args)


@pytest.mark.parametrize("cpu", ["sapphire-rapids", "zen4", "cascade-lake", "alder-lake", "zen3"])
def test_fast_is_int8_and_taesd_where_int8_pays(cpu):
    c = _fast(cpu)
    assert (c.precision, c.vae_decoder, c.notes) == ("int8", "madebyollin/taesd", ())


def test_fast_without_int8_falls_back_in_one_line():
    c = _fast("skylake-x")
    assert c.precision == "auto" and c.vae_decoder == "madebyollin/taesd"
    assert len(c.notes) == 1 and "not been measured faster" in c.notes[0] and "fp32 instead of int8" in c.notes[0]
    assert "\n" not in c.notes[0]
    c = _fast("skylake-x", cpu_bf16=True)  # a bf16 CPU without VNNI (none known, but the note must follow the flags)
    assert "bf16 instead of int8" in c.notes[0]


def test_fast_without_an_int8_backend_or_on_a_gpu():
    c = _fast("zen4", int8_builder=False)
    assert c.precision == "auto" and "no usable backend here builds int8" in c.notes[0]
    c = _fast("zen4", device="cuda")
    assert c.precision == "auto" and "int8 is a CPU option" in c.notes[0] and c.vae_decoder == "madebyollin/taesd"


@pytest.mark.parametrize("family, demo, want", [("sd15", False, "madebyollin/taesd"), ("sdxl", False, "madebyollin/taesdxl"),
                                                ("ssd1b", False, "madebyollin/taesdxl"), ("sd15", True, "demo:taesd"),
                                                ("sdxl", True, "demo:taesdxl"), ("ssd1b", True, "demo:taesdxl")])
def test_fast_decoder_per_family(family, demo, want):
    assert _fast("zen4", family=family, demo=demo).vae_decoder == want


def test_explicit_flags_win_over_the_preset():
    c = _fast("zen4", precision="bf16", vae_decoder="/models/my-taesd")
    assert (c.precision, c.vae_decoder) == ("bf16", "/models/my-taesd")
    assert "--precision bf16 given" in c.notes[0]
    c = _fast("zen4", precision="int8")
    assert c.precision == "int8" and c.notes == ()


@pytest.mark.parametrize("cpu", list(CPUS))
def test_quality_is_todays_default_everywhere(cpu):
    int8, bf16 = CPUS[cpu]
    c = resolve_preset("quality", "auto", None, "sd15", False, "cpu", int8, True, bf16)
    assert (c.precision, c.vae_decoder, c.notes) == ("auto", None, ())
    c = resolve_preset("quality", "fp32", "demo:taesd", "sd15", True, "cpu", int8, True, bf16)
    assert (c.precision, c.vae_decoder) == ("fp32", "demo:taesd")


def test_unknown_preset_is_one_line():
    with pytest.raises(UserError, match=r"--preset 'turbo': choose quality or fast"):
        resolve_preset("turbo", "auto", None, "sd15", False, "cpu", True, True, True)
    assert set(TRADES) == set(PRESETS)


@needs_openvino
@pytest.mark.parametrize("int8, bf16, want", [(True, True, "int8"), (False, True, "auto"), (False, False, "auto")])
def test_build_engine_applies_the_preset_with_this_machines_flags(monkeypatch, int8, bf16, want):
    """build_engine's step before anything loads: the CPU flags (mocked) decide; a demo base gets demo:taesd."""
    from lcm_export import _cpu
    from lcm_export.builder.plan import BuildOptions, _apply_preset

    monkeypatch.setattr(_cpu, "int8_pays", lambda flags=None: int8)
    monkeypatch.setattr(_cpu, "native_bf16", lambda flags=None: bf16)
    opts, notes = _apply_preset(BuildOptions(preset="fast", backend="openvino"), "sd15", demo=True)
    assert opts.precision == want and opts.vae_decoder == "demo:taesd"
    assert bool(notes) == (want != "int8")
    opts, notes = _apply_preset(BuildOptions(preset="fast", backend="onnxruntime"), "sd15", demo=True)
    assert opts.precision == "auto" and opts.vae_decoder == "demo:taesd"
    assert ("no usable backend here builds int8" if int8 else "not been measured faster") in notes[0]


def test_bad_preset_on_the_command_line(capsys, tmp_path):
    code, _, err = run_cli(["build-engine", "--preset", "turbo", "--engine-dir", tmp_path / "e"], capsys)
    assert code == 2 and "invalid choice: 'turbo'" in err and not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def fast_entry(tmp_path_factory, cache_env):
    """`build-engine --preset fast` on the default demo (demo:sd15 + its two LoRAs), through the CLI."""
    from lcm_export.backends.openvino import status

    if not status()[0]:
        pytest.skip(status()[2])
    d = tmp_path_factory.mktemp("fast") / "demo-fast"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lcm_export.cli", "build-engine", "--preset", "fast", "--resolution", "64x64",
                        "--engine-dir", str(d), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return d, r.stdout


def test_fast_preset_entry(fast_entry, capsys):
    """int8 UNet (where int8 pays on this CPU class) + demo:taesd; the preset, the decoder and the image
    figures (against diffusers with the same decoder, and against the base's own VAE) recorded and shown."""
    import json

    from lcm_export._cpu import int8_pays, native_bf16
    from lcm_export.builder.verify import INT8_IMAGE_GATE

    d, out = fast_entry
    m = json.loads((d / "manifest.json").read_text())
    unet = "int8" if int8_pays() else ("bf16" if native_bf16() else "fp32")
    assert m["precision"] == unet and m["components"]["unet"]["precision"] == unet
    assert m["vae_decoder"]["source"] == "demo:taesd" and m["preset"]["name"] == "fast"
    assert m["preset"]["trades"] == TRADES["fast"] and m["graph_inputs"]["preset"] == "fast"
    fid = m["fidelity"]
    assert "vs_full_vae" in fid and fid["reference"].startswith("diffusers PyTorch fp32, same fused weights, VAE decoder")
    if unet == "int8":
        assert fid["image_psnr_db"] >= INT8_IMAGE_GATE["psnr_db"] and fid["image_ssim"] >= INT8_IMAGE_GATE["ssim"]
    assert "tiny VAE decoder demo:taesd" in out and "image check at 64x64" in out
    code, shown, _ = run_cli(["inspect", d], capsys)
    assert code == 0 and "preset       fast: speed for quality" in shown and "vae decoder  tiny (AutoencoderTiny) demo:taesd" in shown
    assert "random weights: these figures compare noise images" in shown


def test_fast_preset_image_against_diffusers_with_the_tiny_decoder(fast_entry):
    """Independently of the build's check: the fast entry's image against diffusers' StableDiffusionPipeline
    fp32 with the same fused weights and an AutoencoderTiny, other prompt and seed."""
    from diffusers import StableDiffusionPipeline

    from lcm_export.builder.plan import resolve_loras
    from lcm_export.sources.demo import build_demo_pipeline, build_demo_tiny_vae
    from lcm_export.builder.fuse import fuse_into
    from lcm_export.sources.models import resolve_base
    from lcm_export.runtime import LCMPipeline
    from lcm_export.builder.verify import INT8_IMAGE_GATE, diffusers_images, psnr, seeded_inputs, ssim
    from lcm_export.builder.build_engine import BuildOptions

    d, _ = fast_entry
    pipe = build_demo_pipeline("sd15")
    fuse_into(pipe, resolve_loras(BuildOptions(), resolve_base("demo:sd15"), True))
    ref_pipe = StableDiffusionPipeline(vae=build_demo_tiny_vae("taesd"), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                       unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=21)
    ours = LCMPipeline.from_engine_dir(d)("a green tree", latents=latents, step_noise=noise, output_type="np")
    ref = diffusers_images(ref_pipe, "a green tree", 4, 1.0, latents, noise)
    assert psnr(ours, ref) >= INT8_IMAGE_GATE["psnr_db"] and ssim(ours, ref) >= INT8_IMAGE_GATE["ssim"]


def test_fast_with_adapters_keeps_the_auto_precision():
    pc = resolve_preset("fast", "auto", None, "sd15", True, "cpu", True, True, True, adapters=True)
    assert pc.precision == "auto" and pc.vae_decoder == "demo:taesd" and "takes no run-time adapters" in pc.notes[0]
    assert resolve_preset("fast", "auto", None, "sd15", True, "cpu", True, True, True).precision == "int8"
