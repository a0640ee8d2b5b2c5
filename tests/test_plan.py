"""The build plan: every decision made before anything heavy runs, and ``build-engine --dry-run`` printing it."""

import json

import pytest

from lcm_export.builder.plan import BuildOptions, format_plan, make_plan
from lcm_export.errors import UserError

from conftest import RESOLUTIONS, run_cli


def _opts(base_dir, demo_loras, engine_dir, **kw):
    return BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=RESOLUTIONS,
                        engine_dir=str(engine_dir), backend="onnxruntime", show_progress=False, **kw)


def test_plan_of_an_up_to_date_entry_reuses_it(demo_engine, base_dir, demo_loras):
    plan = make_plan(_opts(base_dir, demo_loras, demo_engine))
    manifest = json.loads((demo_engine / "manifest.json").read_text())
    assert plan.action == "reuse"
    assert plan.key == manifest["cache_key"] and plan.keys["graph_key"] == manifest["graph_key"]
    assert plan.existing["cache_key"] == manifest["cache_key"]
    assert (plan.backend, plan.device, plan.precision) == ("onnxruntime", "cpu", manifest["precision"])
    assert [f"{p.opt_hw[0]}x{p.opt_hw[1]}" for p in plan.plans] == manifest["resolutions"]


def test_plan_decides_refit_or_full_build(demo_engine, base_dir, demo_loras):
    (p0, w0), rest = demo_loras[0], demo_loras[1:]
    other_weight = [(p0, w0 / 2), *rest]
    plan = make_plan(_opts(base_dir, other_weight, demo_engine))
    assert plan.action == "refit" and plan.refit_blocker is None  # same graph, other λ
    assert plan.keys["graph_key"] == json.loads((demo_engine / "manifest.json").read_text())["graph_key"]
    forced = make_plan(_opts(base_dir, other_weight, demo_engine, force=True))
    assert forced.action == "build" and forced.refit_blocker is None and forced.existing is None
    resized = make_plan(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras),
                                     resolutions=((64, 64),), engine_dir=str(demo_engine), backend="onnxruntime"))
    assert resized.action == "build" and "resolutions or shape plans" in resized.refit_blocker


def test_plan_refuses_bad_options_before_loading(tmp_path, base_dir, demo_loras):
    with pytest.raises(UserError, match="--threads 0"):
        make_plan(_opts(base_dir, demo_loras, tmp_path / "x", threads=0))
    assert not (tmp_path / "x").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, base_dir, demo_loras, demo_engine, capsys):
    target = tmp_path / "new-entry"
    args = ["build-engine", "--base", base_dir, *[x for p, w in demo_loras for x in ("--lora", f"{p}:{w}")],
            "--resolution", "64x64", "--backend", "onnxruntime", "--dry-run"]
    code, out, err = run_cli([*args, "--engine-dir", target], capsys)
    assert code == 0, err
    assert not target.exists()
    rows = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and not line.startswith(" "))
    assert rows["entry"].strip() == str(target)
    assert rows["action"].strip() == "full build"
    assert rows["engine"].startswith("onnxruntime on cpu")
    assert out.count("\nlora ") == len(demo_loras)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in demo_engine.rglob("*"))
    code, out, err = run_cli(["build-engine", "--base", base_dir, *[x for p, w in demo_loras for x in ("--lora", f"{p}:{w}")],
                              *[x for h, w in RESOLUTIONS for x in ("--resolution", f"{h}x{w}")], "--backend", "onnxruntime",
                              "--engine-dir", demo_engine, "--dry-run"], capsys)
    assert code == 0, err
    assert "reuse: the entry there is up to date" in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in demo_engine.rglob("*")) == before


def test_format_plan_names_every_decision(tmp_path, base_dir, demo_loras):
    text = format_plan(make_plan(_opts(base_dir, demo_loras, tmp_path / "e", preset="quality")))
    for row in ("entry", "action", "base", "preset", "engine", "shapes", "batch", "vae decoder", "adapters", "threads", "lora", "keys"):
        assert any(line.startswith(row + " ") for line in text.splitlines()), row
