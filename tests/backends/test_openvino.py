"""OpenVINO entries of the tiny demo against PyTorch: fp32 at <= 1e-4 rel-L2, bf16 within its gate."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import OV_OK, OV_WHY, PY, RESOLUTIONS, needs_openvino, run_cli
from lcm_export._cpu import native_bf16
from lcm_export.builder.build_engine import BuildOptions, build_engine
from lcm_export.errors import UserError
from lcm_export.builder.verify import diffusers_images, psnr, seeded_inputs
from lcm_export.runtime import LCMPipeline

needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512_BF16): bf16 builds are refused here")


def _build(tmp_path_factory, base_dir, demo_loras, precision, name):
    if not OV_OK:
        pytest.skip(f"needs OpenVINO: {OV_WHY}")
    d = tmp_path_factory.mktemp("ov") / name
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=RESOLUTIONS,
                              engine_dir=str(d), backend="openvino", precision=precision, show_progress=False))
    return d


@pytest.fixture(scope="module")
def ov_fp32(tmp_path_factory, base_dir, demo_loras):
    return _build(tmp_path_factory, base_dir, demo_loras, "fp32", "ov-fp32")


@pytest.fixture(scope="module")
def ov_bf16(tmp_path_factory, base_dir, demo_loras):
    if not native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX / AVX512_BF16): bf16 builds are refused here")
    return _build(tmp_path_factory, base_dir, demo_loras, "bf16", "ov-bf16")


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _component_errors(engine_dir, fused_pipe, hw, seed):
    """Each component's engine against its PyTorch module on fresh seeded inputs (not the build's)."""
    from lcm_export.builder.components import sample_inputs, wrappers as _wrappers

    pipe = LCMPipeline.from_engine_dir(engine_dir)
    mods = _wrappers(fused_pipe)
    out = {}
    for comp, engines in pipe.engines.items():
        feeds = sample_inputs(comp, fused_pipe, 2 if comp == "unet" else 1, hw, seed=seed)
        got = engines["*"].run_all(feeds)
        with torch.no_grad():
            want = mods[comp](*[torch.from_numpy(v) for v in feeds.values()])
        want = want if isinstance(want, tuple) else (want,)
        out[comp] = max(_rel_l2(g, w.numpy()) for g, w in zip(got, want))
    return out


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_fp32_components_match_pytorch(ov_fp32, fused_pipe, hw):
    errors = _component_errors(ov_fp32, fused_pipe, hw, seed=11)
    assert set(errors) == {"text_encoder", "unet", "vae_decoder"}
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_fp32_manifest_records_parity_and_files(ov_fp32):
    m = json.loads((ov_fp32 / "manifest.json").read_text())
    assert m["backend"] == "openvino" and m["precision"] == "fp32" and m["device"] == "cpu"
    assert m["openvino"]["version"] and m["openvino"]["inference_num_threads"] >= 1
    assert isinstance(m["hardware"]["cpu_flags"], list)
    for comp, c in m["components"].items():
        assert c["precision"] == "fp32"
        assert {f.split("/")[-1] for f in c["files"]} == {"openvino_model.xml", "openvino_model.bin"} and "compiled_blob" not in c
        assert all((ov_fp32 / f).stat().st_size > 0 for f in c["files"])
        res = {p["resolution"] for p in c["parity"]}
        assert res == ({"64x64"} if comp.startswith("text") else {"64x64", "64x96"})
        assert all(p["rel_l2"] <= 1e-4 for p in c["parity"])
    assert "fidelity" not in m  # the image gate is for reduced precision


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_fp32_image_matches_diffusers(ov_fp32, fused_pipe, guidance):
    runtime = LCMPipeline.from_engine_dir(ov_fp32)
    latents, noise = seeded_inputs(4, (64, 96), steps=4, seed=5)
    ours = runtime("a red cube", steps=4, guidance=guidance, height=64, width=96, latents=latents, step_noise=noise, output_type="np")
    ref = diffusers_images(fused_pipe, "a red cube", 4, guidance, latents, noise)
    assert ref.std() > 0.02
    assert psnr(ours, ref) >= 40


def _static_input_shapes(engine) -> dict:
    """The shapes the engine's compiled model takes (asserted static: every dimension fixed)."""
    out = {}
    for port in engine.compiled.inputs:
        ps = port.get_partial_shape()
        assert ps.is_static, (port.get_any_name(), ps)
        out[port.get_any_name()] = tuple(ps.to_shape())
    return out


