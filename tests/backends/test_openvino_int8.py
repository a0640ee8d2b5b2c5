"""int8 UNet entries (OpenVINO + NNCF) of the tiny demo: really quantized, within their image gate against
diffusers PyTorch fp32, recorded (scheme, calibration, PSNR, SSIM) and shown by inspect; refused on CPUs
without int8 dot products; refit re-quantizes; the lean runtime runs them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import OV_OK, OV_WHY, PY, run_cli
from lcm_export.store.manifest import refit_source_dir
from lcm_export._cpu import int8_pays, native_bf16
from lcm_export.builder.build_engine import BuildOptions, build_engine
from lcm_export.runtime import LCMPipeline
from lcm_export.builder.verify import INT8_IMAGE_GATE, diffusers_images, psnr, seeded_inputs, ssim

nncf = pytest.importorskip("nncf", reason="int8 builds need NNCF (the [build] extra)")
needs_int8 = pytest.mark.skipif(not int8_pays(), reason="int8 is not measured on this CPU class (AVX-512 without VNNI, or no AVX2): int8 builds are refused here")
HW = (64, 64)


@pytest.fixture(scope="module")
def ov_int8(tmp_path_factory, base_dir, demo_loras):
    if not OV_OK:
        pytest.skip(f"needs OpenVINO: {OV_WHY}")
    if not int8_pays():
        pytest.skip("int8 is not measured on this CPU class (AVX-512 without VNNI, or no AVX2): int8 builds are refused here")
    d = tmp_path_factory.mktemp("ov") / "ov-int8"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=(HW,),
                              engine_dir=str(d), backend="openvino", precision="int8", show_progress=False))
    return d


def _op_types(xml) -> dict:
    types = re.findall(r'<layer [^>]*type="([A-Za-z0-9]+)"', xml.read_text())
    return {t: types.count(t) for t in set(types)}


def test_manifest_records_the_scheme_calibration_and_image_figures(ov_int8):
    from lcm_export.backends.openvino import DEFAULT_INT8_SCHEME

    m = json.loads((ov_int8 / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["graph_inputs"]["int8"]["scheme"] == DEFAULT_INT8_SCHEME
    other = "bf16" if native_bf16() else "fp32"
    assert {c: r["precision"] for c, r in m["components"].items()} == {"text_encoder": other, "unet": "int8", "vae_decoder": other}
    q = m["components"]["unet"]["quantization"]
    assert q["scheme"] == DEFAULT_INT8_SCHEME and q["tool"] == f"nncf {nncf.__version__}" and q["fake_quantize_nodes"] > 0
    assert q["calibration"]["samples"] == 32 and q["calibration"]["resolution"] == "64x64"
    assert m["components"]["unet"]["inference_precision"] == other
    fid = m["fidelity"]
    assert fid["gate_db"] == INT8_IMAGE_GATE["psnr_db"] and fid["gate_ssim"] == INT8_IMAGE_GATE["ssim"]
    assert fid["image_psnr_db"] >= fid["gate_db"] and 1 >= fid["image_ssim"] >= fid["gate_ssim"]
    assert "vs_full_vae" not in fid  # the base's own VAE decodes


def test_the_unet_ir_is_really_quantized(ov_int8):
    """FakeQuantize nodes in the IR (the CPU plugin runs them as int8 kernels) and int8 weights on disk:
    the IR's weights are about a quarter of the exported fp32 graph's."""
    types = _op_types(ov_int8 / "unet" / "openvino_model.xml")
    assert types.get("FakeQuantize", 0) > 0
    fp32_types = _op_types(ov_int8 / "text_encoder" / "openvino_model.xml")
    assert "FakeQuantize" not in fp32_types
    onnx_bytes = sum(f.stat().st_size for f in (refit_source_dir(ov_int8) / "unet").glob("model.onnx*"))
    assert (ov_int8 / "unet" / "openvino_model.bin").stat().st_size < 0.45 * onnx_bytes


def test_image_against_diffusers_fp32_with_other_inputs(ov_int8, fused_pipe):
    runtime = LCMPipeline.from_engine_dir(ov_int8)
    latents, noise = seeded_inputs(4, HW, steps=4, seed=7)
    ours = runtime("a blue sphere", steps=4, latents=latents, step_noise=noise, output_type="np")
    ref = diffusers_images(fused_pipe, "a blue sphere", 4, 1.0, latents, noise)
    p, s = psnr(ours, ref), ssim(ours, ref)
    assert INT8_IMAGE_GATE["psnr_db"] <= p < 60 and s >= INT8_IMAGE_GATE["ssim"], (p, s)  # close, and not secretly fp32/bf16
    # the UNet alone: quantized, so further from PyTorch than a bf16 UNet is (< 1e-2 here) but sane
    from lcm_export.builder.components import sample_inputs, wrappers

    feeds = sample_inputs("unet", fused_pipe, 1, HW, seed=3)
    got = runtime.engines["unet"]["*"].run(feeds)
    import torch

    with torch.no_grad():
        want = wrappers(fused_pipe)["unet"](*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 1e-2 < err < 0.5, err


def test_inspect_shows_the_scheme_and_the_figures(ov_int8, capsys):
    code, out, _ = run_cli(["inspect", ov_int8], capsys)
    m = json.loads((ov_int8 / "manifest.json").read_text())
    fid = m["fidelity"]
    assert code == 0
    assert f"scheme {m['components']['unet']['quantization']['scheme']}" in out and "calibrated on 32 UNet calls" in out
    assert f"PSNR {fid['image_psnr_db']:.1f} dB, SSIM {fid['image_ssim']:.3f}" in out and "gate 25.0 dB, SSIM 0.9" in out
    assert ("random weights: these figures compare noise images" in out) is m["demo"] is False  # a local folder here
    assert re.search(r"^unet\s+int8\s", out, re.M)


def test_lean_runtime_runs_an_int8_entry_without_torch_or_nncf(ov_int8):
    code = (
        "import sys, json\n"
        "import lcm_export.runtime as rt\n"
        f"pipe = rt.LCMPipeline.from_engine_dir({str(ov_int8)!r})\n"
        "imgs = pipe('a photo', steps=4)\n"
        "assert imgs[0].size == (64, 64)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'nncf', 'onnxruntime'))))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_int8_entry_on_a_cpu_class_where_int8_is_unmeasured_warns_and_runs(ov_int8, tmp_path, monkeypatch, capsys):
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "int8_pays", lambda flags=None: False)
    code, _, err = run_cli(["generate", "--engine-dir", ov_int8, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 0 and (tmp_path / "o.png").is_file()
    assert "warning:" in err and "int8 has not been measured on this CPU class" in err and "--precision auto" in err
    assert "not measured" in err and "but slower than" not in err  # issue 26: no speed claim it has not measured


@needs_int8
def test_refit_requantizes_on_the_new_weights(ov_int8, tmp_path, base_dir, demo_loras, fused_pipe, capsys):
    """A changed λ on an int8 entry: a refit (no re-export) whose UNet is re-calibrated and re-quantized on the
    new weights' trajectories; its image then follows diffusers at the new λ, not the old one."""
    from diffusers import StableDiffusionPipeline

    from lcm_export.builder.fuse import LoraSpec, fuse

    entry = tmp_path / "int8"
    shutil.copytree(ov_int8, entry)
    shutil.copytree(refit_source_dir(ov_int8), refit_source_dir(entry))  # what the refit patches, beside the store
    (lcm, _), (style, sw) = demo_loras  # the LCM-LoRA at λ -1: the tiny model's image moves by ~37 dB PSNR
    old_blob = (entry / "unet" / "openvino_model.bin").read_bytes()
    res = build_engine(BuildOptions(base=str(base_dir), loras=(f"{lcm}:-1.0", f"{style}:{sw}"), resolutions=(HW,),
                                    engine_dir=str(entry), backend="openvino", precision="int8", show_progress=False))
    assert res.refit, res.messages
    m = res.manifest
    assert "unet" in m["refit"]["components"] and "int8 calibration (PyTorch)" in m["refit"]["phases_s"]
    assert m["components"]["unet"]["quantization"]["calibration"]["samples"] == 32
    assert (entry / "unet" / "openvino_model.bin").read_bytes() != old_blob
    assert m["fidelity"]["image_psnr_db"] >= INT8_IMAGE_GATE["psnr_db"]

    out = tmp_path / "fused-new"
    fuse(str(base_dir), [LoraSpec(lcm, -1.0), LoraSpec(style, sw)], out, show_progress=False)
    new_pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    latents, noise = seeded_inputs(4, HW, steps=4, seed=9)
    ours = LCMPipeline.from_engine_dir(entry)("a red cube", latents=latents, step_noise=noise, output_type="np")
    new_ref = diffusers_images(new_pipe, "a red cube", 4, 1.0, latents, noise)
    old_ref = diffusers_images(fused_pipe, "a red cube", 4, 1.0, latents, noise)
    assert psnr(ours, new_ref) >= INT8_IMAGE_GATE["psnr_db"]
    assert psnr(ours, new_ref) > psnr(ours, old_ref) + 3


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-sq", "hybrid", "w8"])
def test_each_scheme_quantizes_what_it_says(ov_int8, scheme):
    """quantize() on the entry's exported UNet, a few calibration feeds: full int8 quantizes every product,
    hybrid leaves the linear layers' activations alone (fewer FakeQuantize nodes), w8 only the weights."""
    import openvino as ov

    from lcm_export.backends.openvino import INT8_SCHEMES, quantize
    from lcm_export.builder.components import sample_inputs
    from lcm_export.sources.demo import build_demo_pipeline

    pipe = build_demo_pipeline("sd15")
    feeds = [sample_inputs("unet", pipe, 1, HW, seed=s) for s in range(4)]
    model = ov.Core().read_model(str(refit_source_dir(ov_int8) / "unet" / "model.onnx"))
    q, rec = quantize(model, scheme, feeds)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())
    assert rec["scheme"] == scheme and rec["what"] == INT8_SCHEMES[scheme]
    full = json.loads((ov_int8 / "manifest.json").read_text())["components"]["unet"]["quantization"]["fake_quantize_nodes"]
    if scheme == "w8":
        assert fq == 0 and any(op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "u8"
                               for op in q.get_ops())
    elif scheme == "hybrid":
        assert 0 < fq < full and rec["weights_only_matmuls"] > 0
    else:
        assert fq == full
    out = ov.Core().compile_model(q, "CPU").create_infer_request().infer(feeds[0])
    assert np.isfinite(next(iter(out.values()))).all()


