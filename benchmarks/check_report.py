"""Validate a bench report folder: no failed row (a baseline or cold start that errored fails the report),
report.json against the schema, ratios from medians, each path's FLOP/s share
against the peak of its own precision, skipped baselines and peaks with their reason, report.md and PNGs.

Usage: python benchmarks/check_report.py REPORT_DIR   (exit 1 with the reason on failure)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
from PIL import Image

import lcm_export


def check(d: Path) -> None:
    r = json.loads((d / "report.json").read_text())
    failed = [f"{f['row']}: {f['error']}" for f in r.get("failures", [])]
    assert not failed, f"the run failed ({len(failed)} row(s)): " + "; ".join(failed)
    schema = json.loads((Path(lcm_export.__file__).parent / "data" / "bench_report.schema.json").read_text())
    jsonschema.validate(r, schema)
    eng = r["paths"]["engine"]["stages"]
    for base, ratios in r["ratios"].items():
        for stage, value in ratios.items():
            want = r["paths"][base]["stages"][stage]["median_s"] / eng[stage]["median_s"]
            assert abs(value - want) <= 1e-9 * max(1, want), f"ratio {base}/{stage} is not median/median"
    f = r["flops"]
    for name, p in r["paths"].items():
        if "stages" not in p:
            assert name not in r["ratios"] and name not in f, f"{name} did not run but has ratios or FLOP/s"
            continue
        got = f[name]
        assert got["precision"] == p["precision"], f"{name}: FLOP/s precision is not the path's"
        want = got["flops_per_s"] / f["peaks"][got["precision"]]["best_flops_per_s"]
        assert abs(got["fraction_of_peak"] - want) <= 1e-9 * max(1, want), f"{name}: share is not of its own precision's peak"
    md = (d / "report.md").read_text()
    assert md.startswith("# lcm-export benchmark")
    for name, p in r["paths"].items():
        if "skipped" in p:
            assert f"{p['label']} skipped:** {p['skipped']}" in md, f"report.md does not say why {name} was skipped"
    for prec, why in f.get("peaks_skipped", {}).items():
        assert prec not in f["peaks"], f"the {prec} peak is both measured and skipped"
        assert all(p["precision"] != prec for p in r["paths"].values() if "stages" in p), f"a {prec} path ran without its peak"
        assert f"- {prec}: not measured — {why}" in md, f"report.md does not say why the {prec} peak was not measured"
    for png in ("stages.png", "solvers.png"):
        with Image.open(d / png) as im:
            im.verify()


if __name__ == "__main__":
    try:
        check(Path(sys.argv[1]))
    except Exception as exc:
        print(f"report check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"report ok: {sys.argv[1]}")