def test_static_shapes_compile_per_call_shape_and_match_dynamic(ov_fp32, fused_pipe):
    dyn = LCMPipeline.from_engine_dir(ov_fp32)
    st = LCMPipeline.from_engine_dir(ov_fp32, shapes="static")
    unet = st.engines["unet"]["*"]
    assert unet.compiled is None  # compiled at the first call, for its shapes
    compiled = []
    for (h, w), guidance in (((64, 64), 1.0), ((64, 96), 8.0), ((64, 64), 1.0)):
        latents, noise = seeded_inputs(4, (h, w), steps=4, seed=7)
        kw = dict(steps=4, guidance=guidance, height=h, width=w, latents=latents, step_noise=noise, output_type="np")
        ours, ref = st("a red cube", **kw), dyn("a red cube", **kw)
        assert ref.std() > 0.02 and psnr(ours, ref) >= 60, (h, w, guidance, psnr(ours, ref))
        assert _static_input_shapes(unet)["sample"] == (2 if guidance > 1 else 1, 4, h // 8, w // 8)
        assert _static_input_shapes(st.engines["vae_decoder"]["*"])["latent"] == (1, 4, h // 8, w // 8)
        compiled.append(unet.compiled)
    assert compiled[0] is not compiled[1] and compiled[1] is not compiled[2]  # a new shape compiles again
    latents, noise = seeded_inputs(4, (64, 96), steps=4, seed=5)  # and against diffusers itself
    ours = st("a red cube", steps=4, guidance=8.0, height=64, width=96, latents=latents, step_noise=noise, output_type="np")
    assert psnr(ours, diffusers_images(fused_pipe, "a red cube", 4, 8.0, latents, noise)) >= 40
    before = unet.compiled
    st("a blue cube", steps=4, guidance=8.0, height=64, width=96, output_type="np")
    assert unet.compiled is before  # the same shapes: no compile


def test_shapes_option_on_the_cli(ov_fp32, demo_engine, tmp_path, capsys):
    from lcm_export.backends import static_shapes
    from lcm_export.store.manifest import read_manifest

    # generate's default (auto) is static for an OpenVINO entry: nothing is compiled until the first call
    assert static_shapes(read_manifest(ov_fp32), ov_fp32, "auto") and not static_shapes(read_manifest(demo_engine), demo_engine, "auto")
    assert LCMPipeline.from_engine_dir(ov_fp32, shapes="auto").engines["unet"]["*"].compiled is None
    out = tmp_path / "o.png"
    for shapes in ("static", "dynamic"):
        code, _, err = run_cli(["generate", "--engine-dir", ov_fp32, "--prompt", "x", "--shapes", shapes, "--out", out], capsys)
        assert code == 0 and out.is_file(), err
    code, _, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "x", "--shapes", "static", "--out", tmp_path / "b.png"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--shapes static" in err and "onnxruntime entry" in err
    assert not (tmp_path / "b.png").exists()
    code, _, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "x", "--out", tmp_path / "c.png"], capsys)
    assert code == 0, err  # auto: as built where the backend has no static mode


def _weights_files(entry):
    """Every file of the entry that holds weights (not the tokenizers: openvino-tokenizers' .bin holds a vocabulary)."""
    return sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*")
                  if p.is_file() and p.suffix not in (".json", ".xml", ".txt") and not p.relative_to(entry).parts[0].startswith("tokenizer"))


def test_each_weight_once_no_compiled_blob(ov_fp32):
    m = json.loads((ov_fp32 / "manifest.json").read_text())
    assert _weights_files(ov_fp32) == sorted(f"{c}/openvino_model.bin" for c in m["components"])
    assert not list(ov_fp32.rglob("*.blob"))


