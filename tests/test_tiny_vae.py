"""--vae-decoder: a tiny VAE decoder (AutoencoderTiny) exported, checked and built like every component; its
image equals diffusers' StableDiffusionPipeline with that AutoencoderTiny (latent scaling included); family
mismatches and bad sources are one-line errors (exit 2) before anything is loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import RESOLUTIONS, run_cli
from lcm_export.builder.build_engine import BuildOptions, build_engine
from lcm_export.sources.demo import build_demo_tiny_vae
from lcm_export.runtime import LCMPipeline
from lcm_export.sources.tiny_vae import decoder_identity, family_from_name, load_vae_decoder, resolve_vae_decoder
from lcm_export.builder.verify import diffusers_images, psnr, seeded_inputs


@pytest.fixture(scope="module")
def taesd_entry(tmp_path_factory, base_dir, demo_loras):
    """An fp32 ONNX Runtime entry of the tiny model + LoRAs decoding with demo:taesd, at two sizes."""
    d = tmp_path_factory.mktemp("taesd") / "tiny-taesd"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=RESOLUTIONS,
                              engine_dir=str(d), backend="onnxruntime", precision="fp32", vae_decoder="demo:taesd",
                              show_progress=False))
    return d


@pytest.fixture(scope="module")
def taesd_pipe(fused_pipe):
    """diffusers' own pipeline with the AutoencoderTiny, built independently of lcm-export's code."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=build_demo_tiny_vae("taesd"), text_encoder=fused_pipe.text_encoder,
                                   tokenizer=fused_pipe.tokenizer, unet=fused_pipe.unet, scheduler=fused_pipe.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_image_equals_diffusers_with_the_autoencoder_tiny(taesd_entry, taesd_pipe, fused_pipe, hw):
    runtime = LCMPipeline.from_engine_dir(taesd_entry)
    latents, noise = seeded_inputs(4, hw, steps=4, seed=5)
    ours = runtime("a red cube", height=hw[0], width=hw[1], latents=latents, step_noise=noise, output_type="np")
    ref = diffusers_images(taesd_pipe, "a red cube", 4, 1.0, latents, noise)
    assert ref.std() > 0.05  # the demo decoder's images have contrast: the comparison can fail
    assert psnr(ours, ref) >= 60
    # and it is not the base's VAE decoding the same latents
    assert psnr(ours, diffusers_images(fused_pipe, "a red cube", 4, 1.0, latents, noise)) < 20


def test_latent_scaling_is_diffusers(taesd_entry, taesd_pipe):
    """The decoder gets latents / the tiny decoder's scaling_factor (1.0), as diffusers feeds it; scaled by the
    base VAE's 0.18215 instead, the same latents decode far off (a check that can fail). (Divided by it, the
    random UNet's large latents would saturate the decoder's tanh clamp either way.)"""
    m = json.loads((taesd_entry / "manifest.json").read_text())
    assert m["vae"]["scaling_factor"] == taesd_pipe.vae.config.scaling_factor == 1.0
    assert m["vae"]["shift_factor"] is None and m["vae"]["latents_mean"] is None and m["vae"]["scale_factor"] == 8
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=6)
    final = diffusers_images(taesd_pipe, "a cat", 4, 1.0, latents, noise, output_type="latent")
    ref = diffusers_images(taesd_pipe, "a cat", 4, 1.0, latents, noise)
    vae = LCMPipeline.from_engine_dir(taesd_entry).engines["vae_decoder"]["*"]
    as_image = lambda z: np.clip(vae.run({"latent": np.ascontiguousarray(z, np.float32)}) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert psnr(as_image(final), ref) >= 60
    assert psnr(as_image(final * 0.18215), ref) < 20


def test_manifest_and_inspect_record_the_decoder(taesd_entry, capsys):
    m = json.loads((taesd_entry / "manifest.json").read_text())
    dec = m["vae_decoder"]
    assert dec["kind"] == "tiny" and dec["class"] == "AutoencoderTiny" and dec["source"] == "demo:taesd"
    assert dec["family"] == "sd15" and dec["family_from"] == "demo name" and len(dec["state_dict_sha256"]) == 64
    assert m["graph_inputs"]["vae_decoder"] == {"demo": "taesd", "class": "AutoencoderTiny"}
    assert m["weights_inputs"]["vae_decoder"]["demo"] == "taesd"
    vae = m["components"]["vae_decoder"]
    assert vae["precision"] == "fp32" and all(p["reference"] == "PyTorch fp64" and p["rel_l2"] <= p["limit"] for p in vae["parity"])
    assert {p["resolution"] for p in vae["parity"]} == {"64x64", "64x96"}
    fid = m["fidelity"]  # fp32: recorded, not gated; and what the tiny decoder trades against the base's VAE
    assert fid["gate"] is None and fid["image_psnr_db"] > 60 and fid["vs_full_vae"]["image_psnr_db"] < 20
    code, out, _ = run_cli(["inspect", taesd_entry], capsys)
    assert code == 0 and "tiny (AutoencoderTiny) demo:taesd  for sd15 latents (demo name)" in out
    assert "not gated" in out and "vs the base's own VAE decoder" in out


def test_the_decoder_is_part_of_the_keys(taesd_entry, base_dir, demo_loras):
    """Same inputs: up to date. Without the flag: another graph (a rebuild, not a refit)."""
    from lcm_export.builder.plan import refit_blocker

    opts = BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=RESOLUTIONS,
                        engine_dir=str(taesd_entry), backend="onnxruntime", precision="fp32", vae_decoder="demo:taesd",
                        show_progress=False)
    assert build_engine(opts).reused
    old = json.loads((taesd_entry / "manifest.json").read_text())
    gi = {k: v for k, v in old["graph_inputs"].items() if k != "vae_decoder"}
    why = refit_blocker(old, {"graph_key": "other"}, gi, old["weights_inputs"], opts)
    assert "tiny VAE decoder" in why
    wi = {**old["weights_inputs"], "vae_decoder": {"files": {"x.safetensors": "0" * 64}}}
    assert "tiny VAE decoder's weights changed" in refit_blocker(old, {"graph_key": old["graph_key"]}, old["graph_inputs"], wi, opts)


