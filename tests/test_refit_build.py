"""Refit (weights-only update) against a fresh full build, per CPU backend, on the tiny demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_openvino, run_cli
from lcm_export.store.manifest import refit_source_dir
from lcm_export.builder.build_engine import BuildOptions, build_engine
from lcm_export.builder.verify import psnr, seeded_inputs
from lcm_export.runtime import LCMPipeline

BACKENDS = [("onnxruntime", "fp32"), pytest.param("openvino", "fp32", marks=needs_openvino)]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, demo_loras):
    """lcm (kohya, UNet), style (PEFT, UNet + text encoder) and style2: the style LoRA's layers with other values."""
    from safetensors.numpy import load_file, save_file

    (lcm, _), (style, _) = demo_loras
    d = tmp_path_factory.mktemp("loras2")
    sd = load_file(str(style))
    rng = np.random.default_rng(7)
    style2 = d / "style2.safetensors"
    save_file({k: (v * rng.uniform(0.5, 1.5)).astype(v.dtype) for k, v in sd.items()}, str(style2),
              metadata=dict(__import__("safetensors").safe_open(str(style), "np").metadata() or {}))
    return {"lcm": Path(lcm), "style": Path(style), "style2": style2}


def _build(base_dir, d, loras, backend, precision, **kw):
    return build_engine(BuildOptions(base=str(base_dir), loras=tuple(loras), resolutions=((64, 64),), engine_dir=str(d),
                                     backend=backend, precision=precision, show_progress=False, **kw))


def _image(d):
    pipe = LCMPipeline.from_engine_dir(d)
    lat, noise = seeded_inputs(4, (64, 64), 4, seed=3)
    return pipe("a fox", steps=4, guidance=1.0, latents=lat, step_noise=noise, output_type="np"), pipe


def _unet_out(pipe):
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([499.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, pipe.manifest["text_dim"]), dtype=np.float32)}
    return pipe.engines["unet"]["*"].run(feeds)


CHANGES = {
    "lambda": (["lcm:1.0", "style:0.8"], ["lcm:1.0", "style:0.3"]),
    "swapped": (["lcm:1.0", "style:0.8"], ["lcm:1.0", "style2:0.8"]),
    "added": (["lcm:1.0"], ["lcm:1.0", "style:0.8"]),
    "removed": (["lcm:1.0", "style:0.8"], ["lcm:1.0"]),
}


def _specs(loras, items):
    return [f"{loras[i.split(':')[0]]}:{i.split(':')[1]}" for i in items]


@pytest.mark.parametrize("backend, precision", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_refit_equals_fresh_build(base_dir, loras, tmp_path, backend, precision, change):
    before, after = (_specs(loras, x) for x in CHANGES[change])
    entry = tmp_path / "entry"
    _build(base_dir, entry, before, backend, precision)
    old_manifest = json.loads((entry / "manifest.json").read_text())
    old_img, old_pipe = _image(entry)
    old_out = _unet_out(old_pipe)
    del old_pipe
    res = _build(base_dir, entry, after, backend, precision)
    assert res.refit and not res.reused and "refit in" in res.summary() and "refit: weights updated in place" in res.summary()
    fresh = _build(base_dir, tmp_path / "fresh", after, backend, precision, no_refit=True)
    assert not fresh.refit
    m, f = res.manifest, fresh.manifest
    assert m["cache_key"] == f["cache_key"] and m["weights_key"] == f["weights_key"] and m["graph_key"] == old_manifest["graph_key"]
    assert [(l["sha256"], l["weight"]) for l in m["fusion"]["loras"]] == [(l["sha256"], l["weight"]) for l in f["fusion"]["loras"]]
    changed = set(m["refit"]["components"])
    te_touched = any("text_encoder" in l["modules"] for l in old_manifest["fusion"]["loras"] + m["fusion"]["loras"] if "style" in l["path"])
    assert "unet" in changed and ("text_encoder" in changed) == te_touched and "vae_decoder" not in changed
    # checked as a fresh build is: fp32 against float64 (with PyTorch fp32's own distance), bf16 against PyTorch fp32
    assert all(p["rel_l2"] <= p["limit"] and p["reference"] == ("PyTorch fp64" if c["precision"] == "fp32" else "PyTorch fp32")
               for c in m["components"].values() for p in c["parity"])
    ours, pipe_r = _image(entry)
    ref, pipe_f = _image(tmp_path / "fresh")
    a, b = _unet_out(pipe_r), _unet_out(pipe_f)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6
    assert psnr(ours, ref) >= 60
    import onnx  # the patched exported graph holds exactly the fresh export's weights, bit for bit
    for comp in ("unet", "text_encoder"):
        g1, g2 = (onnx.load(str(refit_source_dir(d) / comp / "model.onnx")) for d in (entry, tmp_path / "fresh"))
        assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in g1.graph.initializer} == \
            {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in g2.graph.initializer}
    # and the refit really changed the model (by far more than it differs from the fresh build)
    assert np.linalg.norm(old_out - a) / np.linalg.norm(a) > 1e-4 and not np.array_equal(old_img, ours)
    # the entry is as readable and intact as a fresh one: up to date on the same inputs
    assert _build(base_dir, entry, after, backend, precision).reused


