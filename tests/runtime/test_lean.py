"""The runtime is lean by construction: no torch, diffusers or transformers after a generate call."""

from __future__ import annotations

import json
import subprocess

from conftest import PY


def test_runtime_imports_no_heavy_packages(demo_engine):
    code = (
        "import sys, json\n"
        "import lcm_export.runtime as rt\n"
        f"pipe = rt.LCMPipeline.from_engine_dir({str(demo_engine)!r})\n"
        "imgs = pipe('a photo', steps=2)\n"
        "assert imgs[0].size == (64, 64)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'peft'))))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_generate_cli_is_lean_too(demo_engine, tmp_path):
    code = (
        "import sys, json\n"
        "from lcm_export.cli import main\n"
        f"rc = main(['generate', '--engine-dir', {str(demo_engine)!r}, '--prompt', 'x', '--out', {str(tmp_path / 'a.png')!r}])\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))]))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [0, []]
    assert (tmp_path / "a.png").stat().st_size > 0
