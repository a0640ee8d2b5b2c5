"""`lcm-export bench` on the tiny model: report.json against a schema, report.md, valid PNGs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

SCHEMA = json.loads((Path(__file__).parents[1] / "lcm_export" / "data" / "bench_report.schema.json").read_text())


UNET_CALLS: list[float] = []
"""Every UNet engine call of the bench run, timed independently by a wrapper around the backend."""
MEASUREMENTS: list[tuple[str, float]] = []
"""Every peak measurement and PyTorch baseline of the bench run, (what, seconds), timed independently."""
FEW_SECONDS = 8.0
"""The most one peak measurement or one baseline on the tiny demo (2 runs + 1 warm-up at 64x96) may take, on any CPU:
an emulated bf16 peak took 15+ minutes on an AMD EPYC Zen 3 (issue 32). The bench runs here on one thread: the tiny
demo gains nothing from more, and on cores other processes share, torch's threads wait on each other (tiny images
took 1-10 s each with 2 threads on 2 busy cores, 0.1-0.2 s with 1)."""
ZEN3 = {"avx2", "avx", "fma", "sse4_1"}  # AVX2 only: no AVX-512, no AVX512_BF16, no AMX
SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx2", "fma"}


def _timed_into(record: list, what, fn):
    """``fn`` wrapped: each call's wall time appended to ``record`` as (what(args, kwargs), seconds)."""
    import time

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record.append((what(a, k), time.perf_counter() - t0))

    return timed


@pytest.fixture(scope="module")
def report_dir(demo_engine, tmp_path_factory):
    import time

    from lcm_export.bench import harness as bench
    from lcm_export.bench import baselines as bench_torch
    from lcm_export.backends import onnxruntime as backend
    from lcm_export.cli import main

    real = backend.OrtEngine.run_all
    real_peak, real_torch = bench.measure_peak, bench_torch.time_torch

    def timed(self, feeds, names=None):
        t0 = time.perf_counter()
        out = real(self, feeds, names)
        if "sample" in feeds:
            UNET_CALLS.append(time.perf_counter() - t0)
        return out

    out = tmp_path_factory.mktemp("bench")
    backend.OrtEngine.run_all = timed
    bench.measure_peak = _timed_into(MEASUREMENTS, lambda a, k: f"{k.get('precision', 'fp32')} peak", real_peak)
    bench_torch.time_torch = _timed_into(MEASUREMENTS, lambda a, k: f"{str(next(a[0].unet.parameters()).dtype)} baseline", real_torch)
    try:
        code = main(["bench", "--engine-dir", str(demo_engine), "--runs", "2", "--warmup", "1", "--solvers", "lcm:2,ddim:3,dpm:2,dpmpp:2",
                     "--baselines", "eager,bf16,reduce-overhead", "--threads", "1",
                     "--resolution", "64x96", "--guidance", "2.0", "--out", str(out), "--quiet"])
    finally:
        backend.OrtEngine.run_all = real
        bench.measure_peak, bench_torch.time_torch = real_peak, real_torch
    assert code == 0
    return out


def _cpu_bf16() -> bool:
    """Whether bf16 runs natively where the bench runs: CUDA, or a CPU with AMX / AVX512_BF16."""
    import torch

    from lcm_export._cpu import native_bf16

    return torch.cuda.is_available() or native_bf16()


def test_peaks_and_baselines_take_seconds_not_minutes(report_dir):
    """Each peak measurement and each baseline of the tiny-demo bench, timed independently, took at most a few seconds:
    the issue-32 regression (an emulated bf16 peak: 15+ minutes on an AVX2-only CPU) cannot come back unnoticed.
    bf16 is timed only where it is native; elsewhere neither its baseline nor its peak ran."""
    r = json.loads((report_dir / "report.json").read_text())
    peaks = [w for w, _ in MEASUREMENTS if w.endswith("peak")]
    assert sorted(peaks) == sorted(f"{p} peak" for p in r["flops"]["peaks"])  # every peak the report has, measured once
    baselines = [w for w, _ in MEASUREMENTS if w.endswith("baseline")]
    assert len(baselines) == sum("stages" in r["paths"][b] for b in ("eager", "bf16", "reduce-overhead"))
    assert ("torch.bfloat16 baseline" in baselines) == ("bf16 peak" in peaks) == _cpu_bf16()
    slow = [(w, round(s, 1)) for w, s in MEASUREMENTS if s > FEW_SECONDS]
    assert not slow, f"took more than {FEW_SECONDS} s on the tiny demo: {slow}"
    for p in r["flops"]["peaks"].values():  # the report's own figure: the calibrated measurement, not a fixed 4096² product
        assert 0 < p["seconds"] <= FEW_SECONDS and 256 <= p["matrix_size"] <= 4096


