"""Style LoRAs as run-time adapters: prepared once (`adapter add`), applied per call, equal to a fresh build
with the LoRA fused; mixing, λ = 0, switching back and forth; bad input; lean."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, needs_openvino, run_cli
from lcm_export.builder.build_engine import BuildOptions, build_engine
from lcm_export.runtime import LCMPipeline
from lcm_export.builder.verify import FP32_FACTOR, FP32_FLOOR, float64_outputs, psnr, rel_l2, seeded_inputs


@pytest.fixture(scope="module")
def loras(tmp_path_factory, demo_pipe, demo_loras):
    """lcm: the demo LCM-LoRA (kohya LoCon: 3x3 convs, baked); style: the demo PEFT style LoRA (UNet attention +
    text encoder); pixel: a kohya LoRA over other layers (feed-forward, cross-attention, 1x1 proj convs)."""
    import torch
    from safetensors.torch import save_file

    (lcm, _), (style, _) = demo_loras
    gen = torch.Generator().manual_seed(99)
    sd = {}
    for name, mod in demo_pipe.unet.named_modules():
        if name.endswith(("ff.net.2", "attn2.to_k", "attn2.to_v", "proj_in", "proj_out")):
            key = "lora_unet_" + name.replace(".", "_")
            w = mod.weight
            sd[f"{key}.lora_down.weight"] = torch.randn(3, *w.shape[1:], generator=gen) * 0.1
            sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 3, *w.shape[2:], generator=gen) * 0.1
            sd[f"{key}.alpha"] = torch.tensor(1.5)
    pixel = tmp_path_factory.mktemp("pixel") / "pixel.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(pixel))
    return {"lcm": Path(lcm), "style": Path(style), "pixel": pixel}


def _build(base_dir, d, specs, backend="onnxruntime", precision="fp32", adapters=False):
    return build_engine(BuildOptions(base=str(base_dir), loras=tuple(specs), resolutions=((64, 64),), engine_dir=str(d),
                                     backend=backend, precision=precision, adapters=adapters, show_progress=False))


@pytest.fixture(scope="module")
def entry(tmp_path_factory, base_dir, loras):
    """An ONNX Runtime entry with the LCM-LoRA baked and adapter branches, holding 'style' and 'pixel'."""
    from lcm_export.adapters.index import add_adapter

    d = tmp_path_factory.mktemp("adapters") / "entry"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "style")
    add_adapter(d, loras["pixel"], "pixel")
    return d


def _image(pipe, **kw):
    lat, noise = seeded_inputs(4, (64, 64), 4, seed=11)
    return pipe("a paper fox", steps=4, latents=lat, step_noise=noise, output_type="np", **kw)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, base_dir, loras):
    """Fresh builds (no branches) with the same LoRAs fused at the λ the adapter tests use."""
    root = tmp_path_factory.mktemp("fresh")
    out = {}
    for key, specs in {"style": ["style:0.8"], "mix": ["style:0.8", "pixel:-0.5"], "none": []}.items():
        d = root / key
        _build(base_dir, d, [f"{loras['lcm']}:1.0"] + [f"{loras[s.split(':')[0]]}:{s.split(':')[1]}" for s in specs])
        out[key] = d
    return out


def test_branches_and_index(entry, loras):
    from lcm_export.sources.lora import inspect_lora

    m = json.loads((entry / "manifest.json").read_text())
    branches = m["adapters"]["branches"]
    assert set(branches) == {"text_encoder", "unet"}
    kinds = {r["kind"] for r in branches["unet"]}
    assert kinds == {"matmul", "conv1x1"} and len(branches["text_encoder"]) == 12
    index = json.loads((entry / "adapters" / "index.json").read_text())["adapters"]
    assert set(index) == {"style", "pixel"}
    for name in index:  # every layer of the file became a branch's factors
        assert index[name]["layers"] == inspect_lora(loras[name]).n_layers
        assert index[name]["source"]["sha256"] == inspect_lora(loras[name]).sha256
    assert index["pixel"]["ranks"] == [3] and set(index["style"]["layers"]) == {"unet", "text_encoder"}


def test_no_adapter_and_zero_weight_equal_the_plain_entry(entry, fresh):
    pipe, plain = LCMPipeline.from_engine_dir(entry), LCMPipeline.from_engine_dir(fresh["none"])
    a = _image(pipe)
    assert np.array_equal(a, _image(pipe, adapters={"style": 0.0, "pixel": 0.0}))
    assert np.array_equal(a, _image(pipe, adapters={}))
    assert psnr(a, _image(plain)) >= 80  # the same model; fp32 rounding of the rank-0 branches' graph only


@pytest.mark.parametrize("choice, key", [({"style": 0.8}, "style"), ({"style": 0.8, "pixel": -0.5}, "mix")])
def test_adapters_equal_a_fresh_build_with_them_fused(entry, fresh, fused_refs, choice, key):
    pipe, ref = LCMPipeline.from_engine_dir(entry), LCMPipeline.from_engine_dir(fresh[key])
    ours, want = _image(pipe, adapters=choice), _image(ref)
    assert psnr(ours, want) >= 60
    # the UNet with the adapters, through the engine, against float64 of the fused PyTorch module: the fp32 gate rule
    module, feeds = fused_refs[key]
    exact = float64_outputs(module, feeds)[0]
    from lcm_export.builder.components import run_module

    e32 = rel_l2(run_module(module, feeds)[0], exact)
    got = pipe.engines["unet"]["*"].run({**feeds, **pipe.adapters.feeds(pipe.adapters.check(choice))["unet"]})
    assert rel_l2(got, exact) <= max(FP32_FLOOR, FP32_FACTOR * e32)
    assert rel_l2(got, pipe.engines["unet"]["*"].run({**feeds, **pipe.adapters.feeds(())["unet"]})) > 1e-3  # it did change


@pytest.fixture(scope="module")
def fused_refs(base_dir, loras):
    """PyTorch UNets with the LoRAs fused (diffusers), as references, with seeded inputs."""
    from lcm_export.builder.components import sample_inputs, wrappers
    from lcm_export.builder.fuse import fuse_into
    from lcm_export.sources.lora import LoraSpec, inspect_lora
    from lcm_export.sources.models import load_pipeline, resolve_base

    out = {}
    for key, specs in {"style": [("style", 0.8)], "mix": [("style", 0.8), ("pixel", -0.5)]}.items():
        pipe = load_pipeline(resolve_base(str(base_dir)))
        items = [(LoraSpec(loras["lcm"], 1.0), inspect_lora(loras["lcm"]))]
        items += [(LoraSpec(loras[n], w), inspect_lora(loras[n])) for n, w in specs]
        fuse_into(pipe, items)
        out[key] = (wrappers(pipe)["unet"], sample_inputs("unet", pipe, 1, (64, 64), seed=5))
    return out


def test_switching_back_and_forth_does_not_drift(entry):
    pipe = LCMPipeline.from_engine_dir(entry)
    first = _image(pipe, adapters={"style": 0.8})
    for choice in ({"pixel": 1.0}, {}, {"style": 0.3, "pixel": 0.2}, {"style": 0.8}):
        img = _image(pipe, adapters=choice)
    assert np.array_equal(img, first)
    assert not np.array_equal(_image(pipe, adapters={"style": 0.3}), first)


def _factor_accounting(entry, ad):
    """Per adapter: its factors as stored ({key: array}) and, per branch key, its rank (independent of the runtime)."""
    from safetensors.numpy import load_file

    kinds = {f"{c}.{i}": row["kind"] for c, rows in ad.branches.items() for i, row in enumerate(rows)}
    out = {}
    for name, rec in ad.index().items():
        f = load_file(str(entry / rec["factors"]))
        ranks = {k[:-2]: v.shape[1 if kinds[k[:-2]] == "matmul" else 0] for k, v in f.items() if k.endswith(".A")}
        out[name] = (f, ranks)
    return out


@pytest.fixture
def twin_entry(entry, loras, tmp_path):
    """A copy of ``entry`` that also holds 'twin' (the style LoRA again): two adapters over the same layers."""
    import shutil

    from lcm_export.adapters.index import add_adapter

    d = tmp_path / "twin"
    shutil.copytree(entry, d, symlinks=True)
    add_adapter(d, loras["style"], "twin")
    return d


def test_a_prepared_adapter_costs_its_factors_and_a_weight_change_only_its_scales(twin_entry):
    """One adapter is fed as loaded (no copy of its factors); another λ adds only the s vectors (4 bytes a rank);
    a set of two costs the concatenation of the layers both touch, once."""
    from lcm_export.runtime.adapters import Adapters

    entry = twin_entry
    pipe = LCMPipeline.from_engine_dir(entry)
    ad = Adapters(entry, pipe.manifest)
    acc = _factor_accounting(entry, ad)
    (fs, rs), (fp, rp) = acc["style"], acc["twin"]
    nbytes = lambda f: sum(v.nbytes for v in f.values())  # noqa: E731
    assert ad.resident_bytes() == 0
    ad.feeds(ad.check({"style": 0.8}))
    assert ad.resident_bytes() == nbytes(fs) + 4 * sum(rs.values())
    ad.feeds(ad.check({"style": 0.5}))
    assert ad.resident_bytes() == nbytes(fs) + 2 * 4 * sum(rs.values())
    ad.feeds(ad.check({"style": 0.5, "twin": 1.0}))
    both = set(rs) & set(rp)
    assert both, "the fixture's adapters must share layers for this test"
    concatenated = sum(fs[k + p].nbytes + fp[k + p].nbytes for k in both for p in (".A", ".B"))
    s_pair = 4 * (sum(rs.values()) + sum(rp.values()))
    expected = nbytes(fs) + nbytes(fp) + 2 * 4 * sum(rs.values()) + concatenated + s_pair
    assert ad.resident_bytes() == expected
    ad.feeds(ad.check({"style": 0.5, "twin": 0.7}))  # the same set at other weights: only new s vectors
    assert ad.resident_bytes() == expected + s_pair


def test_a_set_is_never_concatenated_twice(twin_entry, monkeypatch):
    """A set dropped from the cache takes its choices with it: a later choice of the same set concatenates once."""
    from lcm_export.runtime import adapters as rt

    monkeypatch.setattr(rt, "CACHE", 1)
    ad = rt.Adapters(twin_entry, LCMPipeline.from_engine_dir(twin_entry).manifest)
    ad.feeds(ad.check({"style": 0.8, "twin": 0.5}))
    with_pair = ad.resident_bytes()
    ad.feeds(ad.check({"style": 0.8}))  # another set: the pair's set (and its choice) leave the cache
    ad.feeds(ad.check({"style": 0.8, "twin": 0.6}))  # the pair again: concatenated once more, the old copy gone
    assert ad.resident_bytes() == with_pair


def test_an_adapter_removed_between_check_and_call_is_a_one_line_error(base_dir, loras, tmp_path):
    from lcm_export.adapters.index import add_adapter, remove_adapter
    from lcm_export.errors import UserError
    from lcm_export.runtime.adapters import Adapters

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "style")
    ad = Adapters(d, json.loads((d / "manifest.json").read_text()))
    choice = ad.check({"style": 0.8})
    remove_adapter(d, "style")
    with pytest.raises(UserError, match="unknown adapter 'style': it was removed"):
        ad.feeds(choice)


def test_an_entry_with_older_adapter_branches_is_rebuilt_and_keeps_its_adapters(base_dir, loras, tmp_path, capsys):
    """Branches written before the per-rank weight input (adapters version 1): one line that says to rebuild; a
    rebuild with the same flags (no --force needed) keeps the adapters, whose factors fit as they are."""
    from lcm_export.adapters.index import add_adapter

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "style")
    m = json.loads((d / "manifest.json").read_text())
    m["adapters"]["version"] = 1
    for comp, rows in m["adapters"]["branches"].items():
        for r in rows:
            r["inputs"] = r["inputs"][:2]
    (d / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()  # the build's progress bars
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "written by an older lcm-export" in err and "damaged" not in err
    assert err.strip().splitlines() == [err.strip()]
    r = _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    assert not r.reused and "adapters kept: style" in r.summary()
    pipe = LCMPipeline.from_engine_dir(d)
    assert pipe.manifest["adapters"]["version"] == 2
    assert not np.array_equal(_image(pipe, adapters={"style": 0.8}), _image(pipe))


@needs_openvino
def test_openvino_bf16_adapter_equals_fresh_build(base_dir, loras, tmp_path):
    from lcm_export._cpu import native_bf16
    from lcm_export.adapters.index import add_adapter

    precision = "bf16" if native_bf16() else "fp32"
    _build(base_dir, tmp_path / "a", [f"{loras['lcm']}:1.0"], "openvino", precision, adapters=True)
    add_adapter(tmp_path / "a", loras["style"], "style")
    _build(base_dir, tmp_path / "f", [f"{loras['lcm']}:1.0", f"{loras['style']}:0.8"], "openvino", precision)
    ours = _image(LCMPipeline.from_engine_dir(tmp_path / "a"), adapters={"style": 0.8})
    fused = _image(LCMPipeline.from_engine_dir(tmp_path / "f"))
    assert psnr(ours, fused) >= 40
    # static shapes (generate's default): no adapter runs the IR with its branches cut out; with adapters the
    # branches keep a free rank, so a switch between adapters compiles nothing
    add_adapter(tmp_path / "a", loras["pixel"], "pixel")
    static, dynamic = (LCMPipeline.from_engine_dir(tmp_path / "a", shapes=s) for s in ("static", "dynamic"))
    unet = static.engines["unet"]["*"]
    factors = lambda: [n for i in unet.compiled.inputs for n in i.get_names() if n.startswith("adapter.")]  # noqa: E731
    plain = _image(static)
    assert factors() == [] and psnr(plain, _image(dynamic)) >= 50  # the branches are gone, the image is the same
    strong = {"style": 4.0, "pixel": 2.0}  # an effect well above bf16's rounding
    styled, want = _image(static, adapters=strong), _image(dynamic, adapters=strong)
    assert factors() and psnr(styled, want) >= psnr(plain, want) + 10
    compiled = unet.compiled
    assert psnr(_image(static, adapters={"style": 0.8}), ours) >= 40 and unet.compiled is compiled
    assert psnr(_image(static), plain) >= 60 and factors() == []  # none again: the plain IR again
    # an IR whose branches are not where the build wrote them: nothing is cut, the branches run at rank 0
    odd = shutil.copytree(tmp_path / "a", tmp_path / "odd")
    xml = odd / "unet" / "openvino_model.xml"
    text = xml.read_text()
    assert text.count('name="/adapter/unet/0/Add"') == 1
    xml.write_text(text.replace('name="/adapter/unet/0/Add"', 'name="/adapter/unet/0/Sum"'))
    renamed = LCMPipeline.from_engine_dir(odd, shapes="static")
    assert psnr(_image(renamed), plain) >= 50
    assert [n for i in renamed.engines["unet"]["*"].compiled.inputs for n in i.get_names() if n.startswith("adapter.")]


def test_cli_add_list_generate_remove(entry, loras, tmp_path, capsys):
    code, out, err = run_cli(["adapter", "list", "--engine-dir", entry], capsys)
    assert code == 0 and "style" in out and "pixel" in out
    code, out, err = run_cli(["generate", "--engine-dir", entry, "--prompt", "a paper fox", "--adapter", "style:0.8",
                              "--adapter", "pixel:-0.5", "--out", tmp_path / "x.png"], capsys)
    assert code == 0, err
    from PIL import Image

    pipe = LCMPipeline.from_engine_dir(entry)
    want = pipe("a paper fox", adapters={"style": 0.8, "pixel": -0.5})[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(want))
    code, out, err = run_cli(["adapter", "add", "--engine-dir", entry, loras["style"], "--name", "extra"], capsys)
    assert code == 0 and "added adapter extra" in out
    code, out, err = run_cli(["adapter", "remove", "--engine-dir", entry, "extra"], capsys)
    assert code == 0 and not list((entry / "adapters").glob("extra*"))
    assert "extra" not in json.loads((entry / "adapters" / "index.json").read_text())["adapters"]


def _snapshot(d: Path) -> dict:
    """Every file and folder of an entry (a refused command must not even leave an empty folder or a lock file)."""
    return {p.relative_to(d): p.read_bytes() if p.is_file() else None for p in d.rglob("*")}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, loras):
    from safetensors.numpy import load_file, save_file

    d = tmp_path_factory.mktemp("bad")
    sd = load_file(str(loras["style"]))
    k = next(k for k in sd if k.endswith("lora_B.weight"))
    nan = dict(sd)
    nan[k] = np.full_like(sd[k], np.nan)
    save_file(nan, str(d / "nan.safetensors"))
    sdxl = d / "sdxl"
    from lcm_export.sources.demo import build_demo_pipeline, write_demo_loras

    other = write_demo_loras(build_demo_pipeline("sdxl"), sdxl, "sdxl")[1][0]
    return {"nan": d / "nan.safetensors", "sdxl": other}


@pytest.mark.parametrize("case, args, needle", [
    ("locon 3x3", lambda l, b: [l["lcm"]], "3x3 convolution, which run-time adapters cannot change"),
    ("nan factors", lambda l, b: [b["nan"]], "NaN or inf"),
    ("another family", lambda l, b: [b["sdxl"]], "layers match a module of the base model; is it for another model family?"),
    ("bad name", lambda l, b: [l["style"], "--name", "../x"], "adapter name"),
    ("name taken", lambda l, b: [l["style"], "--name", "style"], "already holds an adapter named 'style'"),
    ("missing file", lambda l, b: [Path("/nonexistent.safetensors")], "not found"),
])
def test_add_refusals(entry, loras, bad_files, capsys, case, args, needle):
    before = _snapshot(entry)
    code, out, err = run_cli(["adapter", "add", "--engine-dir", entry, *args(loras, bad_files)], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and needle in err, err
    assert _snapshot(entry) == before


def test_add_refused_on_an_entry_without_branches(fresh, loras, capsys):
    code, _, err = run_cli(["adapter", "add", "--engine-dir", fresh["none"], loras["style"]], capsys)
    assert code == 2 and "has no adapter branches" in err and not (fresh["none"] / "adapters").exists()


@pytest.mark.parametrize("choice, needle", [
    ({"nope": 1.0}, "unknown adapter 'nope'"),
    ({"style": float("nan")}, "weight nan"),
    ({"style": 9.0}, "from -8 to 8"),
    ({"style": True}, "weight True"),
    (["style"], "must be a mapping"),
])
def test_call_refusals(entry, choice, needle):
    from lcm_export.errors import UserError

    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        LCMPipeline.from_engine_dir(entry)("x", adapters=choice)


def test_generate_refusals_are_one_line(entry, fresh, tmp_path, capsys):
    for args, needle in ((["--engine-dir", entry, "--adapter", "style:abc"], "is not a number"),
                         (["--engine-dir", entry, "--adapter", "style", "--adapter", "style:0.5"], "given twice"),
                         (["--engine-dir", fresh["none"], "--adapter", "style"], "takes no run-time adapters")):
        code, _, err = run_cli(["generate", *args, "--prompt", "x", "--out", tmp_path / "y.png"], capsys)
        assert code == 2 and err.strip().splitlines() == [err.strip()] and needle in err, err
        assert not (tmp_path / "y.png").exists()


def test_factors_changed_on_disk_are_refused(base_dir, loras, tmp_path, capsys):
    from lcm_export.adapters.index import add_adapter

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "style")
    f = d / json.loads((d / "adapters" / "index.json").read_text())["adapters"]["style"]["factors"]
    blob = bytearray(f.read_bytes())
    blob[-5] ^= 0x01
    f.write_bytes(bytes(blob))
    capsys.readouterr()
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--adapter", "style", "--out", tmp_path / "y.png"], capsys)
    assert code == 2 and "changed since it was added" in err and err.strip().splitlines() == [err.strip()]
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--out", tmp_path / "z.png"], capsys)
    assert code == 0  # the entry itself still works without that adapter


def test_applying_an_adapter_is_lean(entry, tmp_path):
    code = (
        "import sys, json\n"
        "import lcm_export.runtime as rt\n"
        f"pipe = rt.LCMPipeline.from_engine_dir({str(entry)!r})\n"
        "pipe('a photo', steps=2, adapters={'style': 0.8, 'pixel': 0.3})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'peft'))))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_adapters_survive_a_refit_and_a_rebuild_with_the_same_branches(base_dir, loras, tmp_path):
    from lcm_export.adapters.index import add_adapter, read_index

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "style")
    refit = _build(base_dir, d, [f"{loras['lcm']}:0.5"], adapters=True)  # a λ change: refit, files linked over
    assert refit.refit and set(read_index(d)) == {"style"}
    rebuilt = build_engine(BuildOptions(base=str(base_dir), loras=(f"{loras['lcm']}:0.5",), resolutions=((64, 64), (64, 96)),
                                        engine_dir=str(d), backend="onnxruntime", adapters=True, show_progress=False))
    assert not rebuilt.refit and "adapters kept: style" in rebuilt.summary()
    pipe = LCMPipeline.from_engine_dir(d)
    assert not np.array_equal(_image(pipe, adapters={"style": 0.8}), _image(pipe))
    plain = build_engine(BuildOptions(base=str(base_dir), loras=(f"{loras['lcm']}:0.5",), resolutions=((64, 64),),
                                      engine_dir=str(d), backend="onnxruntime", show_progress=False))
    assert "adapters dropped (style)" in plain.summary() and not (d / "adapters").exists()


def test_full_disk_during_add_is_one_line_and_leaves_the_entry_as_it_was(entry, loras, small_disk, capsys):
    """The entry on a small disk with no room for the factors: the one-line disk error, the index unchanged."""
    import shutil

    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    disk = small_disk(size + 64 * 1024)
    d = disk / "e"
    shutil.copytree(entry, d)
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - 8 * 1024, 0))  # leave less room than the factors need
    before = _snapshot(d)
    code, _, err = run_cli(["adapter", "add", "--engine-dir", d, loras["pixel"], "--name", "pixel2"], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "no space left" in err.lower(), err
    assert _snapshot(d) == before and not list((d / "adapters").glob(".pixel2*"))


@pytest.mark.parametrize("damage, needle", [
    (lambda m: m.update(adapters={"branches": []}), "adapters.branches is missing or not an object"),
    (lambda m: m["adapters"]["branches"]["unet"][0].pop("in"), "adapters.branches.unet[0] is malformed"),
    (lambda m: m["adapters"]["branches"]["unet"][0].update(kind="conv3x3"), "adapters.branches.unet[0] is malformed"),
    (lambda m: m["adapters"].update(configs={"unet": "../x.json"}), "adapters.configs is missing or malformed"),
    (lambda m: m["adapters"]["branches"].update(vae_encoder=[]), "names a component 'vae_encoder'"),
])
def test_a_damaged_adapters_section_is_one_line(entry, tmp_path, capsys, damage, needle):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(entry, d)
    m = json.loads((d / "manifest.json").read_text())
    damage(m)
    (d / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--out", tmp_path / "y.png"], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "damaged entry" in err and needle in err, err


@pytest.mark.parametrize("index, needle", [
    ("not json", "is unreadable"),
    (json.dumps({"version": 9, "adapters": {}}), "not an adapter index of this lcm-export"),
    (json.dumps({"version": 1, "adapters": {"a": {"factors": "x", "bytes": "12"}}}), "record of adapter 'a' is malformed"),
    (json.dumps({"version": 1, "adapters": {"a": {"factors": "../../etc/passwd", "bytes": 1, "sha256": "x", "ranks": [],
                                                  "layers": {}, "source": {}}}}), "record of adapter 'a' is malformed"),
])
def test_a_damaged_index_is_one_line(entry, tmp_path, capsys, index, needle):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(entry, d)
    (d / "adapters" / "index.json").write_text(index)
    for args in (["generate", "--engine-dir", d, "--prompt", "x", "--adapter", "a", "--out", tmp_path / "y.png"],
                 ["adapter", "list", "--engine-dir", d]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.strip().splitlines() == [err.strip()] and needle in err, err


def test_a_running_pipeline_sees_adapters_added_replaced_and_removed(base_dir, loras, tmp_path):
    """The index is re-read when it changes (a server need not restart); replaced factors are read again."""
    from lcm_export.adapters.index import add_adapter, remove_adapter
    from lcm_export.errors import UserError

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    add_adapter(d, loras["style"], "s")
    pipe = LCMPipeline.from_engine_dir(d)
    first = _image(pipe, adapters={"s": 0.8})
    add_adapter(d, loras["pixel"], "p")  # added while the pipeline is loaded
    assert not np.array_equal(_image(pipe, adapters={"p": 0.8}), first)
    add_adapter(d, loras["pixel"], "s", force=True)  # "s" now holds other factors
    assert np.array_equal(_image(pipe, adapters={"s": 0.8}), _image(pipe, adapters={"p": 0.8}))
    assert len(list((d / "adapters").glob("s-*"))) == 1  # the replaced folder is gone
    remove_adapter(d, "p")
    with pytest.raises(UserError, match="unknown adapter 'p'"):
        pipe("x", adapters={"p": 0.8})


def test_remove_refusals_write_nothing(entry, capsys):
    before = _snapshot(entry)
    code, _, err = run_cli(["adapter", "remove", "--engine-dir", entry, "nope"], capsys)
    assert code == 2 and "holds no adapter named 'nope'" in err and _snapshot(entry) == before


def test_a_first_refused_add_leaves_no_adapter_folder(base_dir, loras, tmp_path, capsys):
    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    before = _snapshot(d)
    code, _, err = run_cli(["adapter", "add", "--engine-dir", d, loras["lcm"]], capsys)  # 3x3 convs: refused
    assert code == 2 and _snapshot(d) == before and not (d / "adapters").exists()


def test_adapters_are_refused_off_the_cpu(base_dir, loras, tmp_path, monkeypatch, capsys):
    from lcm_export import backends

    monkeypatch.setattr(backends, "choose", lambda *a, **k: backends.Choice("onnxruntime", "cuda", "fp16"))
    code, _, err = run_cli(["build-engine", "--base", base_dir, "--resolution", "64x64", "--adapters",
                            "--engine-dir", tmp_path / "e", "--quiet"], capsys)
    assert code == 2 and "verified on CPU entries only, not on cuda" in err and not (tmp_path / "e").exists()


def test_a_weight_that_would_overflow_is_refused(base_dir, loras, tmp_path, capsys):
    """Finite factors so large that the branch product would overflow float32: a one-line input error, not a 500."""
    from safetensors.numpy import load_file, save_file

    from lcm_export.adapters.index import add_adapter

    d = tmp_path / "e"
    _build(base_dir, d, [f"{loras['lcm']}:1.0"], adapters=True)
    sd = load_file(str(loras["style"]))
    huge = tmp_path / "huge.safetensors"
    # large enough that weight 1 overflows (the demo style LoRA's bound is ~5.5; x 1e12 is past MAX_GAIN), small enough
    # that weights up to ~0.2 work: `add` takes it, the call with weight 1 is refused
    save_file({k: (v * np.float32(1e12) if k.endswith("lora_B.weight") else v) for k, v in sd.items()}, str(huge))
    add_adapter(d, huge, "huge")
    capsys.readouterr()  # the build's progress bars
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--adapter", "huge:1", "--out", tmp_path / "y.png"], capsys)
    assert code == 2 and "would overflow float32" in err and err.strip().splitlines() == [err.strip()], err
    code, _, err = run_cli(["generate", "--engine-dir", d, "--prompt", "x", "--adapter", "huge:0.01", "--out", tmp_path / "z.png"],
                           capsys)
    assert code == 0, err
    # factors no weight could use (x 1e33): refused at `add`, naming the file (issue 26)
    worse = tmp_path / "worse.safetensors"
    save_file({k: (v * np.float32(1e33) if k.endswith("lora_B.weight") else v) for k, v in sd.items()}, str(worse))
    code, _, err = run_cli(["adapter", "add", "--engine-dir", d, worse], capsys)
    assert code == 2 and "worse.safetensors" in err and "no call could use it" in err, err
