"""The bad-input catalogue (issue 11): one row per way a user, a file or the machine can go wrong.

Every CLI error row asserts the same guarantees (README, "What bad input gets"): the expected exit
code (2 for bad input), one line on stderr that starts with ``error:`` and names what to fix, no
traceback, nothing left behind (no ``.partial-``/``.old-`` folders, no output), and the existing
entry byte-for-byte intact. Rows marked "repair" must instead succeed and leave a sound entry.
Python API rows assert a ``UserError`` naming the argument, before any engine runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTIONS, run_cli
from lcm_export.errors import EngineError, UserError

WT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers

def snapshot(d: Path) -> dict | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


class Ctx:
    def __init__(self, tmp: Path, demo_engine: Path, base_dir: Path, demo_loras):
        self.tmp, self._engine, self.base, self.loras = tmp, demo_engine, base_dir, demo_loras
        self.entry = tmp / "entry"
        self.out = tmp / "out"
        self.png = tmp / "o.png"

    def copy_entry(self) -> Path:
        shutil.copytree(self._engine, self.entry)
        return self.entry

    def manifest(self, edit) -> Path:
        """Copy the entry and apply ``edit`` to its manifest (a dict -> dict function)."""
        self.copy_entry()
        p = self.entry / "manifest.json"
        m = edit(json.loads(p.read_text()))
        p.write_text(m if isinstance(m, str) else json.dumps(m))
        return self.entry

    def lora(self, kind: str) -> Path:
        """The demo PEFT style LoRA with one tensor poisoned (nan / inf), or truncated / renamed."""
        import torch
        from safetensors.torch import load_file, save_file

        src = self.loras[1][0]
        dst = self.tmp / f"{kind}.safetensors"
        if kind == "truncated":
            dst.write_bytes(src.read_bytes()[:100])
            return dst
        if kind == "pickle":
            dst = self.tmp / "lora.ckpt"
            dst.write_bytes(b"\x80\x04")
            return dst
        sd = load_file(str(src))
        key = sorted(k for k in sd if "lora_B" in k)[0]
        sd[key] = torch.full_like(sd[key], {"nan": float("nan"), "inf": float("inf")}[kind])
        save_file(sd, str(dst))
        return dst

    def base_with_unet_config(self, edit) -> Path:
        d = self.tmp / "base"
        shutil.copytree(self.base, d)
        p = d / "unet" / "config.json"
        p.write_text(json.dumps(edit(json.loads(p.read_text()))))
        return d

    def a_file(self) -> Path:
        f = self.tmp / "a-file"
        f.write_text("not a folder")
        return f

    def dead_pid(self) -> int:
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        return p.pid


def _truncate(d: Path, rel: str = "unet/model.onnx") -> None:
    f = d / rel
    f.write_bytes(f.read_bytes()[:5000])


def _gen(entry, ctx, *extra):
    return ["generate", "--engine-dir", entry, "--prompt", "x", "--out", ctx.png, *extra]


def _build(ctx, *extra):
    return ["build-engine", "--quiet", "--backend", "onnxruntime", *extra]


def _del(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _set(key, value):
    return lambda m: {**m, key: value}


def _comp(edit):
    def f(m):
        edit(m["components"]["unet"])
        return m
    return f


# ------------------------------------------------------------------------------------------------
# CLI rows: (id, setup(ctx) -> argv, env, exit code, needles that the one error line must hold)

CLI_ROWS = [
    # -- integrity of the engine store: refused at load time (repair on build: test_damaged_entry_is_rebuilt)
    ("store-truncated-file", lambda c: (_truncate(c.copy_entry()), _gen(c.entry, c))[1], {}, 2,
     ["unet/model.onnx", "corrupt or truncated", "--force"]),
    ("store-missing-file", lambda c: ((c.copy_entry() / "vae_decoder" / "model.onnx").unlink(), _gen(c.entry, c))[1], {}, 2,
     ["vae_decoder/model.onnx is missing"]),
    ("store-missing-tokenizer", lambda c: ((c.copy_entry() / "tokenizer" / "tokenizer.json").unlink(), _gen(c.entry, c))[1], {}, 2,
     ["tokenizer/tokenizer.json is missing"]),
    ("store-grown-file", lambda c: ((c.copy_entry() / "unet" / "model.onnx").open("ab").write(b"x"), _gen(c.entry, c))[1], {}, 2,
     ["unet/model.onnx", "corrupt or truncated"]),
    ("store-schema-99", lambda c: _gen(c.manifest(_set("schema_version", 99)), c), {}, 2, ["schema version 99", "rebuild"]),
    ("store-no-components (case 10)", lambda c: _gen(c.manifest(_del("components")), c), {}, 2, ["no 'components'"]),
    ("store-empty-components", lambda c: _gen(c.manifest(_set("components", {})), c), {}, 2, ["'components' is malformed"]),
    ("store-resolutions-banana (case 11)", lambda c: _gen(c.manifest(_set("resolutions", ["banana"])), c), {}, 2,
     ["'resolutions' is malformed", "banana"]),
    ("store-no-file-sizes", lambda c: _gen(c.manifest(_del("file_sizes")), c), {}, 2, ["no 'file_sizes'"]),
    ("store-plan-malformed", lambda c: _gen(c.manifest(lambda m: {**m, "shape_plans": [{"name": "x"}]}), c), {}, 2,
     ["shape_plans[0]", "min_hw"]),
    ("store-files-escape", lambda c: _gen(c.manifest(_comp(lambda u: u.update(files=["../../etc/passwd"]))), c), {}, 2,
     ["'unet'", "'files'"]),
    ("store-engines-missing", lambda c: _gen(c.manifest(_comp(lambda u: u.pop("engines"))), c), {}, 2, ["'engines'"]),
    ("store-vae-no-scaling", lambda c: _gen(c.manifest(_set("vae", {})), c), {}, 2, ["'vae' is malformed"]),
    ("store-not-json", lambda c: _gen(c.manifest(lambda m: "{not json"), c), {}, 2, ["not valid JSON"]),
    ("store-json-list", lambda c: _gen(c.manifest(lambda m: "[]"), c), {}, 2, ["schema version None"]),
    ("store-inspect-no-components", lambda c: ["inspect", c.manifest(_del("components"))], {}, 2, ["no 'components'"]),
    ("store-build-over-damaged-other", lambda c: _build(c, "--base", "demo:sd15", "--resolution", "64x64", "--engine-dir",
                                                          c.manifest(_del("base_source"))), {}, 2, ["damaged manifest", "--force"]),
    ("store-build-over-other-model", lambda c: _build(c, "--base", "demo:sd15", "--resolution", "64x64", "--engine-dir",
                                                        c.copy_entry()), {}, 2, ["another model", "--force"]),
    # -- LoRA content
    ("lora-nan-fuse (case 4)", lambda c: ["fuse", "--base", "demo:sd15", "--lora", c.lora("nan"), "--out", c.out, "--quiet"], {}, 2,
     ["nan.safetensors", "lora_B", "NaN or inf"]),
    ("lora-nan-build (case 5)", lambda c: _build(c, "--base", c.base, "--lora", c.lora("nan"), "--resolution", "64x64",
                                                   "--engine-dir", c.out), {}, 2, ["nan.safetensors", "lora_B", "NaN or inf"]),
    ("lora-inf-fuse (case 6)", lambda c: ["fuse", "--base", "demo:sd15", "--lora", c.lora("inf"), "--out", c.out, "--quiet"], {}, 2,
     ["inf.safetensors", "NaN or inf"]),
    ("lora-inf-build", lambda c: _build(c, "--base", c.base, "--lora", c.lora("inf"), "--resolution", "64x64",
                                          "--engine-dir", c.out), {}, 2, ["inf.safetensors", "NaN or inf"]),
    ("lora-huge-lambda-fuse (case 7)", lambda c: ["fuse", "--base", "demo:sd15", "--lora", f"{c.loras[1][0]}:1e30",
                                                   "--out", c.out, "--quiet"], {}, 2, ["λ=1e+30", "layer", "smaller λ"]),
    ("lora-huge-lambda-build-over-entry", lambda c: _build(c, "--base", c.base, "--lora", f"{c.loras[1][0]}:1e30",
                                                             "--resolution", "64x64", "--engine-dir", c.copy_entry(), "--force"),
     {}, 2, ["λ=1e+30", "layer", "smaller λ"]),
    ("lora-lambda-nan", lambda c: ["fuse", "--base", "demo:sd15", "--lora", f"{c.loras[1][0]}:nan", "--out", c.out], {}, 2,
     ["finite"]),
    ("lora-lambda-text", lambda c: ["fuse", "--base", "demo:sd15", "--lora", f"{c.loras[1][0]}:abc", "--out", c.out], {}, 2,
     ["not a number"]),
    ("lora-truncated", lambda c: ["fuse", "--base", "demo:sd15", "--lora", c.lora("truncated"), "--out", c.out], {}, 2,
     ["not a valid safetensors"]),
    ("lora-pickle", lambda c: ["fuse", "--base", "demo:sd15", "--lora", c.lora("pickle"), "--out", c.out], {}, 2, ["pickle"]),
    # -- limits
    ("limit-huge-resolution (case 8)", lambda c: _build(c, "--resolution", "99984x99984", "--engine-dir", c.out), {}, 2,
     ["99984x99984", "4096"]),
    ("limit-memory", lambda c: _build(c, "--resolution", "4096x4096", "--engine-dir", c.out), {}, 2, ["GiB", "smaller --resolution"]),
    ("limit-huge-dynamic", lambda c: _build(c, "--dynamic", "64x64-8192x8192", "--engine-dir", c.out), {}, 2, ["4096"]),
    ("limit-export-huge", lambda c: ["export", "--model", "demo:sd15", "--resolution", "99984x99984", "--out", c.out], {}, 2,
     ["4096"]),
    ("limit-huge-over-entry", lambda c: _build(c, "--base", c.base, "--resolution", "99984x99984", "--engine-dir", c.copy_entry(),
                                                 "--force"), {}, 2, ["4096"]),
    # -- validation that raised tracebacks
    ("base-config-lacks-keys (case 9)", lambda c: _build(c, "--base", c.base_with_unet_config(_del("block_out_channels")),
                                                           "--resolution", "64x64", "--engine-dir", c.out), {}, 2,
     ["config.json", "block_out_channels"]),
    ("base-config-not-object", lambda c: ["fuse", "--base", c.base_with_unet_config(lambda m: [1, 2]), "--out", c.out], {}, 2,
     ["not a JSON object"]),
    ("base-config-bad-blocks", lambda c: _build(c, "--base", c.base_with_unet_config(_set("block_out_channels", "wide")),
                                                  "--engine-dir", c.out), {}, 2, ["block_out_channels"]),
    ("generate-seed-negative (case 12)", lambda c: _gen(c.copy_entry(), c, "--seed", "-1"), {}, 2, ["seed -1", ">= 0"]),
    ("engine-dir-is-file-build (case 13)", lambda c: _build(c, "--resolution", "64x64", "--engine-dir", c.a_file()), {}, 2,
     ["is a file"]),
    ("engine-dir-is-file-generate", lambda c: _gen(c.a_file(), c), {}, 2, ["is a file"]),
    ("engine-dir-under-file", lambda c: _build(c, "--resolution", "64x64", "--engine-dir", c.a_file() / "e"), {}, 2,
     ["is a file"]),
    ("inspect-file", lambda c: ["inspect", c.a_file()], {}, 2, ["is a file"]),
    ("fuse-out-is-file", lambda c: ["fuse", "--base", "demo:sd15", "--out", c.a_file(), "--force"], {}, 2, ["is a file"]),
    ("generate-out-under-file", lambda c: ["generate", "--engine-dir", c.copy_entry(), "--prompt", "x", "--out",
                                           c.a_file() / "o.png"], {}, 2, ["is a file"]),
    ("generate-out-is-folder", lambda c: (c.png.mkdir(), _gen(c.copy_entry(), c))[1], {}, 2, ["is a folder"]),
    ("threads-env-text (case 14)", lambda c: _gen(c.copy_entry(), c), {"LCM_EXPORT_THREADS": "abc"}, 2, ["LCM_EXPORT_THREADS"]),
    ("threads-env-zero", lambda c: _gen(c.copy_entry(), c), {"LCM_EXPORT_THREADS": "0"}, 2, ["LCM_EXPORT_THREADS"]),
    ("threads-flag-zero", lambda c: _build(c, "--resolution", "64x64", "--threads", "0", "--engine-dir", c.out), {}, 2,
     ["--threads 0"]),
    ("export-missing-model (case 16)", lambda c: ["export", "--model", "/missing", "--out", c.out], {}, 2, ["--model"]),
    ("export-out-exists", lambda c: (c.out.mkdir(), ["export", "--model", "demo:sd15", "--out", c.out])[1], {}, 2,
     ["already exists"]),
    ("build-unsupported-multiple", lambda c: _build(c, "--resolution", "72x64", "--engine-dir", c.out), {}, 2, ["multiples of 16"]),
]


@pytest.fixture
def ctx(tmp_path, demo_engine, base_dir, demo_loras):
    return Ctx(tmp_path, demo_engine, base_dir, demo_loras)


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_catalogue(row, ctx, capsys, monkeypatch):
    _, setup, env, want_code, needles = row
    argv = setup(ctx)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = snapshot(ctx.entry)
    outputs_before = {p for p in (ctx.out, ctx.png) if p.exists()}
    code, out, err = run_cli(argv, capsys)
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not leftovers(ctx.tmp), leftovers(ctx.tmp)
    assert {p for p in (ctx.out, ctx.png) if p.exists()} == outputs_before
    assert snapshot(ctx.entry) == before  # the existing entry, byte for byte


def test_catalogue_covers_every_case():
    """The issue's cases 1-26 each have a row (or a named test below); more rows than cases."""
    assert len(CLI_ROWS) + len(API_ROWS) > 26 * 2