def test_report_json_schema_and_ratios(report_dir):
    r = json.loads((report_dir / "report.json").read_text())
    jsonschema.validate(r, SCHEMA)
    assert r["resolution"] == "64x96" and r["guidance"] == 2.0
    from lcm_export._cpu import cpu_name, recorded_flags

    assert r["machine"]["cpu"] == cpu_name() and r["machine"]["flags"] == recorded_flags()  # which CPU, AMX or not
    assert f"- machine: {cpu_name()} ({' '.join(recorded_flags())})" in (report_dir / "report.md").read_text()
    eng, eager = r["paths"]["engine"]["stages"], r["paths"]["eager"]["stages"]
    # the engine's UNet figures against the calls timed independently (the last 2 runs x 4 steps;
    # the first 4 calls are the warm-up run): each reported step is its call plus a little bookkeeping
    timed = np.array(UNET_CALLS[-8:])
    assert len(UNET_CALLS) == (1 + 2) * 4 and eng["unet_step"]["n"] == 2 * 4  # every step of every timed run
    for key, want in (("median_s", np.median(timed)), ("p90_s", np.percentile(timed, 90)), ("min_s", timed.min())):
        assert want <= eng["unet_step"][key] <= want * 1.3 + 2e-3, (key, eng["unet_step"][key], want)
    ratio = r["ratios"]["eager"]["unet_step"]
    assert eager["unet_step"]["median_s"] / (np.median(timed) * 1.3 + 2e-3) <= ratio <= eager["unet_step"]["median_s"] / np.median(timed)
    for s in ("text_encoder", "vae_decoder", "end_to_end"):
        assert r["ratios"]["eager"][s] > 0 and eng[s]["min_s"] <= eng[s]["median_s"] <= eng[s]["p90_s"]
    assert eng["end_to_end"]["min_s"] >= 4 * timed.min()  # a whole run holds at least its 4 UNet calls
    assert [(s["solver"], s["steps"]) for s in r["solvers"]] == [
        ("LCMScheduler", 2), ("DDIMScheduler", 3), ("DPMSolver", 2), ("DPMSolver++", 2), ("LCMScheduler", 4)]
    assert r["flops"]["unet_batch"] == 2  # guidance 2.0: UNet at 2B
    assert r["cold_start"]["engine"]["torch_loaded"] is False
    assert r["flops"]["engine"]["flops_per_s"] == pytest.approx(r["flops"]["unet_step_flops"] / eng["unet_step"]["median_s"])


