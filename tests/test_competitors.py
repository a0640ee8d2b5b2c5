"""benchmarks/competitors*.py without the competitors' venvs: the LoRA files (layers, the spelling every reader
maps, diffusers and lcm-export accept them), the worker on a tiny lcm-export entry (cold-start stamp, stages,
one-line errors) and the report's medians and markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import competitors_loras as loras  # noqa: E402
import competitors_report as report  # noqa: E402


def test_loras_cover_attention_linears_and_1x1_convs(base_dir, tmp_path):
    from safetensors import safe_open

    from lcm_export.sources.lora import inspect_lora

    rec = loras.write_loras(base_dir, tmp_path)
    files = rec["files"]
    assert files["style_a"]["layers"] == files["style_b"]["layers"] == 60  # tiny demo: 6 transformer blocks x 10
    assert files["style_c_r64"]["layers"] > files["style_a"]["layers"]
    assert files["style_a"]["sha256"] != files["style_b"]["sha256"]
    with safe_open(files["style_c_r64"]["path"], "pt") as f:
        keys = list(f.keys())
        assert any("skip_connection" in k for k in keys) and not any("conv_shortcut" in k for k in keys)
        assert all(f.get_tensor(k).shape[0] == 64 for k in keys if k.endswith("lora_down.weight"))
        assert all(float(f.get_tensor(k)) == 64.0 for k in keys if k.endswith(".alpha"))  # alpha = rank: scale = λ
    info = inspect_lora(Path(files["style_a"]["path"]))
    assert info.format.startswith("kohya") and info.ranks == [8]
    again = loras.write_loras(base_dir, tmp_path / "again")  # seeded: byte-identical
    assert again["files"]["style_c_r64"]["sha256"] == files["style_c_r64"]["sha256"]


def test_loras_load_in_diffusers_every_layer(base_dir, tmp_path):
    from lcm_export.builder.fuse import load_lora, unload_loras
    from lcm_export.sources.lora import inspect_lora
    from lcm_export.sources.models import load_pipeline, resolve_base

    rec = loras.write_loras(base_dir, tmp_path)
    pipe = load_pipeline(resolve_base(str(base_dir)))
    for stem, f in rec["files"].items():
        touched = load_lora(pipe, inspect_lora(Path(f["path"])), stem)  # refuses a file with a layer left unmatched
        assert sum(len(v) for v in touched.values()) == f["layers"]
        unload_loras(pipe)


def _worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent))
    r = subprocess.run([sys.executable, str(BENCH / "competitors_worker.py"), json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_worker_times_an_lcm_entry(demo_engine):
    spec = {"kind": "lcm", "path": str(demo_engine), "threads": 1, "prompt": "a photo of a cat", "steps": 4, "guidance": 1.0,
            "seed": 0, "height": 64, "width": 64, "warmup": 1, "repeats": 2}
    res = _worker(spec)
    assert "error" not in res, res.get("error")
    assert res["first_done_at"] >= res["started_at"] and res["peak_rss_first_mb"] > 0
    assert len(res["images"]) == 2 and len(res["images"][0]["stages"]["unet_steps"]) == 4
    assert res["precision"]["entry"] == "fp32" and res["versions"]["numpy"]
    agg = report.aggregate_plain([res])
    assert agg["n_images"] == 2 and agg["unet_step_s"] > 0


def test_worker_error_is_one_line(tmp_path):
    res = _worker({"kind": "lcm", "path": str(tmp_path / "missing"), "threads": 1, "prompt": "x", "steps": 4, "guidance": 1.0,
                   "seed": 0, "height": 64, "width": 64, "warmup": 1, "repeats": 1})
    assert "\n" not in res["error"] and len(res["error"]) <= 400


def _img(s):
    return {"seconds": s, "stages": {"text_encoder": 0.01, "unet_steps": [s / 5] * 4, "vae_decoder": s / 10, "total": s}}


def test_report_medians_errors_and_markdown():
    ok = {"load_s": 1.0, "first_image_s": 2.0, "cold_start_s": 3.0, "peak_rss_first_mb": 2048.0, "peak_rss_mb": 2100.0,
          "images": [_img(1.0), _img(3.0)], "precision": {"entry": "bf16", "backend": "openvino", "unet": "bf16"}}
    agg = report.aggregate_plain([ok, {**ok, "images": [_img(2.0)]}])
    assert agg["image_s"] == 2.0 and agg["n_images"] == 3 and agg["cold_start_s"] == 3.0
    bad = report.aggregate_plain([{"error": "ImportError: no module named openvino_genai"}])
    row = {"label": "none → A", "setting": {"a": 0.8}, "ops": {}, "ops_s": 0.0, "first": _img(1.2), "warm": _img(1.0),
           "switch_s": 0.2, "image_vs_none": {"mean_abs": 0.7, "max_abs": 9}, "first_call_error": "RuntimeError: boom"}
    start = {**row, "label": "none (start)", "setting": {}, "switch_s": 0.0}
    ad = report.aggregate_adapters([{"load_s": 2.0, "cold_start_s": 4.0, "peak_rss_first_mb": 100.0, "passes": [[start, row]]}])
    assert ad["passes"][0][1]["first_call_errors"] == ["RuntimeError: boom"]
    rep = {"settings": {"resolution": "64x64", "prompt": "p", "steps": 4, "guidance": 1.0, "threads": 2, "rounds": 2, "warmup": 1,
                        "repeats": 2},
           "machine": {"cpu": "CPU", "flags_speed": ["avx512f"], "cores": 2, "memory_gib": 24},
           "model": {"base": "demo:sd15", "fused": "/f"}, "entries": {}, "prepare": {"fused": {"cached": True}},
           "plain": {"lcm-export default": agg, "genai-bf16": bad}, "adapters": {"genai-bf16 adapters": ad},
           "versions": {"/py": {"openvino": "2026.4.1", "executable": "/py"}}, "wall_s": 60.0}
    md = report.write_markdown(rep)
    assert "ImportError: no module named openvino_genai" in md and "| lcm-export default | bf16 entry" in md
    assert "+0.200 †" in md and "RuntimeError: boom" in md and "openvino 2026.4.1" in md


def test_adapter_rows_against_their_own_runtime_without_adapters():
    import competitors

    assert competitors.entry_shapes("quality", "auto") == "auto" and competitors.entry_shapes("q@dynamic", "auto") == "dynamic"
    assert competitors.entry_shapes("lcm@static", "dynamic") == "static"
    try:
        competitors.entry_shapes("q@fast", "auto")
        raise AssertionError("a suffix that is not a shapes mode must be refused")
    except SystemExit as exc:
        assert "auto, static or dynamic" in str(exc)
    plain = {"lcm-export fast": {"precision": {"entry": "int8", "vae_decoder": "taesd"}, "reference": ["taesd"], "unet_step_s": 0.1},
             "lcm-export quality": {"precision": {"entry": "bf16"}, "reference": ["vae"], "unet_step_s": 0.2},
             "genai-bf16": {"unet_step_s": 0.25}, "genai-fp32": {"error": "x"}}
    bf16 = {"precision": {"entry": "bf16"}}
    assert report.adapter_baseline("lcm-export adapters", bf16, plain) == "lcm-export quality"
    assert report.adapter_baseline("lcm-export adapters @dynamic", bf16, plain) == "lcm-export quality"
    assert report.adapter_baseline("lcm-export adapters", {"precision": {"entry": "fp32"}}, plain) is None
    both = {"lcm-export quality": {"precision": {"entry": "bf16", "shapes": "static"}, "reference": ["vae"]},
            "lcm-export quality@dynamic": {"precision": {"entry": "bf16", "shapes": "dynamic"}, "reference": ["vae"]}}
    dyn = {"precision": {"entry": "bf16", "shapes": "dynamic"}}
    assert report.adapter_baseline("lcm-export adapters @dynamic", dyn, both) == "lcm-export quality@dynamic"
    assert report.adapter_baseline("lcm-export adapters", {"precision": {"entry": "bf16", "shapes": "static"}}, both) == "lcm-export quality"
    assert report.adapter_baseline("genai-bf16 adapters", {}, plain) == "genai-bf16"
    assert report.adapter_baseline("genai-fp32 adapters", {}, plain) is None  # its plain run failed
    warm = lambda step: {"seconds": 1.0, "stages": {"unet_steps": [step] * 4}}  # noqa: E731
    rows = [{"label": lab, "setting": st, "ops": {}, "ops_s": 0.0, "first": warm(x), "warm": warm(x), "switch_s": 0.0,
             "image_vs_none": {"mean_abs": 0.5, "max_abs": 3}} for lab, st, x in (("none (start)", {}, 0.2), ("none → A", {"a": 0.8}, 0.23))]
    ad = report.aggregate_adapters([{"load_s": 1.0, "cold_start_s": 2.0, "peak_rss_first_mb": 10.0, "passes": [rows],
                                     "precision": {"entry": "bf16"}}])
    rep = {"settings": {"resolution": "64x64", "prompt": "p", "steps": 4, "guidance": 1.0, "threads": 2, "rounds": 1, "warmup": 1,
                        "repeats": 1},
           "machine": {"cpu": "CPU", "flags_speed": [], "cores": 2, "memory_gib": 24}, "model": {"base": "demo:sd15", "fused": "/f"},
           "entries": {}, "prepare": {}, "plain": {"lcm-export quality": {**report.aggregate_plain(
               [{"load_s": 1.0, "images": [warm(0.2)], "precision": {"entry": "bf16"}}]), "reference": ["vae"]}},
           "adapters": {"lcm-export adapters": ad}, "versions": {}, "wall_s": 1.0}
    md = report.write_markdown(rep)
    assert "lcm-export adapters → lcm-export quality" in md
    assert "| none | +0.0 % |" in md and "| A 0.8 | +15.0 % |" in md, md


# ----------------------------------------------------------------------------------------------
# stable-diffusion.cpp's single-file layout (competitors_sdcpp.py)

def test_sdcpp_checkpoint_maps_every_weight_once_and_back(base_dir, tmp_path):
    """Every UNet / VAE / text-encoder weight of the tiny demo lands on exactly one original-layout key, and
    diffusers' own single-file reader maps the file back to the same tensors."""
    import numpy as np
    import torch
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.numpy import load_file

    import competitors_sdcpp as sdcpp

    rec = sdcpp.convert(base_dir, tmp_path / "model.safetensors")
    ckpt = load_file(str(tmp_path / "model.safetensors"))
    n = {}
    for comp, weights, prefix in (("unet", "diffusion_pytorch_model", sdcpp.UNET_PREFIX),
                                  ("vae", "diffusion_pytorch_model", sdcpp.VAE_PREFIX), ("text_encoder", "model", sdcpp.TEXT_PREFIX)):
        n[comp] = len(load_file(str(base_dir / comp / f"{weights}.safetensors")))
        assert rec["by_part"][prefix] == n[comp]
    assert rec["tensors"] == len(ckpt) == sum(n.values())  # one key per weight, none lost, none doubled
    assert any(k.startswith("model.diffusion_model.output_blocks.") and ".1.transformer_blocks." in k for k in ckpt)
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in ckpt and ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4

    t = {k: torch.from_numpy(v) for k, v in ckpt.items()}
    for comp, back in (("unet", sfu.convert_ldm_unet_checkpoint(t, json.loads((base_dir / "unet" / "config.json").read_text()))),
                       ("vae", sfu.convert_ldm_vae_checkpoint(t, json.loads((base_dir / "vae" / "config.json").read_text())))):
        orig = load_file(str(base_dir / comp / "diffusion_pytorch_model.safetensors"))
        assert set(back) == set(orig), (comp, sorted(set(back) ^ set(orig))[:5])
        for k, v in orig.items():
            np.testing.assert_array_equal(back[k].numpy().reshape(v.shape), v, err_msg=f"{comp} {k}")
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in ckpt  # sd.cpp's SD 1.x test
    text = {k[len(sdcpp.TEXT_PREFIX):]: v for k, v in ckpt.items() if k.startswith(sdcpp.TEXT_PREFIX)}
    orig = load_file(str(base_dir / "text_encoder" / "model.safetensors"))
    assert {k.removeprefix("text_model.") for k in text} == {k.removeprefix("text_model.") for k in orig}
    back = sfu.convert_ldm_clip_checkpoint(t)  # diffusers' reader: the CLIPTextModel keys with text_model.
    assert {k.removeprefix("text_model.") for k in back} >= {k.removeprefix("text_model.") for k in orig}