@pytest.mark.parametrize("name, family", [("madebyollin/taesd", "sd15"), ("madebyollin/taesdxl", "sdxl"),
                                          ("/models/TAESDXL/", "sdxl"), ("madebyollin/taesd3", "sd3"),
                                          ("madebyollin/taef1", "flux"), ("/models/my-decoder", None), ("taesd-v2", "sd15")])
def test_family_from_name(name, family):
    assert family_from_name(name) == family


def test_a_local_folder_loads_with_its_family_and_hash(tmp_path):
    vae = build_demo_tiny_vae("taesdxl")
    vae.save_pretrained(str(tmp_path / "taesdxl"), safe_serialization=True)
    src = resolve_vae_decoder(str(tmp_path / "taesdxl"), "ssd1b")  # SSD-1B uses SDXL's latents
    assert (src.kind, src.family, src.family_from) == ("local", "sdxl", "folder name")
    loaded = load_vae_decoder(src)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    assert list(decoder_identity(src)["files"]) == ["diffusion_pytorch_model.safetensors"]
    (tmp_path / "taesdxl").rename(tmp_path / "decoder")  # a name that says nothing: accepted, with a note
    from lcm_export.sources.tiny_vae import family_note

    src = resolve_vae_decoder(str(tmp_path / "decoder"), "sd15")
    assert src.family is None and "does not say which latents" in family_note(src, "sd15")


def _tiny_folder(path, cls="AutoencoderTiny", weights=True, **cfg):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": cls, "latent_channels": 4, **cfg}))
    if weights:
        (path / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    return path


def _bad_sources(tmp):
    tmp.mkdir(parents=True)
    (tmp / "taesd_decoder.pth").write_bytes(b"\0")
    (tmp / "empty-taesd").mkdir()
    (tmp / "broken-taesd").mkdir()
    (tmp / "broken-taesd" / "config.json").write_text("{not json")
    return [
        ("demo:nope", "unknown demo decoder; choose demo:taesd or demo:taesdxl"),
        ("demo:taesdxl", "demo:taesdxl decodes SDXL / SSD-1B latents but the base is SD 1.5 (sd15); use demo:taesd"),
        ("madebyollin/taesdxl", "decodes SDXL / SSD-1B latents but the base is SD 1.5 (sd15); use madebyollin/taesd"),
        ("madebyollin/taesd3", "decodes SD3 latents but the base is SD 1.5"),
        ("someone/tiny-decoder", "could not get it from the Hugging Face Hub or the local cache"),
        (tmp / "taesd_decoder.pth", "is a file (loading pickle files can run code)"),
        ("./no/such/taesd", "no such folder, and not a hub id"),
        ("", "give a hub id"),
        (tmp / "empty-taesd", "no config.json in"),
        (tmp / "broken-taesd", "cannot read"),
        (_tiny_folder(tmp / "kl-taesd", cls="AutoencoderKL"), "its config is a AutoencoderKL, not an AutoencoderTiny"),
        (_tiny_folder(tmp / "bin-taesd", weights=False), "no diffusion_pytorch_model.safetensors in"),
        (_tiny_folder(tmp / "wide-decoder", latent_channels=16), "decodes 16-channel latents but the base's UNet makes 4"),
    ]


def test_bad_vae_decoder_values_are_one_line_errors(base_dir, tmp_path, capsys):
    for value, msg in _bad_sources(tmp_path / "src"):
        d = tmp_path / "e"
        code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--backend", "onnxruntime",
                                "--vae-decoder", value, "--engine-dir", d, "--quiet"], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: --vae-decoder"), (value, err)
        assert msg in err, (value, err)
        assert not d.exists()


def test_sdxl_base_refuses_the_sd15_decoder(tmp_path, capsys):
    code, _, err = run_cli(["build-engine", "--base", "demo:sdxl", "--resolution", "64x64", "--vae-decoder", "demo:taesd",
                            "--engine-dir", tmp_path / "e", "--quiet"], capsys)
    assert code == 2 and "decodes SD 1.5 latents but the base is SDXL / SSD-1B (sdxl); use demo:taesdxl" in err