def test_baselines_bf16_and_cuda_graphs_for_this_device(report_dir):
    """bf16 (modules cast) ran where bf16 is native and is measured against the bf16 peak, and on a CPU without native
    bf16 is skipped with the reason, its peak not measured; eager runs in the device's native precision;
    reduce-overhead (CUDA graphs) ran where CUDA is, and elsewhere is skipped with its reason."""
    import subprocess
    import sys

    import torch

    cuda = torch.cuda.is_available()
    native = "fp16" if cuda else "fp32"
    r = json.loads((report_dir / "report.json").read_text())
    bf16, ro, eager = r["paths"]["bf16"], r["paths"]["reduce-overhead"], r["paths"]["eager"]
    assert bf16["precision"] == "bf16" and "bf16" in bf16["label"]
    assert eager["precision"] == native and f"{native} {'cuda' if cuda else 'cpu'}" in eager["label"]
    f = r["flops"]
    if not _cpu_bf16():  # an AVX2-only CPU, say: as the build refuses --precision bf16 there, bench does not time it
        from lcm_export.bench.baselines import NO_NATIVE_BF16

        assert bf16["skipped"] == NO_NATIVE_BF16 and "stages" not in bf16 and "bf16" not in r["ratios"]
        assert "bf16" not in f["peaks"] and f["peaks_skipped"] == {"bf16": NO_NATIVE_BF16} and "bf16" not in f
        assert set(f["peaks"]) == {"fp32"} and f["eager"]["fraction_of_peak"] == pytest.approx(
            f["eager"]["flops_per_s"] / f["peaks"]["fp32"]["best_flops_per_s"])
        return
    assert "stages" in bf16 and "bf16" in r["ratios"] and "peaks_skipped" not in f
    md = (report_dir / "report.md").read_text()
    if cuda:
        assert "stages" in ro and ro["precision"] == "fp16" and "reduce-overhead" in r["ratios"] and "skipped" not in ro
        assert f["reduce-overhead"]["fraction_of_peak"] == pytest.approx(
            f["reduce-overhead"]["flops_per_s"] / f["peaks"]["fp16"]["best_flops_per_s"])
        assert "skipped:**" not in md
    else:
        assert "skipped" in ro and "CUDA" in ro["skipped"] and "reduce-overhead" not in r["ratios"]
        assert "skipped:** needs a CUDA GPU" in md
    assert set(f["peaks"]) == {"fp32", "bf16", native} and f["peak"] == f["peaks"]["fp32"]
    assert all(pk["device"] == ("cuda" if cuda else "cpu") for pk in f["peaks"].values())
    assert f["bf16"]["fraction_of_peak"] == pytest.approx(f["bf16"]["flops_per_s"] / f["peaks"]["bf16"]["best_flops_per_s"])
    assert f["eager"]["fraction_of_peak"] == pytest.approx(f["eager"]["flops_per_s"] / f["peaks"][native]["best_flops_per_s"])
    assert r["paths"]["engine"]["precision"] == "fp32" and r["runtime_overhead_stub"]["resolution"] == "512x512"
    cold = r["cold_start"]["diffusers"]  # the same device and precision as the eager baseline
    assert cold["device"] == ("cuda" if cuda else "cpu") and cold["loaded_dtypes"] == [{"fp16": "float16", "fp32": "float32"}[native]]
    assert r["failures"] == [] and "| bf16 |" in md and "stub engines" in md
    check = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "check_report.py"), str(report_dir)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_diffusers_cold_start_runs_in_the_pipeline_dtype(demo_pipe, dtype):
    """The cold-start row that failed on CUDA (the fp16 pipeline saved, then loaded back as fp16 text encoder and fp32
    UNet: "mat1 and mat2 must have the same dtype"), caught on CPU with bf16 standing in for fp16."""
    import copy

    import torch

    from lcm_export.bench.harness import diffusers_cold_start

    ref = copy.deepcopy(demo_pipe).to(getattr(torch, dtype))
    row = diffusers_cold_start(ref, 1, ["a cat", "1.0", "64", "64"])
    assert "error" not in row, row["error"]
    assert row["seconds"] > 0 and row["device"] == "cpu" and row["dtype"] == dtype and row["loaded_dtypes"] == [dtype]


def test_failed_rows_fail_the_run(demo_engine, tmp_path, capsys, monkeypatch):
    """A baseline and a cold start that error (injected): bench exits 1 naming them, the report keeps each error and
    lists it under "failures", and the schema and check_report refuse the report for exactly those rows."""
    import subprocess
    import sys

    import torch

    from lcm_export.bench import harness as bench
    from lcm_export.bench import baselines as bench_torch

    real = bench_torch.torch_call

    def bf16_fails(pipe, *a, **k):
        if next(pipe.unet.parameters()).dtype == torch.bfloat16:
            raise RuntimeError("injected bf16 failure")
        return real(pipe, *a, **k)

    monkeypatch.setattr(bench_torch, "torch_call", bf16_fails)
    monkeypatch.setattr(bench, "_TORCH_COLD", "raise RuntimeError('injected cold-start failure')")
    from lcm_export import _cpu

    monkeypatch.setattr(_cpu, "native_bf16", lambda flags=None: True)  # the bf16 row runs (and fails) on any CPU
    out = tmp_path / "r"
    code, stdout, err = run_cli(["bench", "--engine-dir", demo_engine, "--runs", "1", "--warmup", "0", "--solvers", "lcm:1,ddim:2",
                                 "--baselines", "eager,bf16", "--threads", "1", "--resolution", "64x64", "--out", out, "--quiet"], capsys)
    assert code == 1 and stdout.startswith("FAILED (paths.bf16, cold_start.diffusers) 64x64:")
    assert "error: paths.bf16 failed: RuntimeError: injected bf16 failure" in err
    assert "error: cold_start.diffusers failed: RuntimeError: injected cold-start failure" in err
    r = json.loads((out / "report.json").read_text())
    assert [f["row"] for f in r["failures"]] == ["paths.bf16", "cold_start.diffusers"]
    assert r["paths"]["bf16"]["error"] == "RuntimeError: injected bf16 failure" and "stages" not in r["paths"]["bf16"]
    assert "ratio" not in r["cold_start"] and "stages" in r["paths"]["eager"]
    bad = {tuple(e.absolute_path)[:2] for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(r)}
    assert bad == {("failures",), ("paths", "bf16"), ("cold_start",)}, bad
    md = (out / "report.md").read_text()
    assert "**FAILED:** 2 row(s) errored" in md and "injected bf16 failure" in md and "injected cold-start failure" in md
    check = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "check_report.py"), str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "the run failed (2 row(s)): paths.bf16: RuntimeError: injected bf16 failure" in check.stderr


