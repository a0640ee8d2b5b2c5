"""An OpenVINO entry is also an OpenVINO GenAI model folder: ``openvino_genai.Text2ImagePipeline(entry, "CPU")``
opens it as it is and draws the image our runtime draws from the same noise (docs/genai.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import OV_OK, OV_WHY
from lcm_export.builder.verify import IMAGE_GATES, diffusers_images, psnr, seeded_inputs, ssim
from lcm_export.runtime import LCMPipeline
from lcm_export.store.manifest import entry_files, read_manifest

try:
    import openvino_genai as og
    GENAI_WHY = None
except Exception as exc:  # noqa: BLE001 - not installed, or built for another OpenVINO (it raises on import)
    og, GENAI_WHY = None, f"openvino-genai is not importable ({type(exc).__name__}: {exc}); pip install 'lcm-export[build]'"

pytestmark = [pytest.mark.skipif(not OV_OK, reason=f"needs OpenVINO: {OV_WHY}"),
              pytest.mark.skipif(og is None, reason=GENAI_WHY or "")]

PROMPT = "a photo of an astronaut riding a horse"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
"""GenAI compiles with OpenVINO's defaults: bf16 on CPUs with native bf16. An fp32 entry is compared at f32."""


def _draws(latents, noise):
    """An ``openvino_genai.Generator`` that hands out ``latents`` then each step's noise: the draws our runtime
    takes as ``latents=`` / ``step_noise=`` (GenAI draws the initial latents, then one tensor per LCM step but
    the last, as diffusers does)."""
    import openvino as ov

    class Draws(og.Generator):
        def __init__(self):
            og.Generator.__init__(self)
            self.queue = [latents, *noise]

        def randn_tensor(self, shape):
            arr = self.queue.pop(0)
            assert tuple(shape) == arr.shape, (tuple(shape), arr.shape)
            return ov.Tensor(np.ascontiguousarray(arr))

    return Draws()


def _genai_image(pipe, latents, noise, guidance, hw=(64, 64)):
    img = pipe.generate(PROMPT, height=hw[0], width=hw[1], num_inference_steps=4, guidance_scale=guidance,
                        generator=_draws(latents, noise))
    return np.asarray(img.data)[0]  # uint8 HWC


def test_entry_is_a_genai_folder(ov_engine):
    """The layout GenAI reads, recorded in the manifest so the store's file checks cover it; the IR is the one copy
    of each weight (no second .bin); the UNet's timestep is i64 in the IR, as GenAI feeds it."""
    import openvino as ov

    m = read_manifest(ov_engine)
    genai = m["genai"]
    assert genai["pipeline"] == "LatentConsistencyModelPipeline"
    index = json.loads((ov_engine / "model_index.json").read_text())
    assert index["_class_name"] == genai["pipeline"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for comp in ("text_encoder", "unet", "vae_decoder"):
        assert f"{comp}/config.json" in genai["files"]
        assert m["components"][comp]["engines"]["*"] == f"{comp}/openvino_model.xml"
    assert set(genai["files"]) <= set(entry_files(m)) and set(genai["files"]) <= set(m["file_sizes"])
    assert {"tokenizer/openvino_tokenizer.xml", "tokenizer/openvino_detokenizer.xml"} <= set(genai["files"])
    bins = sorted(p.relative_to(ov_engine).as_posix() for p in ov_engine.rglob("*.bin"))
    assert bins == ["text_encoder/openvino_model.bin", "tokenizer/openvino_detokenizer.bin", "tokenizer/openvino_tokenizer.bin",
                    "unet/openvino_model.bin", "vae_decoder/openvino_model.bin"]
    unet = ov.Core().read_model(str(ov_engine / "unet" / "openvino_model.xml"))
    types = {i.get_any_name(): i.get_element_type() for i in unet.inputs}
    assert types["timestep"] == ov.Type.i64 and types["sample"] == ov.Type.f32


def test_tokenizer_matches_ours(ov_engine):
    """The converted tokenizer gives our runtime's token ids. A prompt over 75 words' tokens: GenAI's pipeline
    encodes without truncation and keeps the first 77 ids (clip_text_model.cpp), so the 77th is a word where
    ours (and diffusers) end with the end token: the one known difference (docs/genai.md)."""
    tok = og.Tokenizer(str(ov_engine / "tokenizer"))
    ours = LCMPipeline.from_engine_dir(ov_engine).tokenizers["tokenizer"]
    short = np.asarray(tok.encode(PROMPT).input_ids.data)[0]
    want = np.asarray(ours([PROMPT]))[0]
    assert list(short) == list(want[:len(short)]) and len(short) < 77
    long = " ".join(["horse"] * 120)
    ids = np.asarray(tok.encode(long).input_ids.data)[0][:77]  # what the pipeline copies into the encoder's input
    want = np.asarray(ours([long]))[0]
    assert list(ids[:76]) == list(want[:76]) and want[76] != ids[76]


@pytest.mark.parametrize("guidance", [1.0, 8.5])  # 8.5: GenAI's default for this pipeline class (CFG, UNet at batch 2)
def test_same_image_as_our_runtime(ov_engine, guidance):
    """Same noise draws, fp32 both: GenAI's image is ours up to its 8-bit conversion (GenAI truncates, we round):
    every pixel equals floor(ours * 255) or is one level off it."""
    pipe = og.Text2ImagePipeline(str(ov_engine), "CPU", **F32)
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=3)
    got = _genai_image(pipe, latents, noise, guidance).astype(np.float64)
    ours = LCMPipeline.from_engine_dir(ov_engine)(PROMPT, steps=4, guidance=guidance, latents=latents, step_noise=noise,
                                                  output_type="np")[0].astype(np.float64)
    off = np.abs(got - np.floor(ours * 255))
    assert off.max() <= 1 and np.mean(off == 0) > 0.999, (off.max(), np.mean(off == 0))
    assert psnr(got / 255, ours) > 50  # the truncation alone: ~52.9 dB


