"""Validate a bench report folder: report.json against the schema, ratios from medians, report.md and PNGs.

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
    schema = json.loads((Path(lcm_export.__file__).parent / "data" / "bench_report.schema.json").read_text())
    jsonschema.validate(r, schema)
    eng = r["paths"]["engine"]["stages"]
    for base, ratios in r["ratios"].items():
        for stage, value in ratios.items():
            want = r["paths"][base]["stages"][stage]["median_s"] / eng[stage]["median_s"]
            assert abs(value - want) <= 1e-9 * max(1, want), f"ratio {base}/{stage} is not median/median"
    assert (d / "report.md").read_text().startswith("# lcm-export benchmark")
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