def test_baseline_setup_per_device():
    from lcm_export._cpu import native_bf16
    from lcm_export.bench.baselines import NO_NATIVE_BF16, baseline_setup

    assert baseline_setup("eager", "cuda")["dtype"] == "float16" and baseline_setup("eager", "cpu")["dtype"] == "float32"
    assert baseline_setup("bf16", "cuda")["precision"] == "bf16"
    ro = baseline_setup("reduce-overhead", "cuda")
    assert ro["compile"] == "reduce-overhead" and ro["skip"] is None and ro["precision"] == "fp16"
    assert baseline_setup("reduce-overhead", "cpu")["skip"]
    # bf16 on a CPU: decided from the CPU's flags, as the build decides --precision bf16
    assert baseline_setup("bf16", "cpu", native_bf16(SAPPHIRE_RAPIDS))["skip"] is None
    assert baseline_setup("bf16", "cpu", native_bf16(ZEN3))["skip"] == NO_NATIVE_BF16
    assert baseline_setup("bf16", "cuda", native_bf16(ZEN3))["skip"] is None  # a GPU computes bf16 itself
    assert baseline_setup("eager", "cpu", native_bf16(ZEN3))["skip"] is None
    assert baseline_setup("bf16", "cpu")["skip"] == (None if native_bf16() else NO_NATIVE_BF16)  # this CPU


def test_engine_precision_per_cpu():
    """The peak an engine is compared with: bf16 for reduced-precision CPU entries only where bf16 is native."""
    from lcm_export._cpu import native_bf16
    from lcm_export.bench.harness import engine_precision

    for manifest in ("bf16", "int8", "mixed"):
        assert engine_precision(manifest, "cpu", native_bf16(SAPPHIRE_RAPIDS)) == "bf16"
        assert engine_precision(manifest, "cpu", native_bf16(ZEN3)) == "fp32"
    assert engine_precision("fp32", "cpu", native_bf16(ZEN3)) == "fp32" and engine_precision("mixed", "cuda") == "fp16"
    assert engine_precision("bf16", "cuda") == "bf16" and engine_precision("fp16", "cuda") == "fp16"


def test_bench_on_a_cpu_without_native_bf16(demo_engine, tmp_path, capsys, monkeypatch):
    """This CPU seen as an AVX2-only one (the detector says no native bf16): ``--baselines eager,bf16`` skips bf16 with
    one warning line and its reason in the report, measures no bf16 peak (the report says why), exits 0, and the report
    passes the schema and check_report (which refuses a report whose bf16 peak is both measured and skipped)."""
    import subprocess
    import sys

    import torch

    from lcm_export import _cpu
    from lcm_export.bench import harness as bench
    from lcm_export.bench.baselines import NO_NATIVE_BF16

    if torch.cuda.is_available():
        pytest.skip("bench runs on the GPU here, which computes bf16 itself")
    real = _cpu.native_bf16
    monkeypatch.setattr(_cpu, "native_bf16", lambda flags=None: real(ZEN3 if flags is None else flags))
    peaks = []
    monkeypatch.setattr(bench, "measure_peak", _timed_into(peaks, lambda a, k: k.get("precision", "fp32"), bench.measure_peak))
    out = tmp_path / "r"
    code, stdout, err = run_cli(["bench", "--engine-dir", demo_engine, "--runs", "1", "--warmup", "0", "--solvers", "lcm:1,ddim:2",
                                 "--baselines", "eager,bf16", "--threads", "1", "--resolution", "64x64", "--no-cold-start", "--out", out,
                                 "--quiet"], capsys)
    assert code == 0, err
    assert err == f"warning: bf16 baseline skipped: {NO_NATIVE_BF16}\n"  # one line, even with --quiet
    assert [w for w, _ in peaks] == ["fp32"]  # no bf16 arithmetic was timed
    r = json.loads((out / "report.json").read_text())
    assert r["paths"]["bf16"] == {"label": "diffusers eager, modules cast to bf16 (bf16 cpu)", "precision": "bf16", "skipped": NO_NATIVE_BF16}
    assert "stages" in r["paths"]["eager"] and set(r["ratios"]) == {"eager"} and r["failures"] == []
    assert set(r["flops"]["peaks"]) == {"fp32"} and r["flops"]["peaks_skipped"] == {"bf16": NO_NATIVE_BF16}
    jsonschema.validate(r, SCHEMA)
    md = (out / "report.md").read_text()
    assert f"skipped:** {NO_NATIVE_BF16}" in md and f"- bf16: not measured — {NO_NATIVE_BF16}" in md
    check = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "check_report.py"), str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    r["flops"]["peaks"]["bf16"] = r["flops"]["peaks"]["fp32"]  # a report that says both: check_report refuses it
    (out / "report.json").write_text(json.dumps(r))
    check = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "check_report.py"), str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "the bf16 peak is both measured and skipped" in check.stderr


