"""Fusion against independent math: W = W0 + Σ λ_i·(alpha_i/r_i)·B_i·A_i, computed here in float64.

The LoRA files are written by this test in each format (kohya LoCon with alpha != rank, kohya with
SGM block names, PEFT with and without adapter metadata / prefixes, a kohya text-encoder LoRA);
the expected deltas come from the test's own module list, never from diffusers' key conversion.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from conftest import PY, run_cli

# module name in the diffusers UNet <-> its name in the SGM/LDM UNet, for the tiny demo config
# (layers_per_block=2, 2 down blocks, 3 layers per up block). Written out by hand from the
# SGM layout, independently of diffusers' converter.
SGM_NAMES = {
    "down_blocks.0.attentions.0.proj_in": "input_blocks_1_1_proj_in",
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block_1_transformer_blocks_0_attn2_to_k",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "up_blocks.1.resnets.0.conv_shortcut": "output_blocks_3_0_skip_connection",
    "up_blocks.1.attentions.1.proj_out": "output_blocks_4_1_proj_out",
}
KOHYA_UNET = [  # LoCon: linear, 3x3 and 1x1 convs, proj_in/out, time_emb_proj, up/downsamplers
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.resnets.0.conv2",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.attentions.2.proj_out",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
]
PEFT_UNET = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # overlaps the kohya LoRA on purpose
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
]
TE = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


def _rand(gen, *shape):
    return (torch.randn(*shape, generator=gen) * 0.2).contiguous()


def _factors(mod, rank, gen):
    """(down/A, up/B) for a Linear or Conv2d module, LoCon-style for convs."""
    if isinstance(mod, torch.nn.Conv2d):
        kh, kw = mod.kernel_size
        return _rand(gen, rank, mod.in_channels, kh, kw), _rand(gen, mod.out_channels, rank, 1, 1)
    return _rand(gen, rank, mod.in_features), _rand(gen, mod.out_features, rank)


def _delta(down, up, scale, shape):
    """The LoRA delta in float64, written from the definition: scale · B @ A (convs flattened)."""
    return (scale * (up.double().flatten(1) @ down.double().flatten(1))).reshape(shape)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, demo_pipe):
    """Write one LoRA per format; return {name: (path, {component: {module: delta}})}."""
    d = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(7)
    unet_mods = dict(demo_pipe.unet.named_modules())
    te_mods = dict(demo_pipe.text_encoder.named_modules())
    if "text_model.encoder" not in te_mods:  # transformers >= 5 drops the text_model. level
        te_mods.update({f"text_model.{k}": v for k, v in list(te_mods.items())})
    files = {}

    # 1. kohya LoCon, diffusers module naming, alpha (3) != rank (4)
    sd, deltas, rank, alpha = {}, {}, 4, 3.0
    for name in KOHYA_UNET:
        down, up = _factors(unet_mods[name], rank, gen)
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        deltas[name] = _delta(down, up, alpha / rank, unet_mods[name].weight.shape)
    save_file(sd, d / "kohya_locon.safetensors")
    files["kohya_locon"] = (d / "kohya_locon.safetensors", {"unet": deltas})

    # 2. kohya with SGM (input_blocks_…) names, alpha 8 != rank 2
    sd, deltas, rank, alpha = {}, {}, 2, 8.0
    for name, sgm in SGM_NAMES.items():
        down, up = _factors(unet_mods[name], rank, gen)
        key = "lora_unet_" + sgm
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        deltas[name] = _delta(down, up, alpha / rank, unet_mods[name].weight.shape)
    save_file(sd, d / "kohya_sgm.safetensors")
    files["kohya_sgm"] = (d / "kohya_sgm.safetensors", {"unet": deltas})

    # 3. PEFT with unet./text_encoder. prefixes and adapter metadata: lora_alpha 6, r 3 -> scale 2
    sd, du, dt, rank = {}, {}, {}, 3
    for name in PEFT_UNET:
        a, b = _factors(unet_mods[name], rank, gen)
        sd.update({f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b})
        du[name] = _delta(a, b, 2.0, unet_mods[name].weight.shape)
    for name in TE:
        a, b = _factors(te_mods[name], rank, gen)
        sd.update({f"text_encoder.{name}.lora_A.weight": a, f"text_encoder.{name}.lora_B.weight": b})
        dt[name] = _delta(a, b, 2.0, te_mods[name].weight.shape)
    meta = {"unet.r": rank, "unet.lora_alpha": 6, "unet.target_modules": ["to_q", "to_out.0", "to_k"],
            "text_encoder.r": rank, "text_encoder.lora_alpha": 6, "text_encoder.target_modules": ["q_proj", "fc1"]}
    save_file(sd, d / "peft_meta.safetensors", metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    files["peft_meta"] = (d / "peft_meta.safetensors", {"unet": du, "text_encoder": dt})

    # 4. PEFT without metadata and without prefixes (alpha defaults to rank: scale 1)
    sd, du, rank = {}, {}, 2
    for name in PEFT_UNET[1:]:
        a, b = _factors(unet_mods[name], rank, gen)
        sd.update({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b})
        du[name] = _delta(a, b, 1.0, unet_mods[name].weight.shape)
    save_file(sd, d / "peft_plain.safetensors")
    files["peft_plain"] = (d / "peft_plain.safetensors", {"unet": du})

    # 5. kohya text-encoder LoRA (lora_te_), alpha 1 != rank 4
    sd, dt, rank, alpha = {}, {}, 4, 1.0
    for name in TE:
        down, up = _factors(te_mods[name], rank, gen)
        key = "lora_te_" + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        dt[name] = _delta(down, up, alpha / rank, te_mods[name].weight.shape)
    save_file(sd, d / "kohya_te.safetensors")
    files["kohya_te"] = (d / "kohya_te.safetensors", {"text_encoder": dt})
    return files


PAIRS = [("kohya_locon", "peft_meta"), ("kohya_sgm", "kohya_te"), ("peft_plain", "kohya_locon")]


@pytest.mark.parametrize("weights", [(1.0, 0.8), (1.0, -0.5)], ids=["w1.0_0.8", "w1.0_-0.5"])
@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_fused_weights_match_independent_math(tmp_path, base_dir, lora_files, pair, weights, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "fused"
    args = ["fuse", "--base", base_dir, "--out", out, "--quiet"]
    for name, w in zip(pair, weights):
        args += ["--lora", f"{lora_files[name][0]}:{w}"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err

    base = DiffusionPipeline.from_pretrained(str(base_dir))
    fused = DiffusionPipeline.from_pretrained(str(out))  # plain diffusers folder loads
    for comp in ("unet", "text_encoder", "vae"):
        w0 = getattr(base, comp).state_dict()
        w1 = getattr(fused, comp).state_dict()
        assert list(w0) == list(w1), f"{comp}: state-dict keys differ from the base"
        expected = {}
        for name, w in zip(pair, weights):
            for mod, delta in lora_files[name][1].get(comp, {}).items():
                expected[mod + ".weight"] = expected.get(mod + ".weight", 0) + w * delta
        expected = {_model_key(k, w0): v for k, v in expected.items()}
        for key in w0:
            if key in expected:
                want = w0[key].double() + expected[key]
                got = w1[key].double()
                rel = ((got - want).norm() / want.norm()).item()
                assert rel <= 1e-6, f"{comp}.{key}: rel err {rel:.2e}"
                rel_delta = ((got - w0[key].double()) - expected[key]).norm() / expected[key].norm()
                assert rel_delta <= 1e-5, f"{comp}.{key}: delta rel err {rel_delta:.2e}"
            else:
                assert torch.equal(w0[key], w1[key]), f"{comp}.{key} changed but no LoRA touches it"

    rec = json.loads((out / "fusion.json").read_text())
    assert rec["family"] == "sd15"
    assert set(rec["base"]["files"]) >= {"unet/diffusion_pytorch_model.safetensors"}
    for entry, name, w in zip(rec["loras"], pair, weights):
        assert entry["weight"] == w
        want_layers = {c: len(m) for c, m in lora_files[name][1].items()}
        assert entry["layers"] == want_layers
        assert len(entry["sha256"]) == 64


def test_detected_formats_and_ranks(lora_files):
    from lcm_export.builder.fuse import inspect_lora

    got = {n: inspect_lora(p) for n, (p, _) in lora_files.items()}
    assert got["kohya_locon"].format == "kohya+locon" and got["kohya_locon"].ranks == [4]
    assert got["kohya_locon"].alphas == [3.0]
    assert got["kohya_sgm"].format == "kohya-sgm+locon" and got["kohya_sgm"].sgm
    assert got["peft_meta"].format == "peft" and got["peft_meta"].has_metadata
    assert got["peft_plain"].format == "peft" and not got["peft_plain"].prefixed
    assert got["kohya_te"].n_layers == {"text_encoder": 2}


def test_lora_weight_parsing():
    from lcm_export.errors import UserError
    from lcm_export.builder.fuse import LoraSpec

    assert LoraSpec.parse("a.safetensors").weight == 1.0
    assert LoraSpec.parse("dir/a.safetensors:-0.5").weight == -0.5
    assert LoraSpec.parse("a.safetensors:1.5e0").weight == 1.5
    with pytest.raises(UserError, match="not a number"):
        LoraSpec.parse("a.safetensors:strong")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem, exit != 0, no partial output folder


def _sdxl_like_lora(path, demo_pipe):
    """An SDXL-shaped LoRA: same module names as SD 1.5, SDXL's 2048-wide cross-attention."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    sd = {f"unet.{name}.lora_A.weight": torch.ones(4, 2048), f"unet.{name}.lora_B.weight": torch.ones(32, 4)}
    save_file(sd, path)


