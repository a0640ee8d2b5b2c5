"""Shared fixtures: one tiny SD 1.5-architecture base model per test session (seeded, offline)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def demo_pipe():
    from lcm_export.demo import build_demo_pipeline

    return build_demo_pipeline("sd15")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, demo_pipe):
    """The tiny demo model saved as a local diffusers folder (a real `--base FOLDER`)."""
    d = tmp_path_factory.mktemp("base") / "tiny-sd15"
    demo_pipe.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """A private cache folder for the demo LoRAs, so tests never touch ~/.cache."""
    d = tmp_path_factory.mktemp("cache")
    os.environ["LCM_EXPORT_CACHE"] = str(d)
    return d


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from lcm_export.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


PY = sys.executable
