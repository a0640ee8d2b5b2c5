"""Entries and helpers for the serving tests: the tiny demo built by the CLI, at batch 1 and 4."""

from __future__ import annotations

import socket

import pytest


def _build(path, *extra):
    from lcm_export.cli import main

    rc = main(["build-engine", "--engine-dir", str(path), "--backend", "onnxruntime", "--resolution", "64x64", "--quiet", *extra])
    assert rc == 0, f"build-engine exited {rc}"
    return path


@pytest.fixture(scope="session")
def tiny_entry(tmp_path_factory, cache_env):
    """`lcm-export build-engine --engine-dir DIR --backend onnxruntime --resolution 64x64 --quiet`: demo:sd15 + its
    LoRAs, batch 1 (64x64 keeps a call at a few tens of ms; the default, 512x512, takes 2.5 s here)."""
    return _build(tmp_path_factory.mktemp("serve-entries") / "tiny")


@pytest.fixture(scope="session")
def batch4_entry(tmp_path_factory, cache_env):
    """The same at `--batch 4` (guidance auto: UNet at 4 and 8), so that requests can merge."""
    return _build(tmp_path_factory.mktemp("serve-entries") / "tiny-b4", "--batch", "4")


@pytest.fixture(scope="session")
def adapter_entry(tmp_path_factory, cache_env):
    """The batch-4 entry with adapter branches (`--adapters`), holding adapters "a" (the demo style LoRA) and "b"
    (the same layers with other values)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from lcm_export.adapters.index import add_adapter
    from lcm_export.sources.demo import demo_lora_dir, demo_lora_paths

    d = _build(tmp_path_factory.mktemp("serve-entries") / "tiny-adapters", "--batch", "4", "--adapters")
    style = demo_lora_paths(demo_lora_dir(), "sd15")[1][0]
    other = d.parent / "b.safetensors"
    rng = np.random.default_rng(3)
    save_file({k: (v * rng.uniform(0.5, 1.5)).astype(v.dtype) for k, v in load_file(str(style)).items()}, str(other),
              metadata=dict(safe_open(str(style), "np").metadata() or {}))
    add_adapter(d, style, "a")
    add_adapter(d, other, "b")
    return d


@pytest.fixture(scope="session")
def nan_entry(tmp_path_factory, tiny_entry):
    """A copy of the tiny entry whose UNet has NaN in its largest weight, rewritten in place (same file
    size, so the entry still loads): every call fails inside the engine — the server's 500 path."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    d = tmp_path_factory.mktemp("serve-entries") / "nan"
    shutil.copytree(tiny_entry, d)
    path = d / "unet" / "model.onnx"
    model = onnx.load(str(path))
    init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.raw_data),
               key=lambda i: len(i.raw_data))
    old = init.raw_data
    blob = path.read_bytes()
    assert blob.count(old) == 1
    nan = np.full(numpy_helper.to_array(init).shape, np.nan, np.float32).tobytes()
    path.write_bytes(blob.replace(old, nan))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_png(engine_dir, out, prompt, seed, steps=4, guidance=1.0, negative_prompt=None, batch=1, resolution=None,
                 adapters=None):
    """What `lcm-export generate` writes for these arguments (run in-process): the PNG files' bytes."""
    from lcm_export.cli import main

    args = ["generate", "--engine-dir", str(engine_dir), "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
            "--guidance", str(guidance), "--batch", str(batch), "--out", str(out)]
    for name, weight in (adapters or {}).items():
        args += ["--adapter", f"{name}:{weight}"]
    if negative_prompt is not None:
        args += ["--negative-prompt", negative_prompt]
    if resolution:
        args += ["--resolution", resolution]
    assert main(args) == 0
    if batch == 1:
        return [out.read_bytes()]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}").read_bytes() for i in range(batch)]