def test_same_seed_path(ov_engine):
    """GenAI's own seeded generator (``TorchGenerator``: torch's CPU normal draws) against our runtime fed the same
    draws from torch: the same image, as above."""
    import torch

    pipe = og.Text2ImagePipeline(str(ov_engine), "CPU", **F32)
    ours = LCMPipeline.from_engine_dir(ov_engine)
    for seed in (0, 7):
        gen = torch.Generator().manual_seed(seed)
        latents, *noise = (torch.randn((1, 4, 8, 8), generator=gen).numpy() for _ in range(4))
        got = np.asarray(pipe.generate(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                                       generator=og.TorchGenerator(seed)).data)[0].astype(np.float64)
        want = ours(PROMPT, steps=4, guidance=1.0, latents=latents, step_noise=noise, output_type="np")[0]
        assert np.abs(got - np.floor(want * 255)).max() <= 1, seed


def test_default_properties_against_pytorch(ov_engine, fused_pipe):
    """GenAI with no properties (bf16 on CPUs with native bf16): each image against PyTorch fp32 (diffusers, same
    noise), through the image gate a bf16 entry passes."""
    pipe = og.Text2ImagePipeline(str(ov_engine), "CPU")
    cfg = pipe.get_generation_config()
    assert cfg.num_inference_steps == 4  # the LCM pipeline class's default
    sched = json.loads((ov_engine / "scheduler" / "scheduler_config.json").read_text())
    for guidance in (1.0, cfg.guidance_scale):
        latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=5)
        got = _genai_image(pipe, latents, noise, guidance) / 255.0
        ref = diffusers_images(fused_pipe, PROMPT, 4, guidance, latents, noise, sched)[0]
        assert psnr(got, ref) >= IMAGE_GATES["bf16"]["psnr_db"], (guidance, psnr(got, ref), ssim(got, ref))


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory, base_dir, demo_loras):
    """An int8 entry (NNCF-quantized UNet, the rest bf16 where the CPU has it) of the same model."""
    from lcm_export._cpu import int8_pays
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    if not int8_pays():
        pytest.skip("int8 is not measured on this CPU class (AVX-512 without VNNI, or no AVX2): int8 builds are refused here")
    d = tmp_path_factory.mktemp("genai") / "tiny-int8"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=((64, 64),),
                              engine_dir=str(d), backend="openvino", precision="int8", show_progress=False))
    return d


def test_int8_entry(int8_engine, fused_pipe):
    """The int8 UNet's IR (FakeQuantize nodes) runs in GenAI with its default properties: its image against our
    runtime's from the same draws, and against PyTorch fp32 through the int8 image gate."""
    assert read_manifest(int8_engine)["components"]["unet"]["precision"] == "int8"
    pipe = og.Text2ImagePipeline(str(int8_engine), "CPU")
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=5)
    got = _genai_image(pipe, latents, noise, 1.0) / 255.0
    ours = LCMPipeline.from_engine_dir(int8_engine)(PROMPT, steps=4, guidance=1.0, latents=latents, step_noise=noise,
                                                    output_type="np")[0]
    sched = json.loads((int8_engine / "scheduler" / "scheduler_config.json").read_text())
    ref = diffusers_images(fused_pipe, PROMPT, 4, 1.0, latents, noise, sched)[0]
    gate = IMAGE_GATES["int8"]
    figures = (psnr(got, ours), psnr(got, ref), ssim(got, ref), psnr(ours, ref))
    assert psnr(got, ours) >= IMAGE_GATES["bf16"]["psnr_db"], figures
    assert psnr(got, ref) >= gate["psnr_db"] and ssim(got, ref) >= gate["ssim"], figures


@pytest.fixture(scope="module")
def fast_engine(tmp_path_factory, base_dir, demo_loras):
    """`--preset fast`: the int8 UNet where int8 pays on this CPU class (else the auto precision) + demo:taesd (the
    base is a local folder of the demo, for which fast would pick the hub's TAESD)."""
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    d = tmp_path_factory.mktemp("genai") / "tiny-fast"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=((64, 64),),
                              engine_dir=str(d), backend="openvino", preset="fast", vae_decoder="demo:taesd",
                              show_progress=False))
    return d


def test_fast_entry_with_a_tiny_decoder(fast_engine):
    """A tiny-decoder entry is a GenAI folder too: its decoder's config in AutoencoderKL's shape (scale 1.0, ×8),
    and GenAI's image (default properties, as our runtime compiles) is ours from the same draws."""
    m = read_manifest(fast_engine)
    assert m["vae_decoder"]["class"] == "AutoencoderTiny" and m["genai"]["pipeline"] == "LatentConsistencyModelPipeline"
    cfg = json.loads((fast_engine / "vae_decoder" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["tiny_decoder"]["_class_name"] == "AutoencoderTiny"
    assert cfg["scaling_factor"] == m["vae"]["scaling_factor"] == 1.0 and cfg["shift_factor"] is None
    assert 2 ** (len(cfg["block_out_channels"]) - 1) == 8  # GenAI's latent-to-image factor
    pipe = og.Text2ImagePipeline(str(fast_engine), "CPU")
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=3)
    got = _genai_image(pipe, latents, noise, 1.0) / 255.0
    ours = LCMPipeline.from_engine_dir(fast_engine)(PROMPT, steps=4, guidance=1.0, latents=latents, step_noise=noise,
                                                    output_type="np")[0]
    assert psnr(got, ours) >= 45, psnr(got, ours)  # measured 58.1 dB on an AMX Xeon; with scaling_factor 0.18215 in the config: 23.3 dB