def test_sdcpp_unet_prefixes_match_sd15():
    """The level / index arithmetic gives SD 1.5's well-known numbering."""
    import competitors_sdcpp as sdcpp

    cfg = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}
    p = dict((hf, sd) for sd, hf in sdcpp.unet_prefixes(cfg))
    assert p["down_blocks.0.downsamplers.0.conv."] == "input_blocks.3.0.op."
    assert p["down_blocks.3.resnets.1."] == "input_blocks.11.0."
    assert p["up_blocks.0.upsamplers.0."] == "output_blocks.2.1."
    assert p["up_blocks.1.upsamplers.0."] == "output_blocks.5.2."
    assert p["up_blocks.3.attentions.2."] == "output_blocks.11.1."
    assert "down_blocks.3.attentions.0." not in p


def test_swap_decoder_hard_links_and_marks_the_tiny_decoder(tmp_path):
    """The TAESD variant of an IR folder: every other file hard-linked (no disk), no VAE encoder, the decoder's
    config keeps the VAE's fields with scaling_factor 1.0 and says it is tiny (the worker reports it)."""
    import competitors
    import competitors_prep as prep
    import competitors_worker as worker

    ir, tiny = tmp_path / "ir", tmp_path / "taesd-ir"
    for d, files in ((ir / "unet", ("openvino_model.xml", "openvino_model.bin")), (ir / "vae_encoder", ("openvino_model.bin",)),
                     (ir / "vae_decoder", ("openvino_model.bin",)), (tiny, ("openvino_model.xml", "openvino_model.bin"))):
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_bytes(b"x" * 100)
    (ir / "model_index.json").write_text("{}")
    (ir / "vae_decoder" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215}))
    (tiny / "config.json").write_text(json.dumps({"tiny_decoder": "/some/taesd"}))
    out = tmp_path / "ir-taesd"
    prep.swap_decoder(ir, tiny, out)
    assert not (out / "vae_encoder").exists()
    assert (out / "unet" / "openvino_model.bin").stat().st_ino == (ir / "unet" / "openvino_model.bin").stat().st_ino
    assert (out / "vae_decoder" / "openvino_model.bin").stat().st_ino == (tiny / "openvino_model.bin").stat().st_ino
    cfg = json.loads((out / "vae_decoder" / "config.json").read_text())
    assert cfg["scaling_factor"] == 1.0 and cfg["block_out_channels"] == [128, 256, 512, 512]
    assert worker._decoder_kind(str(out / "vae_decoder" / "config.json")) == "taesd"
    assert worker._decoder_kind(str(ir / "vae_decoder" / "config.json")) == "vae"
    # vae_encoder not counted: no text-to-image path reads it
    assert competitors.disk_bytes(ir) == 3 * 100 + 2 + len((ir / "vae_decoder" / "config.json").read_text())