def test_refused_on_a_cpu_class_where_int8_is_unmeasured(base_dir, tmp_path, monkeypatch, capsys):
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "int8_pays", lambda flags=None: False)
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--precision", "int8",
                            "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "int8 engines have not been measured faster than fp32" in err
    assert not d.exists()


@pytest.mark.parametrize("flags, msg", [
    (["--precision", "fp32", "--int8-scheme", "w8"], "--int8-scheme w8 applies to int8 UNets only"),
    (["--precision", "int8", "--int8-scheme", "w4"], "--int8-scheme 'w4': choose auto, w8a8"),
    (["--precision", "int8", "--adapters"], "--adapters with an int8 UNet is not supported"),
])
def test_bad_int8_flags_are_one_line(base_dir, tmp_path, monkeypatch, capsys, flags, msg):
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "int8_pays", lambda flags=None: True)  # the flags are checked on any CPU
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--backend", "openvino", *flags,
                            "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and msg in err, err
    assert not d.exists()


@needs_int8
def test_gate_failure_writes_nothing_and_names_the_way_out(base_dir, tmp_path, monkeypatch, capsys):
    if not OV_OK:
        pytest.skip(OV_WHY)
    from lcm_export.builder import verify

    monkeypatch.setattr(verify, "image_fidelity", lambda *a, **k: {"image_psnr_db": 31.0, "image_ssim": 0.62})
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--precision", "int8",
                            "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "SSIM 0.620" in err and "gate 25 dB, SSIM 0.9" in err and "unet int8 rel-L2" in err and "--int8-scheme" in err
    assert not d.exists() and not list(tmp_path.glob(".e.partial-*"))