# ------------------------------------------------------------------------------------------------
# repair: a damaged entry of the same model is rebuilt, never reported up to date (cases 1-3)

def _same_build(ctx, *extra):
    loras = [a for p, w in ctx.loras for a in ("--lora", f"{p}:{w}")]
    res = [a for h, w in RESOLUTIONS for a in ("--resolution", f"{h}x{w}")]
    return _build(ctx, "--base", ctx.base, *loras, *res, "--engine-dir", ctx.entry, *extra)


@pytest.mark.parametrize("damage,extra", [
    ("truncate", ["--force"]),       # case 1: --force after truncation
    ("truncate", []),                # the up-to-date check itself sees the size
    ("schema-99", []),               # case 2
    ("no-components", ["--force"]),  # case 3
], ids=["case1-truncate-force", "truncate", "case2-schema-99", "case3-no-components"])
def test_damaged_entry_is_rebuilt(ctx, capsys, damage, extra):
    from lcm_export.store import file_problems, manifest_problems

    if damage == "truncate":
        _truncate(ctx.copy_entry())
    elif damage == "schema-99":
        ctx.manifest(_set("schema_version", 99))
    else:
        ctx.manifest(_del("components"))
    code, out, err = run_cli(_same_build(ctx, *extra), capsys)
    assert code == 0, err
    assert "built in" in out and "up to date" not in out
    m = json.loads((ctx.entry / "manifest.json").read_text())
    assert manifest_problems(m) == [] and file_problems(m, ctx.entry) == []
    assert not leftovers(ctx.tmp)