def test_failed_refit_leaves_the_entry_intact(base_dir, loras, tmp_path, monkeypatch):
    from lcm_export.builder import build_engine as be
    from lcm_export.builder import verify

    entry = tmp_path / "e"
    _build(base_dir, entry, _specs(loras, ["lcm:1.0", "style:0.8"]), "onnxruntime", "fp32")
    snapshot = {p.relative_to(entry): p.read_bytes() for p in entry.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise be.UserError("unet: the onnxruntime engine does not match PyTorch (rel-L2 5.0e-01 at 64x64 (limit 0.0001)); nothing was written")

    monkeypatch.setattr(verify, "verify_engine", boom)
    with pytest.raises(be.UserError, match="does not match PyTorch"):
        _build(base_dir, entry, _specs(loras, ["lcm:1.0", "style:0.2"]), "onnxruntime", "fp32")
    after = {p.relative_to(entry): p.read_bytes() for p in entry.rglob("*") if p.is_file()}
    assert after == snapshot
    assert not list(tmp_path.glob(".e.*"))
    assert LCMPipeline.from_engine_dir(entry)("x", steps=1, output_type="np").shape == (1, 64, 64, 3)


@pytest.mark.parametrize("flags, why", [
    (["--resolution", "64x96"], "the graph changed (resolutions or shape plans)"),
    (["--resolution", "64x64", "--no-refit"], "--no-refit was given"),
    (["--resolution", "64x64", "--batch", "2"], "the graph changed (resolutions or shape plans, batch)"),
])
def test_graph_changes_fall_back_to_a_full_build_saying_why(base_dir, loras, tmp_path, capsys, flags, why):
    entry = tmp_path / "e"
    _build(base_dir, entry, _specs(loras, ["lcm:1.0"]), "onnxruntime", "fp32")
    code, out, err = run_cli(["build-engine", "--base", base_dir, "--lora", f"{loras['lcm']}:0.5", "--backend", "onnxruntime",
                              "--engine-dir", entry, "--quiet", *flags], capsys)
    assert code == 0 and f"full build, not a refit: {why}" in out and "built in" in out and "refit in" not in out


def test_lora_with_bias_terms_is_a_full_build(base_dir, loras, tmp_path, capsys, monkeypatch):
    from lcm_export.builder import fuse
    from lcm_export.sources import lora

    entry = tmp_path / "e"
    _build(base_dir, entry, _specs(loras, ["lcm:1.0"]), "onnxruntime", "fp32")
    for module in (fuse, lora):  # the fusion record (fuse) and the refit's check (lora) both ask
        monkeypatch.setattr(module, "lora_has_bias", lambda path: "style" in str(path))
    code, out, _ = run_cli(["build-engine", "--base", base_dir, "--lora", f"{loras['lcm']}:1.0", "--lora", f"{loras['style']}:0.8",
                            "--backend", "onnxruntime", "--resolution", "64x64", "--engine-dir", entry, "--quiet"], capsys)
    assert code == 0 and "full build, not a refit: a LoRA with bias terms" in out and "built in" in out
    m = json.loads((entry / "manifest.json").read_text())
    assert [l["lora_bias"] for l in m["fusion"]["loras"]] == [False, True]


def test_changed_base_is_a_full_build(base_dir, loras, tmp_path, capsys):
    base2 = tmp_path / "base2"
    shutil.copytree(base_dir, base2)
    entry = tmp_path / "e"
    code, out, _ = run_cli(["build-engine", "--base", base2, "--lora", f"{loras['lcm']}:1.0", "--backend", "onnxruntime",
                            "--resolution", "64x64", "--engine-dir", entry, "--quiet"], capsys)
    assert code == 0
    from safetensors.numpy import load_file, save_file

    f = next((base2 / "unet").glob("*.safetensors"))
    sd = load_file(str(f))
    k = next(k for k in sd if k.endswith("conv_in.weight"))
    sd[k] = sd[k] * 1.01
    save_file(sd, str(f))
    code, out, _ = run_cli(["build-engine", "--base", base2, "--lora", f"{loras['lcm']}:0.7", "--backend", "onnxruntime",
                            "--resolution", "64x64", "--engine-dir", entry, "--quiet"], capsys)
    assert code == 0 and "full build, not a refit: the base model's weights changed" in out


@pytest.mark.parametrize("bad, msg", [("truncated", "truncated"), ("lambda", "λ=1e+38")])
def test_bad_lora_in_a_refit_gets_the_fresh_build_error(base_dir, loras, tmp_path, capsys, bad, msg):
    entry = tmp_path / "e"
    _build(base_dir, entry, _specs(loras, ["lcm:1.0"]), "onnxruntime", "fp32")
    snapshot = (entry / "manifest.json").read_bytes()
    if bad == "truncated":
        lora = tmp_path / "t.safetensors"
        lora.write_bytes(loras["style"].read_bytes()[:300])
        spec = f"{lora}:0.8"
    else:
        spec = f"{loras['style']}:1e38"
    args = ["build-engine", "--base", base_dir, "--lora", f"{loras['lcm']}:1.0", "--lora", spec, "--backend", "onnxruntime",
            "--resolution", "64x64", "--quiet"]
    code, _, err_refit = run_cli(args + ["--engine-dir", entry], capsys)
    code2, _, err_fresh = run_cli(args + ["--engine-dir", tmp_path / "fresh"], capsys)
    assert code == code2 == 2 and err_refit.count("\n") == 1 and msg in err_refit
    assert err_refit.replace(str(entry), "X") == err_fresh.replace(str(tmp_path / "fresh"), "X")
    assert (entry / "manifest.json").read_bytes() == snapshot and not (tmp_path / "fresh").exists()


def test_refit_source_lives_beside_the_store_not_in_the_entry(base_dir, loras, tmp_path):
    entry = tmp_path / "store" / "entry"
    res = _build(base_dir, entry, _specs(loras, ["lcm:1.0", "style:0.8"]), "onnxruntime", "fp32")
    source = refit_source_dir(entry)
    assert source == tmp_path / "store" / ".refit-sources" / "entry"
    assert not (entry / "onnx").exists()
    assert not any(p.name == "weight_map.json" for p in entry.rglob("*"))
    for comp, c in res.manifest["components"].items():  # the exported graphs and weight maps are in the source, not the entry
        assert (source / c["onnx_files"][0]).is_file() and (source / c["weight_map"]).is_file()
        assert c["weight_map"] not in res.manifest["file_sizes"]  # (ONNX Runtime's engine is also named model.onnx: optimized)
    stamp = json.loads((source / "source.json").read_text())
    assert stamp["weights_key"] == res.manifest["weights_key"]
    # without its source, a change of λ is a full build that says why, and writes the source again
    shutil.rmtree(source)
    again = _build(base_dir, entry, _specs(loras, ["lcm:1.0", "style:0.3"]), "onnxruntime", "fp32")
    assert not again.refit and any("refit source" in m and "missing" in m for m in again.messages)
    assert json.loads((source / "source.json").read_text())["weights_key"] == again.manifest["weights_key"]
    # with it, the next change is a refit again, and the source follows the entry's new weights
    third = _build(base_dir, entry, _specs(loras, ["lcm:1.0", "style:0.5"]), "onnxruntime", "fp32")
    assert third.refit
    assert json.loads((source / "source.json").read_text())["weights_key"] == third.manifest["weights_key"]