def _model_key(key, state_dict):
    """Files name text-encoder modules text_model.…; transformers >= 5 state dicts drop that level."""
    return key if key in state_dict or not key.startswith("text_model.") else key[len("text_model."):]


def _bad_cases(tmp_path, demo_pipe, lora_files):
    good = lora_files["kohya_locon"][0]
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[:200])
    notsafe = tmp_path / "notes.safetensors"
    notsafe.write_text("this is not a safetensors file\n")
    pickle = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, pickle)
    sdxl = tmp_path / "sdxl_lora.safetensors"
    _sdxl_like_lora(sdxl, demo_pipe)
    nomatch = tmp_path / "nomatch.safetensors"
    save_file({"lora_unet_no_such_block_proj.lora_down.weight": torch.ones(2, 8),
               "lora_unet_no_such_block_proj.lora_up.weight": torch.ones(8, 2)}, nomatch)
    return {
        "missing": ([tmp_path / "nope.safetensors"], "not found"),
        "truncated": ([trunc], "not a valid safetensors"),
        "not-safetensors": ([notsafe], "not a valid safetensors"),
        "pickle": ([pickle], "pickle"),
        "shape-mismatch": ([sdxl], "don't match the base"),
        "no-match": ([nomatch], "0 layers touched"),
        "bad-weight": ([f"{good}:heavy"], "not a number"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not-safetensors", "pickle", "shape-mismatch", "no-match", "bad-weight"])
def test_bad_lora_is_one_line_error(tmp_path, base_dir, demo_pipe, lora_files, case, capsys):
    loras, needle = _bad_cases(tmp_path, demo_pipe, lora_files)[case]
    out = tmp_path / "out"
    args = ["fuse", "--base", base_dir, "--out", out, "--quiet"]
    for l in loras:
        args += ["--lora", l]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err
    if case not in ("bad-weight",):
        assert str(loras[0]).split(":")[0] in lines[0] or "nope" in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_out_exists_refused_unless_force(tmp_path, base_dir, lora_files, capsys):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    lora = lora_files["kohya_te"][0]
    # a folder lcm-export did not write (no fusion.json): refused, even with --force (issue 26: --force replaces
    # only what the writer made), and left as it was
    for force in ([], ["--force"]):
        code, _, err = run_cli(["fuse", "--base", base_dir, "--lora", lora, "--out", out, "--quiet", *force], capsys)
        assert code == 2 and "holds files lcm-export did not write" in err and err.count("\n") == 1, err
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder is taken
    code, _, err = run_cli(["fuse", "--base", base_dir, "--lora", lora, "--out", out, "--quiet", "--force"], capsys)
    assert code == 0, err
    (out / "keep.txt").write_text("x")  # an earlier output of fuse: refused without --force, replaced with it
    code, _, err = run_cli(["fuse", "--base", base_dir, "--lora", lora, "--out", out, "--quiet"], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").exists()
    code, _, err = run_cli(["fuse", "--base", base_dir, "--lora", lora, "--out", out, "--quiet", "--force"], capsys)
    assert code == 0, err
    assert (out / "fusion.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("base,needle", [("demo:nope", "unknown demo model"), ("./no/such/folder", "no such folder")])
def test_unknown_base(tmp_path, base, needle, capsys):
    code, _, err = run_cli(["fuse", "--base", base, "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_hub_id_offline_cache_miss_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = run_cli(["fuse", "--base", "nobody/no-such-model", "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and "Hugging Face Hub" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_unsupported_family_rejected_not_mishandled(tmp_path, base_dir, capsys):
    import shutil

    sd2 = tmp_path / "fake-sd2"
    shutil.copytree(base_dir, sd2)
    cfg = json.loads((sd2 / "unet" / "config.json").read_text())
    cfg.update(cross_attention_dim=1024)
    (sd2 / "unet" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["fuse", "--base", sd2, "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and "SD 2.x" in err and "not supported yet" in err


def test_family_detection():
    from lcm_export.sources.demo import demo_configs
    from lcm_export.sources.models import detect_family

    assert detect_family(demo_configs("sd15-full", 0)["unet"]) == "sd15"
    assert detect_family(demo_configs("sdxl-full", 0)["unet"]) == "sdxl"
    assert detect_family(demo_configs("sdxl", 0)["unet"]) == "sdxl"
    assert detect_family(demo_configs("ssd1b", 0)["unet"]) == "ssd1b"
    assert detect_family({**demo_configs("sdxl-full", 0)["unet"], "transformer_layers_per_block": [1, 2, 4]}) == "ssd1b"


def test_cli_process_exit_code_and_no_traceback(tmp_path, base_dir):
    """The real console entry point: non-zero exit, one line on stderr, no traceback."""
    r = subprocess.run([PY, "-m", "lcm_export.cli", "fuse", "--base", str(base_dir), "--lora",
                        str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: LoRA file {tmp_path / 'missing.safetensors'}: not found"]
