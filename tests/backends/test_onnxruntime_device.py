"""ONNX Runtime's device runtime (``backends/onnxruntime_runtime.py``) with the CPU provider standing in for CUDA:
the same IO-binding calls, device buffers (``OrtValue`` s on "cpu"), the real LCM step graph and the demo entry's
real engines, so the device loop's plumbing, its copies and the CUDA-graph bookkeeping (a session per fixed shape,
a graph id per set of bound addresses) run here; only the CUDA provider itself does not. Copies are counted on the
process's one ``OrtDevice``, through which every engine uploads and downloads."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_export.backends import onnxruntime as ort_backend
from lcm_export.backends import onnxruntime_runtime as rt
from lcm_export.backends.onnxruntime_runtime import DevBuf, OrtDeviceEngine, fixed_dims, shared_device
from lcm_export.errors import EngineError
from lcm_export.runtime import LCMPipeline, NonFiniteOutput
from lcm_export.runtime.device_loop import device_loop_for
from lcm_export.core.step_graph import COEF


@pytest.fixture(scope="module")
def step_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    return {k: d / f for k, f in ort_backend.write_step_graphs(d).items()}


class Copies:
    """Counts every upload (shapes) and download (shapes) on the shared CPU device."""

    def __init__(self, monkeypatch):
        self.up, self.down, self.allocs = [], [], 0
        dev = shared_device("cpu")
        up, down, empty = rt.OrtDevice.upload, rt.OrtDevice.download, rt.OrtDevice.empty

        def upload(d, host, into):
            self.up.append(tuple(np.shape(host)))
            return up(d, host, into)

        def download(d, arr):
            self.down.append(tuple(arr.shape))
            return down(d, arr)

        def alloc(d, shape, dtype):
            self.allocs += 1
            return empty(d, shape, dtype)

        for name, fn in (("upload", upload), ("download", download), ("empty", alloc)):
            monkeypatch.setattr(dev, name, fn.__get__(dev))


def on_ort_device(pipe, step_files, graphs: bool):
    """The entry's UNet (with LCM step engines) and VAE decoder as device engines on the CPU provider."""
    m, d = pipe.manifest, pipe.engine_dir
    for comp in ("unet", "vae_decoder"):
        for plan, _ in list(pipe.engines[comp].items()):
            path = d / m["components"][comp]["engines"][plan]
            pipe.engines[comp][plan] = ort_backend.load_device_engine(m, d, comp, path, device="cpu", graphs=graphs,
                                                                      steps=step_files if comp == "unet" else {})
    return pipe.engines["unet"]["*"], pipe.engines["vae_decoder"]["*"]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_device_loop_on_ort_gives_the_host_loop_image(demo_engine, step_files, monkeypatch, guidance, graphs):
    want = LCMPipeline.from_engine_dir(demo_engine)("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np")
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    unet, vae = on_ort_device(pipe, step_files, graphs)
    assert device_loop_for(unet, guidance > 1, vae) is not None
    copies = Copies(monkeypatch)
    got = pipe("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    n = 4 if guidance > 1 else 2
    # once: text embeddings, first latents, the VAE affine, the flag; per step: timestep, noise, the step's coefficients
    assert copies.up == [(n, 77, 32), (n, 4, 8, 8), (3, 4, 1, 1), (1,)] + [(n,), (2, 4, 8, 8), (len(COEF),)] * 4
    assert copies.down == [(1,), (2, 3, 64, 64)]  # the 4-byte NaN/inf flag, then the decoded image: no latents
    step = unet.lcm_step[guidance > 1]
    if graphs:  # one fixed-shape session each; the loop's ping-pong buffers are two address sets: two graphs
        assert list(unet.graph_counts().values()) == [2] and list(step.graph_counts().values()) == [2]
        assert list(vae.graph_counts().values()) == [1] and not unet.graph_notes
        assert all(s.session is not unet.dynamic for s in unet.shapes.values())
    else:
        assert unet.graph_counts() == {} and all(s.session is unet.dynamic for s in unet.shapes.values())

    allocs, counts = copies.allocs, (unet.graph_counts(), step.graph_counts(), vae.graph_counts())
    again = pipe("a red fox", steps=4, guidance=guidance, seed=3, batch=2, output_type="np")
    np.testing.assert_allclose(again, want, rtol=0, atol=1e-6)
    assert copies.allocs == allocs  # same shapes: every buffer reused, so every graph would replay
    assert (unet.graph_counts(), step.graph_counts(), vae.graph_counts()) == counts


@pytest.mark.parametrize("steps,bad_step", [(1, 0), (3, 1), (4, 3)])
def test_device_loop_on_ort_names_the_first_nonfinite_step(demo_engine, step_files, monkeypatch, steps, bad_step):
    """The step graph's flag, read once after the loop: the UNet and the first bad step named; nothing decoded."""
    pipe = LCMPipeline.from_engine_dir(demo_engine)
    unet, _ = on_ort_device(pipe, step_files, graphs=True)
    run_device, calls = unet.run_device, []

    def poisoned(feeds, out=None):
        res = run_device(feeds, out)
        calls.append(1)
        if len(calls) > bad_step:  # from bad_step on; written on the device buffer the step engine reads
            eps = res["out_sample"]
            bad = np.zeros(eps.shape, np.float32)
            bad[0, 0, 0, 0] = np.inf if len(calls) % 2 else np.nan
            unet.device.upload(bad, eps)
        return res

    monkeypatch.setattr(unet, "run_device", poisoned)
    copies = Copies(monkeypatch)
    with pytest.raises(NonFiniteOutput, match=f"the unet engine produced NaN/inf at step {bad_step + 1} "):
        pipe("a red fox", steps=steps, seed=0)
    assert copies.down == [(1,)]  # the flag only: the VAE never ran


def test_run_device_binds_buffers_and_views_by_address(step_files):
    """Device buffers (and a view of the first rows of one) are bound where they are: only host inputs are copied."""
    from lcm_export.runtime.scheduler import LCMScheduler

    eng = OrtDeviceEngine(step_files["cfg"], "cpu")
    dev = eng.device
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    sched = LCMScheduler()
    sched.set_timesteps(4)
    coef = sched.step_coefficients(int(sched.timesteps[0]), 3.0)
    host = {"sample": big[:1], "model_output": big, "noise": rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
            "coef": coef, "vae_affine": np.ones((3, 4, 1, 1), np.float32), "nonfinite_in": np.zeros(1, np.float32)}
    want = eng.run_all(host)
    bufs = {k: dev.upload(v, dev.empty(v.shape, np.float32)) for k, v in host.items() if k != "sample"}
    bufs["sample"] = dev.view(bufs["model_output"], (1, 4, 8, 8))  # the first row of [2, ...]: no copy
    outs = {"next_sample": dev.empty((2, 4, 8, 8), np.float32)}
    res = eng.run_device({**bufs, "coef": coef}, out=outs)
    assert res["next_sample"] is outs["next_sample"] and isinstance(res["latent"], DevBuf)
    for name, w in zip(eng.outputs, want):
        np.testing.assert_array_equal(dev.download(res[name]), w)
    with pytest.raises(EngineError, match="does not fit"):
        dev.view(bufs["coef"], (12,))
    with pytest.raises(EngineError, match="view"):
        dev.upload(big[:1], bufs["sample"])
    with pytest.raises(EngineError, match="float16"):
        eng.run_device({**bufs, "noise": dev.empty((1, 4, 8, 8), np.float16)})


def test_graph_sessions_are_capped_and_fall_back_to_the_dynamic_session(step_files, monkeypatch):
    monkeypatch.setattr(rt, "MAX_STATIC_SESSIONS", 1)
    monkeypatch.setattr(rt, "MAX_GRAPHS", 1)
    eng = OrtDeviceEngine(step_files["plain"], "cpu", graphs=True)
    runs, session = [], eng._session

    def spying(overrides, graph):  # what each run hands ONNX Runtime: (fixed-shape session?, its gpu_graph_id)
        sess = session(overrides, graph)
        run = sess.run_with_iobinding
        sess.run_with_iobinding = lambda b, opts=None: (runs.append((bool(overrides), opts and opts.get_run_config_entry("gpu_graph_id"))),
                                                       run(b, opts))[1]
        return sess

    monkeypatch.setattr(eng, "_session", spying)

    def feeds(b):
        rng = np.random.default_rng(b)
        lat = lambda: rng.standard_normal((b, 4, 8, 8), dtype=np.float32)  # noqa: E731
        return {"sample": lat(), "model_output": lat(), "noise": lat(), "coef": np.ones(len(COEF), np.float32),
                "vae_affine": np.ones((3, 4, 1, 1), np.float32), "nonfinite_in": np.zeros(1, np.float32)}

    dev = eng.device
    f1 = feeds(1)
    outs = [{n: dev.empty(s, np.float32) for n, s in (("next_sample", (1, 4, 8, 8)), ("latent", (1, 4, 8, 8)), ("nonfinite", (1,)))}
            for _ in range(2)]
    eng.run_device(f1, outs[0])
    eng.run_device(f1, outs[1])  # other output addresses: no second graph (MAX_GRAPHS 1): a plain run (-1)
    eng.run_device(f1, outs[0])  # the first set again: its graph
    assert runs == [(True, "0"), (True, "-1"), (True, "0")] and eng.graph_counts() == {next(iter(eng.shapes)): 1}
    assert eng.run_all(feeds(2))[0].shape == (2, 4, 8, 8)  # a second shape (MAX_STATIC_SESSIONS 1): the dynamic session
    assert [s.graphs for s in eng.shapes.values()] == [True, False] and len(runs) == 3  # not a fixed-shape session


def test_a_refused_graph_session_runs_in_the_dynamic_session(step_files, monkeypatch):
    """Where ONNX Runtime refuses a capture-ready session (nodes not on the CUDA provider), that shape runs without
    graphs and the reason is kept."""
    eng = OrtDeviceEngine(step_files["plain"], "cpu", graphs=True)
    session = eng._session

    def refuse(overrides, graph):
        if graph:
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user")
        return session(overrides, graph)

    monkeypatch.setattr(eng, "_session", refuse)
    lat = np.ones((1, 4, 8, 8), np.float32)
    out = eng.run_all({"sample": lat, "model_output": lat, "noise": lat, "coef": np.ones(len(COEF), np.float32),
                       "vae_affine": np.ones((3, 4, 1, 1), np.float32), "nonfinite_in": np.zeros(1, np.float32)})
    assert out[0].shape == (1, 4, 8, 8) and eng.graph_counts() == {}
    assert len(eng.graph_notes) == 1 and "graph capture" in eng.graph_notes[0]


def test_fixed_dims_pins_every_symbolic_dimension_or_none():
    dims = {"sample": ["B", 4, "h", "w"], "timestep": ["B"], "ehs": ["B", 77, 32]}
    shapes = {"sample": (2, 4, 8, 12), "timestep": (2,), "ehs": (2, 77, 32)}
    assert fixed_dims(dims, shapes) == {"B": 2, "h": 8, "w": 12}
    assert fixed_dims(dims, {**shapes, "timestep": (3,)}) is None  # one name, two values
    assert fixed_dims({**dims, "ehs": ["B", None, 32]}, shapes) is None  # an unnamed dimension
    assert fixed_dims(dims, {**shapes, "ehs": (2, 76, 32)}) is None  # a fixed dimension that does not match


def test_step_engines_come_from_the_entry_record(demo_engine, step_files, tmp_path):
    """A CUDA entry's UNet record names its step graphs; load_device_engine attaches them (guidance off and on)."""
    import shutil

    from lcm_export.store.manifest import read_manifest

    d = tmp_path / "entry"
    shutil.copytree(demo_engine, d)
    for f in step_files.values():
        shutil.copy(f, d / "unet" / f.name)
    m = read_manifest(d)
    m["components"]["unet"]["lcm_step"] = {k: f"unet/{f.name}" for k, f in step_files.items()}
    eng = ort_backend.load_device_engine(m, d, "unet", d / m["components"]["unet"]["engines"]["*"], device="cpu")
    assert set(eng.lcm_step) == {False, True} and eng.lcm_step[True].path == d / "unet" / "lcm_step_cfg.onnx"
    assert eng.dtypes["out_sample"] == np.float32 and eng.inputs == ["sample", "timestep", "encoder_hidden_states"]


def test_text_encoder_on_the_device_engine_equals_the_plain_engine(demo_engine, monkeypatch):
    """On CUDA every component is a device engine (text encoders without graphs): int32 ids uploaded, outputs
    allocated by ONNX Runtime on the device and copied back; the same numbers as the plain session."""
    from lcm_export.store.manifest import read_manifest

    m = read_manifest(demo_engine)
    path = demo_engine / m["components"]["text_encoder"]["engines"]["*"]
    ids = np.random.default_rng(0).integers(0, 500, (3, 77)).astype(np.int32)
    want = ort_backend.load_engine(m, demo_engine, "text_encoder", path).run_all({"input_ids": ids})
    eng = ort_backend.load_device_engine(m, demo_engine, "text_encoder", path, device="cpu")
    copies = Copies(monkeypatch)
    got = eng.run_all({"input_ids": ids})
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert copies.up == [(3, 77)] and copies.down == [tuple(w.shape) for w in want] and eng.lcm_step == {}