def _old_layout(entry, dest, version=None):
    """``entry`` as recipe 6 wrote it: each component's IR with a compiled blob beside it (fp32 here)."""
    import openvino as ov

    from lcm_export.backends.openvino import compile_config
    from lcm_export.store.manifest import record_file_sizes

    shutil.copytree(entry, dest)
    m = json.loads((dest / "manifest.json").read_text())
    for comp, c in m["components"].items():
        compiled = ov.Core().compile_model(str(dest / comp / "openvino_model.xml"), "CPU", compile_config("fp32", m["openvino"]["inference_num_threads"]))
        (dest / comp / "model.blob").write_bytes(compiled.export_model().getbuffer())
        c["files"].append(f"{comp}/model.blob")
        c["compiled_blob"] = f"{comp}/model.blob"
    if version:
        m["openvino"]["version"] = version
    (dest / "manifest.json").write_text(json.dumps(record_file_sizes(m, dest)))
    return dest


def test_previous_layout_blob_is_read_and_ir_is_the_fallback(ov_fp32, tmp_path):
    new = LCMPipeline.from_engine_dir(ov_fp32)
    assert {e["*"].source for e in new.engines.values()} == {"ir"}
    a = new("x", output_type="np")
    old = LCMPipeline.from_engine_dir(_old_layout(ov_fp32, tmp_path / "old"))
    assert {e["*"].source for e in old.engines.values()} == {"blob"}
    assert np.array_equal(a, old("x", output_type="np"))
    static = LCMPipeline.from_engine_dir(tmp_path / "old", shapes="static")  # a compiled blob runs as it was built
    assert {e["*"].source for e in static.engines.values()} == {"blob"} and np.array_equal(a, static("x", output_type="np"))
    other = LCMPipeline.from_engine_dir(_old_layout(ov_fp32, tmp_path / "other-version", "0.0.0-another"))
    assert {e["*"].source for e in other.engines.values()} == {"ir"}
    assert np.array_equal(a, other("x", output_type="np"))


