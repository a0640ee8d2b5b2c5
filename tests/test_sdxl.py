"""SDXL and SSD-1B end to end on tiny seeded models: fusion vs independent math (both text
encoders, kohya SGM naming), family mismatches, ONNX vs PyTorch per component, and the lean
runtime vs diffusers' StableDiffusionXLPipeline at the same latents and step noise."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli

FAMILIES = ["sdxl", "ssd1b"]
# diffusers UNet module <-> SGM name, for the tiny SDXL layout (layers_per_block=2; down: plain, cross-attn;
# up: cross-attn, plain). Written by hand from the SGM layout.
SGM = {
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks.1.attentions.0.proj_in": "input_blocks_4_1_proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "middle_block_1_transformer_blocks_0_attn1_to_q",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks_0_0_skip_connection",
    "up_blocks.0.attentions.1.proj_out": "output_blocks_1_1_proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
}
TE1 = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"]
TE2 = ["text_model.encoder.layers.2.self_attn.out_proj", "text_model.encoder.layers.0.mlp.fc1"]
PEFT_UNET = ["down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v", "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2"]


def _mods(module):
    m = dict(module.named_modules())
    m.update({f"text_model.{k}": v for k, v in list(m.items()) if "text_model.encoder" not in m})
    return m


def _factors(mod, rank, gen):
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.2).contiguous()
    if isinstance(mod, torch.nn.Conv2d):
        return r(rank, mod.in_channels, *mod.kernel_size), r(mod.out_channels, rank, 1, 1)
    return r(rank, mod.in_features), r(mod.out_features, rank)


def _delta(a, b, scale, shape):
    return (scale * (b.double().flatten(1) @ a.double().flatten(1))).reshape(shape)


def _key(k, sd):
    return k if k in sd or not k.startswith("text_model.") else k[len("text_model."):]


@pytest.fixture(scope="module", params=FAMILIES)
def xl(request, tmp_path_factory):
    """(family, base folder, pipeline, {lora name: (path, {component: {module: delta}})})."""
    from lcm_export.sources.demo import build_demo_pipeline

    fam = request.param
    pipe = build_demo_pipeline(fam)
    d = tmp_path_factory.mktemp(fam)
    pipe.save_pretrained(str(d / "base"), safe_serialization=True)
    gen = torch.Generator().manual_seed(11)
    mods = {"unet": _mods(pipe.unet), "text_encoder": _mods(pipe.text_encoder), "text_encoder_2": _mods(pipe.text_encoder_2)}
    loras = {}
    # kohya: SGM-named UNet layers (LoCon convs included) + lora_te1_ + lora_te2_, alpha 3 != rank 4
    sd, deltas, rank, alpha = {}, {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}, 4, 3.0
    for comp, names, prefix in (("unet", SGM, "lora_unet_"), ("text_encoder", TE1, "lora_te1_"), ("text_encoder_2", TE2, "lora_te2_")):
        for name in names:
            a, b = _factors(mods[comp][name], rank, gen)
            key = prefix + (SGM[name] if comp == "unet" else name.replace(".", "_"))
            sd.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)})
            deltas[comp][name] = _delta(a, b, alpha / rank, mods[comp][name].weight.shape)
    save_file(sd, d / "kohya.safetensors")
    loras["kohya"] = (d / "kohya.safetensors", deltas)
    # PEFT with unet./text_encoder_2. prefixes and metadata: alpha 4 / r 2 -> scale 2
    sd, deltas, rank = {}, {"unet": {}, "text_encoder_2": {}}, 2
    for comp, names in (("unet", PEFT_UNET), ("text_encoder_2", TE2[:1])):
        for name in names:
            a, b = _factors(mods[comp][name], rank, gen)
            sd.update({f"{comp}.{name}.lora_A.weight": a, f"{comp}.{name}.lora_B.weight": b})
            deltas[comp][name] = _delta(a, b, 2.0, mods[comp][name].weight.shape)
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "unet.target_modules": ["to_v", "ff.net.2"],
            "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 4, "text_encoder_2.target_modules": ["out_proj"]}
    save_file(sd, d / "peft.safetensors", metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    loras["peft"] = (d / "peft.safetensors", deltas)
    return fam, d / "base", pipe, loras


WEIGHTS = (1.0, -0.5)


@pytest.fixture(scope="module")
def fused(xl, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from lcm_export.builder.fuse import LoraSpec, fuse

    fam, base, _, loras = xl
    out = tmp_path_factory.mktemp(f"{fam}-fused") / "model"
    rec = fuse(str(base), [LoraSpec(loras[n][0], w) for n, w in zip(("kohya", "peft"), WEIGHTS)], out, show_progress=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    return rec, out, pipe


def test_fused_weights_match_independent_math(xl, fused):
    from diffusers import StableDiffusionXLPipeline

    fam, base, _, loras = xl
    rec, out, pipe = fused
    assert rec["family"] == fam
    w0s = StableDiffusionXLPipeline.from_pretrained(str(base))
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        w0, w1 = getattr(w0s, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert list(w0) == list(w1)
        expected = {}
        for name, w in zip(("kohya", "peft"), WEIGHTS):
            for mod, d in loras[name][1].get(comp, {}).items():
                k = _key(mod + ".weight", w0)
                expected[k] = expected.get(k, 0) + w * d
        for k in w0:
            if k in expected:
                want = w0[k].double() + expected[k]
                assert ((w1[k].double() - want).norm() / want.norm()).item() <= 1e-6, f"{comp}.{k}"
            else:
                assert torch.equal(w0[k], w1[k]), f"{comp}.{k} changed"
    layers = {l["format"]: l["layers"] for l in rec["loras"]}
    assert layers["kohya-sgm+locon"] == {"unet": len(SGM), "text_encoder": 2, "text_encoder_2": 2}
    assert layers["peft"] == {"unet": 2, "text_encoder_2": 1}


def test_family_mismatch_is_refused(xl, tmp_path, capsys, base_dir, demo_loras):
    fam, base, _, loras = xl
    # an SD 1.5 LoRA on SDXL / SSD-1B
    code, _, err = run_cli(["fuse", "--base", base, "--lora", demo_loras[0][0], "--out", tmp_path / "a", "--quiet"], capsys)
    assert code == 2 and str(demo_loras[0][0]) in err and err.strip().count("\n") == 0
    # an SDXL LoRA (two text encoders) on SD 1.5
    code, _, err = run_cli(["fuse", "--base", base_dir, "--lora", loras["kohya"][0], "--out", tmp_path / "b", "--quiet"], capsys)
    assert code == 2 and str(loras["kohya"][0]) in err and err.strip().count("\n") == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def xl_engine(xl, tmp_path_factory):
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    fam, base, _, loras = xl
    d = tmp_path_factory.mktemp(f"{fam}-engine") / "e"
    build_engine(BuildOptions(base=str(base), loras=tuple(f"{loras[n][0]}:{w}" for n, w in zip(("kohya", "peft"), WEIGHTS)),
                              resolutions=((64, 64), (64, 96)), engine_dir=str(d), backend="onnxruntime", show_progress=False))
    return d


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_components_match_pytorch(xl_engine, fused, hw):
    _, _, pipe = fused
    m = json.loads((xl_engine / "manifest.json").read_text())
    assert m["text_encoders"] == ["text_encoder", "text_encoder_2"] and m["vae"]["force_upcast"]
    assert m["default_resolution"] == [1024, 1024] and m["force_zeros_for_empty_prompt"]
    s = lambda c: ort.InferenceSession(str(xl_engine / c / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        o1 = pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
        o2 = pipe.text_encoder_2(torch.from_numpy(ids), output_hidden_states=True)
    assert _rel(s("text_encoder").run(None, {"input_ids": ids.astype(np.int32)})[0], o1.hidden_states[-2].numpy()) <= 1e-4
    h2, pooled = s("text_encoder_2").run(None, {"input_ids": ids.astype(np.int32)})
    assert _rel(h2, o2.hidden_states[-2].numpy()) <= 1e-4 and _rel(pooled, o2.text_embeds.numpy()) <= 1e-4
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    t = np.array([999, 499], np.float32)
    e = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim), dtype=np.float32)
    te = rng.standard_normal((2, pipe.text_encoder_2.config.projection_dim), dtype=np.float32)
    tid = np.array([[hw[0], hw[1], 0, 0, hw[0], hw[1]]] * 2, np.float32)
    got = s("unet").run(None, {"sample": x, "timestep": t, "encoder_hidden_states": e, "text_embeds": te, "time_ids": tid})[0]
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(e),
                         added_cond_kwargs={"text_embeds": torch.from_numpy(te), "time_ids": torch.from_numpy(tid)}).sample.numpy()
    assert _rel(got, want) <= 1e-4
    z = rng.standard_normal((1, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    assert _rel(s("vae_decoder").run(None, {"latent": z})[0], want) <= 1e-4


@pytest.mark.parametrize("steps,guidance,negative", [(1, 1.0, None), (4, 1.0, None), (4, 8.0, None), (1, 8.0, "blurry"), (4, 8.0, "blurry")])
def test_runtime_matches_diffusers_sdxl(xl_engine, fused, steps, guidance, negative):
    import diffusers.schedulers.scheduling_lcm as lcm_mod
    from diffusers import LCMScheduler

    from lcm_export.runtime import LCMPipeline

    _, _, pipe = fused
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(3)
    hw = (64, 96)
    lat = rng.standard_normal((1, 4, hw[0] // 8, hw[1] // 8), dtype=np.float32)
    noise = [rng.standard_normal(lat.shape, dtype=np.float32) for _ in range(steps - 1)]
    ours = LCMPipeline.from_engine_dir(xl_engine)("an astronaut riding a horse", negative_prompt=negative, steps=steps,
                                                  guidance=guidance, height=hw[0], width=hw[1], latents=lat,
                                                  step_noise=noise, output_type="np")
    queue = [torch.from_numpy(n) for n in noise]
    orig = lcm_mod.randn_tensor
    lcm_mod.randn_tensor = lambda *a, **k: queue.pop(0)
    try:
        ref = pipe("an astronaut riding a horse", negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(lat), height=hw[0], width=hw[1], output_type="np").images
    finally:
        lcm_mod.randn_tensor = orig
    assert ref.std() > 0.02
    psnr = 10 * np.log10(1 / np.mean((ours.astype(np.float64) - ref) ** 2))
    assert psnr >= 40, f"PSNR {psnr:.1f} dB"


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_device_loop_carries_sdxl_added_conditioning(xl_engine, guidance):
    """The device loop (latents on the device; here a fake one on CPU, tests/fake_device.py) with SDXL's
    extra UNet inputs (pooled text embeddings, time ids) gives the host loop's image."""
    from fake_device import on_fake_device
    from lcm_export.runtime import LCMPipeline

    kw = dict(steps=4, guidance=guidance, seed=5, height=64, width=96, output_type="np")
    want = LCMPipeline.from_engine_dir(xl_engine)("an astronaut riding a horse", **kw)
    pipe = LCMPipeline.from_engine_dir(xl_engine)
    dev, log = on_fake_device(pipe)
    got = pipe("an astronaut riding a horse", **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [set(k for k, on in e.items() if on) for e in log["unet"]] == \
        [{"sample", "encoder_hidden_states", "text_embeds", "time_ids"}] * 4  # all on the device; timestep from the host
    assert dev.downloads == 1 and len(dev.uploads) == 3 + 3 + 4  # 3 feeds, latents + affine + flag, then 4 noises


def test_default_resolution_is_the_models_when_built(xl_engine):
    from lcm_export.runtime import LCMPipeline

    pipe = LCMPipeline.from_engine_dir(xl_engine)
    assert pipe._default_hw() == (64, 64)  # 1024x1024 was not built: the first built one
    pipe.manifest["resolutions"].append("1024x1024")
    pipe.resolutions.append((1024, 1024))
    assert pipe._default_hw() == (1024, 1024)
