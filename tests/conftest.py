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
    from lcm_export.sources.demo import build_demo_pipeline

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


def _openvino_status() -> tuple[bool, str]:
    from lcm_export.backends import openvino

    ok, _, why = openvino.status()
    return ok, why


OV_OK, OV_WHY = _openvino_status()
needs_openvino = pytest.mark.skipif(not OV_OK, reason=f"needs OpenVINO: {OV_WHY}")
"""For tests that build or run OpenVINO entries: skipped, with the backend's own reason, where it is not installed."""


@pytest.fixture(scope="session")
def demo_loras(tmp_path_factory, demo_pipe):
    """The demo's two LoRAs (kohya LoCon 'LCM-LoRA', PEFT style LoRA) with their default λ."""
    from lcm_export.sources.demo import write_demo_loras

    return write_demo_loras(demo_pipe, tmp_path_factory.mktemp("demo-loras"))


RESOLUTIONS = ((64, 64), (64, 96))


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory, base_dir, demo_loras):
    """An ONNX Runtime entry for the tiny model + two LoRAs at two resolutions (one non-square)."""
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    d = tmp_path_factory.mktemp("engines") / "tiny"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras),
                              resolutions=RESOLUTIONS, engine_dir=str(d), backend="onnxruntime", show_progress=False))
    return d


@pytest.fixture(scope="session")
def fused_pipe(tmp_path_factory, base_dir, demo_loras):
    """The same fusion done by `fuse`, loaded back with diffusers: the PyTorch reference."""
    from diffusers import StableDiffusionPipeline

    from lcm_export.builder.fuse import LoraSpec, fuse

    out = tmp_path_factory.mktemp("fused") / "model"
    fuse(str(base_dir), [LoraSpec(p, w) for p, w in demo_loras], out, show_progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ov_engine(tmp_path_factory, base_dir, demo_loras):
    """An OpenVINO fp32 entry of the same model (the IR per component), at one resolution."""
    from lcm_export.builder.build_engine import BuildOptions, build_engine

    d = tmp_path_factory.mktemp("engines") / "tiny-ov"
    build_engine(BuildOptions(base=str(base_dir), loras=tuple(f"{p}:{w}" for p, w in demo_loras), resolutions=((64, 64),),
                              engine_dir=str(d), backend="openvino", precision="fp32", show_progress=False))
    return d


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(bytes)`` -> a folder on a tmpfs of that size (unmounted afterwards): a disk that fills
    up. Skips, saying why, where mounting is impossible (not root, no tmpfs)."""
    import subprocess

    mounts = []

    def mount(size: int):
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(size // 1024, 64)}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def subprocess_cli(args, env_drop=("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"), timeout=300, **kw):
    """The CLI in a fresh process, as a user runs it (stderr at the file-descriptor level, libraries' logging
    at their defaults): a CompletedProcess with bytes stdout/stderr."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([PY, "-m", "lcm_export.cli", *argv], env=env, capture_output=True, timeout=timeout, **kw)