def test_image_checks_against_the_reference_of_each_decoder(tmp_path):
    import numpy as np

    import competitors

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "reference-taesd.npy", ref)
    np.save(tmp_path / "same.npy", ref)
    np.save(tmp_path / "off.npy", np.clip(ref.astype(int) + 8, 0, 255).astype(np.uint8))
    jobs = [{"name": "same", "reference": ["taesd", "sdcpp-f32-taesd"], "spec": {"image_out": str(tmp_path / "same.npy")}},
            {"name": "off", "reference": ["taesd"], "spec": {"image_out": str(tmp_path / "off.npy")}},
            {"name": "vae", "reference": ["vae"], "spec": {"image_out": str(tmp_path / "same.npy")}},
            {"name": "none", "reference": ["taesd"], "spec": {}}]
    out = competitors.image_checks(jobs, tmp_path)
    assert out["same"] == [{"vs": out["same"][0]["vs"], "psnr_db": float("inf"), "ssim": 1.0}]  # no sd.cpp f32 image: left out
    assert 29 < out["off"][0]["psnr_db"] < 31 and out["off"][0]["ssim"] < 1.0
    assert out["vae"] == [] and "none" not in out
    md = report.check_str(out["off"])
    assert md.endswith("(b)") and md.startswith(f"{out['off'][0]['psnr_db']:.1f} / ")