def test_force_rebuilds_an_up_to_date_entry(ctx, capsys):
    ctx.copy_entry()
    code, out, _ = run_cli(_same_build(ctx), capsys)
    assert code == 0 and "up to date" in out
    code, out, _ = run_cli(_same_build(ctx, "--force"), capsys)
    assert code == 0 and "built in" in out


# ------------------------------------------------------------------------------------------------
# faults: partials of dead builds (case 17), SIGTERM / SIGINT (case 18), a closed pipe (case 15)

def test_dead_builds_partials_are_removed(ctx, capsys):
    dead, live = ctx.dead_pid(), os.getpid()
    stale = ctx.tmp / f".out.partial-{dead}-abc123"
    stale_old = ctx.tmp / f".out.old-{dead}"
    alive = ctx.tmp / f".out.partial-{os.getppid()}-xyz"
    for d in (stale, stale_old, alive):
        d.mkdir()
        (d / "junk").write_text("x")
    assert live != dead
    code, _, err = run_cli(["fuse", "--base", "demo:sd15", "--out", ctx.out, "--quiet"], capsys)
    assert code == 0, err
    assert not stale.exists() and not stale_old.exists()
    assert alive.exists()  # a live process's build is not touched
    assert (ctx.out / "fusion.json").is_file()


def _run_and_signal(ctx, sig) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(WT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lcm_export.cli", *_build(ctx, "--base", ctx.base, "--resolution", "64x64",
                                                           "--engine-dir", ctx.tmp / "E")]
    p = subprocess.Popen([str(a) for a in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(ctx.tmp.glob(".E.partial-*")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the build ended before it could be signalled"
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["case18-sigterm", "sigint"])
def test_signal_during_build_leaves_nothing(ctx, sig, code, word):
    r = _run_and_signal(ctx, sig)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {word}; nothing half-written was kept"
    assert not leftovers(ctx.tmp) and not (ctx.tmp / "E").exists()


def test_closed_stdout_pipe_is_quiet(demo_engine):
    """case 15: `lcm-export inspect DIR | true`: no BrokenPipeError traceback, exit 0."""
    env = {**os.environ, "PYTHONPATH": str(WT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m lcm_export.cli inspect "{demo_engine}" | (exec 0<&-; true); '
                        'echo "rc=${PIPESTATUS[0]}" >&2'], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "rc=0", r.stderr


# ------------------------------------------------------------------------------------------------
# Python API rows (cases 19-26 and more): a UserError naming the argument, before any engine runs

NAN = np.full((1, 4, 8, 8), np.nan, np.float32)
OK = np.zeros((1, 4, 8, 8), np.float32)

API_ROWS = [
    ("seed-negative (case 19)", {"seed": -1}, "seed -1"),
    ("seed-text (case 20)", {"seed": "abc"}, "seed 'abc'"),
    ("seed-float", {"seed": 1.5}, "seed 1.5"),
    ("seed-bool", {"seed": True}, "seed True"),
    ("latents-list (case 21)", {"latents": OK.tolist()}, "latents must be a numpy array"),
    ("latents-nan (case 22)", {"latents": NAN}, "latents holds NaN or inf"),
    ("latents-inf", {"latents": np.full_like(OK, np.inf)}, "latents holds NaN or inf"),
    ("latents-shape", {"latents": np.zeros((1, 4, 9, 8), np.float32)}, "latents shape (1, 4, 9, 8)"),
    ("latents-strings", {"latents": np.full((1, 4, 8, 8), "a")}, "not numeric"),
    ("step-noise-shape (case 23)", {"step_noise": [np.zeros((1, 4, 4, 4), np.float32)] * 3}, "step_noise[0] shape"),
    ("step-noise-scalars (case 24)", {"step_noise": [0, 0, 0]}, "step_noise[0] must be a numpy array"),
    ("step-noise-nan", {"step_noise": [OK, NAN, OK]}, "step_noise[1] holds NaN"),
    ("step-noise-short", {"step_noise": [OK]}, "3 arrays needed"),
    ("step-noise-not-list", {"step_noise": 5}, "step_noise must be a list"),
    ("height-text (case 25)", {"height": "64", "width": "64"}, "must be whole numbers"),
    ("height-float", {"height": 64.0, "width": 64.0}, "must be whole numbers"),
    ("height-only", {"height": 64}, "both height and width"),
    ("negative-prompt-int (case 26)", {"negative_prompt": 123}, "negative_prompt must be a string"),
    ("prompt-none", {"prompt": None}, "prompt must be a string"),
    ("prompt-list-length", {"prompt": ["a", "b"]}, "a list of 2 prompts for batch 1"),
    ("prompt-list-non-str", {"prompt": ["a", 3], "batch": 2}, "a list of prompts must hold strings only"),
    ("steps-bool", {"steps": True}, "steps True"),
    ("steps-float", {"steps": 4.0}, "steps 4.0"),
    ("guidance-text", {"guidance": "2"}, "guidance '2'"),
    ("guidance-inf", {"guidance": float("inf")}, "finite number"),
    ("batch-float", {"batch": 1.5}, "batch 1.5"),
    ("output-type", {"output_type": "jpg"}, "output_type 'jpg'"),
    ("resolution-not-built", {"height": 128, "width": 128}, "was not built"),
]


@pytest.fixture(scope="module")
def runtime(demo_engine):
    from lcm_export.runtime import LCMPipeline

    return LCMPipeline.from_engine_dir(demo_engine)


@pytest.mark.parametrize("row", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_api_catalogue(row, runtime, monkeypatch):
    _, kwargs, needle = row
    from lcm_export.backends import onnxruntime as ort_backend

    def no_engine(*a, **k):
        raise AssertionError("an engine ran before the arguments were checked")

    monkeypatch.setattr(ort_backend.OrtEngine, "run", no_engine)
    monkeypatch.setattr(ort_backend.OrtEngine, "run_all", no_engine, raising=False)
    kwargs = {"prompt": "x", **kwargs}
    with pytest.raises(UserError) as info:
        runtime(**kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_numpy_integers_are_accepted(runtime):
    img = runtime("x", seed=np.int64(3), height=np.int64(64), width=np.int32(64), steps=np.int64(1), output_type="np")
    assert img.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------------------
# dynamic plans need the UNet's multiple, not just 8 (found by reading)

def test_dynamic_plan_needs_the_unet_multiple(ctx):
    from lcm_export.runtime import LCMPipeline
    from lcm_export.store import record_file_sizes

    def dyn(m):
        m["shape_plans"] = [{**m["shape_plans"][0], "min_hw": [64, 64], "opt_hw": [64, 64], "max_hw": [128, 128], "static": False}]
        return m

    entry = ctx.manifest(dyn)
    pipe = LCMPipeline.from_engine_dir(entry)
    assert pipe.manifest["size_multiple"] == 16
    with pytest.raises(UserError, match="multiples of 16"):
        pipe("x", height=72, width=64)  # a multiple of 8 inside the range: refused before the engine
    img = pipe("x", height=80, width=64, steps=1, output_type="np")  # a multiple of 16 inside the range: runs
    assert img.shape == (1, 80, 64, 3)


# ------------------------------------------------------------------------------------------------
# the error split, and images readable like any other file

def test_engine_failures_are_not_user_errors():
    from lcm_export.runtime import NonFiniteOutput

    assert issubclass(NonFiniteOutput, EngineError) and not issubclass(NonFiniteOutput, UserError)
    assert not issubclass(EngineError, UserError) and not issubclass(UserError, EngineError)


def test_engine_error_exits_1(monkeypatch, capsys, tmp_path):
    from lcm_export import cli

    def boom(a):
        raise EngineError("the unet engine produced NaN/inf")

    monkeypatch.setattr(cli, "_dispatch", boom)
    code, _, err = run_cli(["inspect", tmp_path], capsys)
    assert code == 1 and err == "error: the unet engine produced NaN/inf\n"


def test_png_mode_follows_umask(demo_engine, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(["generate", "--engine-dir", demo_engine, "--prompt", "x", "--steps", "1",
                                "--out", tmp_path / "img.png"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "img.png").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_write_text_is_atomic(tmp_path, monkeypatch):
    from lcm_export import _util

    p = tmp_path / "report.md"
    p.write_text("old")
    monkeypatch.setattr(_util.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        _util.write_text(p, "new")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["report.md"]
