"""`lcm-export export`: ONNX files per component, documented I/O, parity recorded."""

from __future__ import annotations

import json

import onnx

from conftest import run_cli


def test_export_cli(tmp_path, base_dir, capsys):
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(["export", "--model", base_dir, "--out", out, "--resolution", "64x96", "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads((out / "export.json").read_text())
    io = {"text_encoder": (["input_ids"], ["last_hidden_state"]),
          "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
          "vae_decoder": (["latent"], ["images"])}
    for comp, (ins, outs) in io.items():
        m = onnx.load(str(out / comp / "model.onnx"))
        assert [i.name for i in m.graph.input] == ins and [o.name for o in m.graph.output] == outs
        assert rec["components"][comp]["parity"][0]["rel_l2"] <= 1e-4
        assert comp in stdout
    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", 4, "h", "w"]  # dynamic batch and spatial axes
    code, _, err = run_cli(["export", "--model", base_dir, "--out", out, "--quiet"], capsys)
    assert code == 2 and "already exists" in err


def test_the_store_knows_each_familys_components():
    """The manifest schema requires exactly the components export writes for each family (issue 19: an
    entry without its UNet got past the schema and ended in a KeyError at generate time)."""
    from lcm_export.sources.demo import build_demo_pipeline
    from lcm_export.builder.export import components_for
    from lcm_export.sources.models import SUPPORTED_FAMILIES
    from lcm_export.store.manifest import FAMILY_COMPONENTS

    assert set(FAMILY_COMPONENTS) == set(SUPPORTED_FAMILIES)
    for family in SUPPORTED_FAMILIES:
        assert components_for(build_demo_pipeline(family)) == FAMILY_COMPONENTS[family], family