def test_sdcpp_log_lines_give_stage_times():
    """The worker reads sd.cpp's stage times from its log lines (the format of its LOG_INFO calls)."""
    import competitors_worker as worker

    assert set(worker.SdcppRunner.LOG_KEYS.values()) == {"text_encoder", "sampling", "vae_decoder"}
    for line in ("[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.12s",
                 "[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 4.56s",
                 "[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 0.30s"):
        m = worker.SdcppRunner.LOG_PATTERN.search(line)
        assert m and float(m.group(2)) > 0


def test_worker_lcm_takes_the_reference_noise(demo_engine, tmp_path):
    """With ``noise`` (the reference's arrays) the image no longer depends on the seed: the image check compares
    like with like."""
    import numpy as np

    rng = np.random.default_rng(5)
    np.savez(tmp_path / "noise.npz", **{f"noise_{i}": rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for i in range(4)})
    imgs = []
    for seed in (0, 1):
        spec = {"kind": "lcm", "path": str(demo_engine), "threads": 1, "prompt": "a photo of a cat", "steps": 4, "guidance": 1.0,
                "seed": seed, "height": 64, "width": 64, "warmup": 1, "repeats": 0, "noise": str(tmp_path / "noise.npz"),
                "image_out": str(tmp_path / f"img{seed}.npy")}
        res = _worker(spec)
        assert "error" not in res, res.get("error")
        imgs.append(np.load(tmp_path / f"img{seed}.npy"))
    assert imgs[0].shape == (64, 64, 3) and np.array_equal(imgs[0], imgs[1])
