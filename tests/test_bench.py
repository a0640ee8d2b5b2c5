"""`lcm-export bench` on the tiny model: report.json against a schema, report.md, valid PNGs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from conftest import run_cli

SCHEMA = json.loads((Path(__file__).parents[1] / "lcm_export" / "data" / "bench_report.schema.json").read_text())


@pytest.fixture(scope="module")
def report_dir(demo_engine, tmp_path_factory):
    from lcm_export.cli import main

    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--engine-dir", str(demo_engine), "--runs", "2", "--warmup", "1", "--solvers", "lcm:2,ddim:3,dpm:2,dpmpp:2",
                 "--resolution", "64x96", "--guidance", "2.0", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_report_json_schema_and_ratios(report_dir):
    r = json.loads((report_dir / "report.json").read_text())
    jsonschema.validate(r, SCHEMA)
    assert r["resolution"] == "64x96" and r["guidance"] == 2.0
    eng, eager = r["paths"]["engine"]["stages"], r["paths"]["eager"]["stages"]
    for s in ("text_encoder", "unet_step", "vae_decoder", "end_to_end"):
        assert r["ratios"]["eager"][s] == pytest.approx(eager[s]["median_s"] / eng[s]["median_s"])
        assert eng[s]["p90_s"] >= eng[s]["median_s"]
    assert eng["unet_step"]["n"] == 2 * 4  # every step of every timed run
    assert [(s["solver"], s["steps"]) for s in r["solvers"]] == [
        ("LCMScheduler", 2), ("DDIMScheduler", 3), ("DPMSolver", 2), ("DPMSolver++", 2), ("LCMScheduler", 4)]
    assert r["flops"]["unet_batch"] == 2  # guidance 2.0: UNet at 2B
    assert r["cold_start"]["engine"]["torch_loaded"] is False
    assert r["flops"]["engine"]["flops_per_s"] == pytest.approx(r["flops"]["unet_step_flops"] / eng["unet_step"]["median_s"])


def test_report_md_and_charts(report_dir):
    md = (report_dir / "report.md").read_text()
    for needle in ("Latency per stage", "Speed-up", "Solver comparison", "Cold start", "GFLOP/s"):
        assert needle in md
    for name in ("stages.png", "solvers.png"):
        with Image.open(report_dir / name) as im:
            im.verify()
            assert im.format == "PNG"


@pytest.mark.parametrize("args,needle", [
    (["--solvers", "euler:4"], "unknown solver"), (["--solvers", "ddim:0"], "positive integer"),
    (["--solvers", "ddim:x"], "positive integer"), (["--runs", "0"], "at least 1"),
    (["--baselines", "jit"], "unknown"), (["--resolution", "512x512"], "was not built"),
])
def test_bad_input(demo_engine, tmp_path, capsys, args, needle):
    code, _, err = run_cli(["bench", "--engine-dir", demo_engine, "--out", tmp_path / "r", "--quiet", *args], capsys)
    assert code == 2 and needle in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


def test_engine_dir_without_manifest(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    code, _, err = run_cli(["bench", "--engine-dir", tmp_path / "e", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "no manifest.json" in err
