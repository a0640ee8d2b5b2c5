"""build-engine with ONNX Runtime: graphs vs the fused PyTorch model at each resolution, the
manifest, reuse, rebuild on change, and bad input (one line, nothing half-written)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import RESOLUTIONS, run_cli
from lcm_export.builder.build_engine import BuildOptions, build_engine


def _rel_l2(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_graphs_match_fused_pytorch(demo_engine, fused_pipe, hw):
    """Each stored graph, run by onnxruntime directly, against diffusers modules on fused weights."""
    rng = np.random.default_rng(5)
    h, w = hw[0] // 8, hw[1] // 8
    sess = lambda c: ort.InferenceSession(str(demo_engine / c / "model.onnx"), providers=["CPUExecutionProvider"])

    ids = fused_pipe.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="np").input_ids
    got = sess("text_encoder").run(None, {"input_ids": ids.astype(np.int32)})[0]
    with torch.no_grad():
        want = fused_pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    assert _rel_l2(got, want) <= 1e-4

    x = rng.standard_normal((2, 4, h, w), dtype=np.float32)
    t = np.array([999, 259], dtype=np.float32)
    e = rng.standard_normal((2, 77, fused_pipe.text_encoder.config.hidden_size), dtype=np.float32)
    got = sess("unet").run(None, {"sample": x, "timestep": t, "encoder_hidden_states": e})[0]
    with torch.no_grad():
        want = fused_pipe.unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(e)).sample.numpy()
    assert _rel_l2(got, want) <= 1e-4

    z = rng.standard_normal((1, 4, h, w), dtype=np.float32)
    got = sess("vae_decoder").run(None, {"latent": z})[0]
    with torch.no_grad():
        want = fused_pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    assert got.shape == (1, 3, hw[0], hw[1])
    assert _rel_l2(got, want) <= 1e-4


def test_manifest(demo_engine, demo_loras):
    m = json.loads((demo_engine / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["family"] == "sd15" and m["size_multiple"] == 16
    from lcm_export.store.manifest import entry_files, manifest_problems

    assert manifest_problems(m) == []
    assert m["file_sizes"] == {f: (demo_engine / f).stat().st_size for f in entry_files(m)}
    assert m["backend"] == "onnxruntime" and m["precision"] == "fp32" and m["device"] == "cpu"
    assert m["resolutions"] == ["64x64", "64x96"]
    assert [p["name"] for p in m["shape_plans"]] == ["64x64", "64x96"]
    assert m["onnxruntime"]["providers"] == ["CPUExecutionProvider"] and m["onnxruntime"]["intra_op_threads"] >= 1
    assert m["onnxruntime"]["allow_spinning"] is False and m["onnxruntime"]["runtime_optimization"] == "ORT_DISABLE_ALL"
    assert len(m["cache_key"]) == 64
    assert {"lcm_export", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["vae"]["scaling_factor"] == pytest.approx(0.18215)
    for comp in ("text_encoder", "unet", "vae_decoder"):
        c = m["components"][comp]
        for f in c["files"]:
            assert (demo_engine / f).is_file()
        # against float64, beside PyTorch fp32's own distance: this tiny model is well conditioned (both ~1e-7)
        assert all(p["reference"] == "PyTorch fp64" and p["rel_l2"] <= 1e-5 and p["torch_fp32_rel_l2"] <= 1e-5
                   and p["limit"] == 1e-4 and p["finite"] for p in c["parity"])
    assert [p["resolution"] for p in m["components"]["unet"]["parity"]] == ["64x64", "64x96"]
    assert m["components"]["unet"]["inputs"][0] == ["sample", "float32", ["B", 4, "H/8", "W/8"]]
    loras = m["fusion"]["loras"]
    assert [(l["weight"], l["format"]) for l in loras] == [(1.0, "kohya+locon"), (0.8, "peft")]
    from lcm_export._util import sha256_file

    assert [l["sha256"] for l in loras] == [sha256_file(p) for p, _ in demo_loras]
    assert (demo_engine / m["tokenizer"]["file"]).is_file() and (demo_engine / m["scheduler"]["file"]).is_file()
    sched = json.loads((demo_engine / m["scheduler"]["file"]).read_text())
    assert sched["_class_name"] == "LCMScheduler"


def _opts(base_dir, demo_loras, engine_dir, weights=(1.0, 0.8), **kw):
    loras = tuple(f"{p}:{w}" for (p, _), w in zip(demo_loras, weights))
    return BuildOptions(base=str(base_dir), loras=loras, resolutions=RESOLUTIONS, engine_dir=str(engine_dir),
                        backend="onnxruntime", show_progress=False, **kw)


def test_reuse_then_rebuild_on_changed_weight(tmp_path, base_dir, demo_loras, demo_engine):
    d = tmp_path / "entry"
    shutil.copytree(demo_engine, d)
    before = {f: (d / f).stat().st_mtime_ns for f in ("manifest.json", "unet/model.onnx")}
    import lcm_export.builder.build_engine as be

    real_build = be._build_into
    be._build_into = lambda *a, **k: pytest.fail("an up-to-date entry was rebuilt")
    try:
        r = build_engine(_opts(base_dir, demo_loras, d))
    finally:
        be._build_into = real_build
    assert r.reused and {f: (d / f).stat().st_mtime_ns for f in before} == before
    assert "up to date" in r.summary()
    key = r.manifest["cache_key"]
    r2 = build_engine(_opts(base_dir, demo_loras, d, weights=(1.0, 0.5)))
    assert not r2.reused and r2.manifest["cache_key"] != key
    assert [l["weight"] for l in json.loads((d / "manifest.json").read_text())["fusion"]["loras"]] == [1.0, 0.5]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_another_models_entry_is_refused(tmp_path, demo_engine, capsys):
    d = tmp_path / "entry"
    shutil.copytree(demo_engine, d)
    before = (d / "manifest.json").read_text()
    code, _, err = run_cli(["build-engine", "--base", "demo:sd15", "--resolution", "64x64", "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and "another model" in err and "--force" in err
    assert (d / "manifest.json").read_text() == before


@pytest.mark.parametrize("args,needle", [
    (["--resolution", "60x64"], "multiples of 8"),
    (["--resolution", "0x64"], "positive"),
    (["--resolution", "72x64"], "multiples of 16"),
    (["--resolution", "256x256", "--dynamic", "64x64-128x128"], "outside the dynamic range"),
    (["--lora", "nope.safetensors"], "not found"),
    (["--precision", "fp16", "--backend", "onnxruntime"], "no fast fp16 kernels"),
    (["--batch", "0"], "from 1 to 64"),
    (["--batch", "1000000"], "from 1 to 64"),
])
def test_bad_input(tmp_path, capsys, args, needle):
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--engine-dir", d, "--quiet", *args], capsys)
    assert code == 2 and needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not d.exists()


def test_out_of_disk_during_export_leaves_nothing(tmp_path, base_dir, capsys, monkeypatch):
    import errno

    import onnx

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    d = tmp_path / "e"
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--engine-dir", d, "--quiet"], capsys)
    assert code == 2 and "no space left on device" in err and err.strip().count("\n") == 0
    assert not d.exists() and not list(tmp_path.iterdir())


def test_inspect(demo_engine, capsys):
    code, out, _ = run_cli(["inspect", demo_engine], capsys)
    assert code == 0
    for needle in ("onnxruntime", "64x64, 64x96", "kohya+locon", "λ=0.8", "unet", "parity"):
        assert needle in out
    code, out, _ = run_cli(["inspect", demo_engine, "--json"], capsys)
    assert json.loads(out)["backend"] == "onnxruntime"
    code, _, err = run_cli(["inspect", demo_engine.parent / "missing"], capsys)
    assert code == 2 and "does not exist" in err


def test_inspect_lists_every_file_with_its_purpose_and_the_weights(demo_engine, fused_pipe, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["inspect", demo_engine], capsys)
    assert code == 0, err
    section = out.split("files (every file in the folder: size, purpose)\n", 1)[1].splitlines()
    listed = {line.split()[0]: line for line in section if line.strip() and not line.strip().startswith("total")}
    on_disk = {p.relative_to(demo_engine).as_posix(): p.stat().st_size for p in demo_engine.rglob("*") if p.is_file()}
    assert set(listed) == set(on_disk)
    for f, size in on_disk.items():
        assert f"{size / 1e6:.1f} MB" in listed[f] or f"{size / 1e9:.2f} GB" in listed[f]
    assert "unet: engine graph" in listed["unet/model.onnx"] and "tokenizer" in listed["tokenizer/tokenizer.json"]
    # the weights, counted here from the PyTorch modules (fp32 entry: 4 bytes each; the VAE decoder without its encoder)
    vae = fused_pipe.vae
    n = sum(p.numel() for m in (fused_pipe.text_encoder, fused_pipe.unet, vae.decoder, vae.post_quant_conv) for p in m.parameters())
    total = sum(on_disk.values())
    line = next(l for l in section if l.strip().startswith("total"))
    assert f"= {total / (4 * n):.2f}x the weights at their compute precision" in line