def test_measure_peak_refuses_emulated_bf16(monkeypatch):
    """measure_peak itself refuses bf16 on a CPU without native bf16 (one line, a UserError), before any arithmetic."""
    import torch

    from lcm_export import _cpu
    from lcm_export.bench.baselines import NO_NATIVE_BF16, measure_peak
    from lcm_export.errors import UserError

    monkeypatch.setattr(_cpu, "native_bf16", lambda flags=None: False)
    with pytest.raises(UserError) as e:
        measure_peak(1, precision="bf16")
    assert str(e.value) == f"no bf16 peak: {NO_NATIVE_BF16}" and "\n" not in str(e.value)
    fp32 = measure_peak(torch.get_num_threads(), precision="fp32", n=512, budget_s=0.2)  # fp32 is measured as before
    assert fp32["best_flops_per_s"] > 0 and fp32["matrix_size"] <= 512


@pytest.mark.parametrize("flops_per_s", [0.9e9, 65e9, 5e12], ids=["emulated-bf16-zen3", "fp32-zen3", "amx"])
def test_peak_is_sized_to_its_budget_on_any_cpu(flops_per_s):
    """The peak's calibration on simulated CPUs (a product that sleeps 2n³ / FLOP/s: no arithmetic): from emulated bf16 on
    an AVX2-only CPU (0.9 GFLOP/s, issue 32) to AMX, it stays within its budget, reports the simulated rate, and takes the
    largest product the budget allows (the full size where the CPU is fast)."""
    import time

    from lcm_export.bench.baselines import calibrated_rate

    budget, calls = 1.0, []

    def product(k):
        def run():
            calls.append(k)
            time.sleep(2 * k**3 / flops_per_s)
        return run

    t0 = time.perf_counter()
    rate, k = calibrated_rate(product, 4096, 3, budget)
    took = time.perf_counter() - t0
    assert took <= budget * 1.1, (took, k)
    assert 0.8 * flops_per_s <= rate <= flops_per_s  # sleep overshoots, never undershoots
    assert k == max(calls) and calls.count(k) >= 2  # an untimed first call, then at least one timed
    assert k == 4096 or 2 * 2 * (2 * k) ** 3 / flops_per_s > budget * 0.5  # not stuck small: the next size's 2 calls did not fit


def test_baseline_inputs_follow_pipeline_dtype(demo_pipe):
    """The class of bug that crashed bench on CUDA (fp32 CPU latents into an fp16 CUDA pipeline), caught on
    CPU with bf16 standing in for fp16: torch_call must move the latents to the pipeline's device and dtype."""
    import copy

    import numpy as np
    import torch
    from diffusers import LCMScheduler

    from lcm_export.bench.baselines import torch_call

    pipe = copy.deepcopy(demo_pipe).to(torch.bfloat16)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        img = torch_call(pipe, latents, 2, 1.0, (64, 64))
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


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


def test_unet_flops_include_attention(demo_pipe):
    """The FLOP count against my own count: convs and linears by module hooks, attention as
    QK^T + PV from each attention's sequence lengths (2 FLOP per multiply-add)."""
    import torch

    from lcm_export.bench.baselines import unet_flops

    unet, total, hooks = demo_pipe.unet, [0], []

    def conv(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        b, sq, inner = x.shape[0], x.shape[1], m.inner_dim
        sk = sq if ctx is None else ctx.shape[1]
        total[0] += 2 * 2 * b * sq * sk * inner  # scores and weighted sum, all heads together

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif type(m).__name__ == "Attention":
            hooks.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 12), torch.full((2,), 999), encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim))
    finally:
        for h in hooks:
            h.remove()
    assert any(type(m).__name__ == "Attention" for m in unet.modules())
    assert unet_flops(demo_pipe, 2, (64, 96)) == total[0]