def _resident_bytes(folder):
    """Bytes of the pages of ``folder``'s files resident in this process's mappings (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and head[-1].startswith(f"{folder}/")
        elif current and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_loading_keeps_no_resident_copy_of_the_weights_file(ov_fp32, tmp_path, shapes):
    # the CPU plugin repacks the weights into its own memory as it compiles and on the first inference of a shape;
    # the pages of the weights file it read must not stay resident beside that copy (in any mapping of the file)
    entry = shutil.copytree(ov_fp32, tmp_path / "e")  # a fresh file: no mapping of it from another test
    unet = (entry / "unet").resolve()
    size = (unet / "openvino_model.bin").stat().st_size
    pipe = LCMPipeline.from_engine_dir(entry, shapes=shapes)
    assert size > 1 << 20 and _resident_bytes(unet) < size // 10
    engine, seen = pipe.engines["unet"]["*"], []
    run_all = engine.run_all

    def spy(feeds):
        out = run_all(feeds)
        seen.append(_resident_bytes(unet))
        return out

    engine.run_all = spy
    pipe("x", output_type="np")
    pipe("y", output_type="np", guidance=2.0)  # a new UNet shape (2B) reads weights again
    assert len(seen) == 8 and seen[0] < size // 10 and seen[4] < size // 10, seen


def _scramble(f, at=0.5):
    """Overwrite bytes in the middle of ``f`` without changing its size (the store's size check can't see it)."""
    data = bytearray(f.read_bytes())
    i = int(len(data) * at)
    data[i:i + 64] = b"\x07" * 64
    f.write_bytes(bytes(data))


def test_damaged_blob_falls_back_to_the_ir_and_damaged_ir_is_one_line_error(ov_fp32, tmp_path, capsys):
    bad = _old_layout(ov_fp32, tmp_path / "bad")
    _scramble(bad / "unet" / "model.blob", 0.0)  # its header
    pipe = LCMPipeline.from_engine_dir(bad)
    assert pipe.engines["unet"]["*"].source == "ir" and pipe.engines["vae_decoder"]["*"].source == "blob"
    good = LCMPipeline.from_engine_dir(ov_fp32)
    assert np.array_equal(pipe("x", output_type="np"), good("x", output_type="np"))
    _scramble(bad / "unet" / "openvino_model.xml", 0.3)
    code, _, err = run_cli(["generate", "--engine-dir", bad, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "corrupt or truncated" in err and "unet/openvino_model.xml" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()



@needs_bf16
def test_bf16_entry_stores_its_weights_in_half_precision(ov_fp32, ov_bf16):
    # each weight once, in a 16-bit form the CPU plugin converts to bf16 as it compiles: half the fp32 entry's bytes
    m = json.loads((ov_bf16 / "manifest.json").read_text())
    for comp, c in m["components"].items():
        assert c["precision"] == "bf16" and "compiled_blob" not in c
        half = (ov_bf16 / comp / "openvino_model.bin").stat().st_size / (ov_fp32 / comp / "openvino_model.bin").stat().st_size
        assert 0.45 < half < 0.55, (comp, half)
    assert _weights_files(ov_bf16) == sorted(f"{c}/openvino_model.bin" for c in m["components"])


@needs_bf16
def test_bf16_entry_within_its_gate(ov_bf16, fused_pipe):
    m = json.loads((ov_bf16 / "manifest.json").read_text())
    assert m["precision"] == "bf16"
    fid = m["fidelity"]
    assert fid["gate_db"] == 30 and fid["image_psnr_db"] >= 30
    assert "gate_ssim" not in fid and 0.9 < fid["image_ssim"] <= 1  # SSIM recorded, the bf16 gate is PSNR only
    from lcm_export.backends.openvino import BF16_COMPONENTS

    for comp, c in m["components"].items():
        assert c["precision"] == ("bf16" if comp in BF16_COMPONENTS else "fp32")
    # independently: the image against diffusers fp32 with other inputs than the build's check
    runtime = LCMPipeline.from_engine_dir(ov_bf16)
    latents, noise = seeded_inputs(4, (64, 64), steps=4, seed=7)
    ours = runtime("a blue sphere", steps=4, latents=latents, step_noise=noise, output_type="np")
    ref = diffusers_images(fused_pipe, "a blue sphere", 4, 1.0, latents, noise)
    assert 30 <= psnr(ours, ref) < 120  # bf16 is close, and not secretly fp32
    errors = _component_errors(ov_bf16, fused_pipe, (64, 64), seed=3)
    assert errors["unet"] > 1e-4 and all(e < 0.2 for e in errors.values()), errors


@needs_openvino
@needs_bf16
def test_fidelity_failure_writes_nothing(base_dir, tmp_path, monkeypatch, capsys):
    from lcm_export.builder import verify as fidelity

    monkeypatch.setattr(fidelity, "image_fidelity", lambda *a, **k: {"image_psnr_db": 21.5, "image_ssim": 0.95})
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--backend", "openvino",
                            "--precision", "bf16", "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "PSNR 21.5 dB" in err and "gate 30 dB" in err and "unet bf16 rel-L2" in err and "--precision fp32" in err
    assert not d.exists() and not list(tmp_path.glob(".e.partial-*"))


def test_bf16_entry_on_cpu_without_bf16_warns(ov_fp32, tmp_path, monkeypatch, capsys):
    """Item 3's decision: warn (it runs, in fp32, correctly) rather than refuse."""
    from lcm_export import _cpu

    entry = tmp_path / "bf16-marked"
    shutil.copytree(ov_fp32, entry)
    m = json.loads((entry / "manifest.json").read_text())
    for c in m["components"].values():
        c["precision"] = "bf16"
    (entry / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(_cpu, "native_bf16", lambda flags=None: False)
    code, _, err = run_cli(["generate", "--engine-dir", entry, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 0 and (tmp_path / "o.png").is_file()
    assert "warning:" in err and "no native bf16" in err and "--force" in err


def test_lean_runtime_with_openvino(ov_fp32):
    code = (
        "import sys, json\n"
        "import lcm_export.runtime as rt\n"
        f"pipe = rt.LCMPipeline.from_engine_dir({str(ov_fp32)!r})\n"
        "imgs = pipe('a photo', steps=2)\n"
        "assert imgs[0].size == (64, 64)\n"
        "print(json.dumps([sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'peft', 'onnxruntime')),"
        " 'openvino' in sys.modules]))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [[], True]


def test_missing_openvino_is_an_install_hint(monkeypatch):
    from lcm_export import backends
    from lcm_export.backends import openvino

    monkeypatch.setattr(openvino, "status", lambda: (False, "cpu", f"the openvino package is not installed: {openvino.INSTALL_HINT}"))
    with pytest.raises(UserError, match=r"--backend openvino: the openvino package is not installed: pip install"):
        backends.choose("openvino", "fp32")
