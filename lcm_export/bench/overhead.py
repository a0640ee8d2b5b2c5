"""The lean runtime's own overhead (tokenize, scheduler arithmetic, host copies, image conversion) at a
given size, measured with stub engines that return fixed arrays instantly: what is left is host work.

A measurement, not a test: ``bench`` records it in report.json (``runtime_overhead_stub``) and
``benchmarks/runtime_overhead.py`` prints it. The goal (issue 13) is at most 2 ms per 512² image.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from ..core.step_graph import INPUTS as STEP_INPUTS, OUTPUTS as STEP_OUTPUTS
from ..store.manifest import read_manifest


class FixedEngine:
    """An engine that returns the same arrays every call (sized from the feeds' batch)."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = list(outputs)
        self._arrays = list(outputs.values())

    def run(self, feeds):
        return self.run_all(feeds)[0]

    def run_all(self, feeds):
        b = next(iter(feeds.values())).shape[0]
        return [a[:b] if a.shape[0] >= b else np.concatenate([a] * b)[:b] for a in self._arrays]


class NullDevice:
    """A device whose buffers hold nothing and whose copies and events cost nothing: with it, the
    device loop's own Python host work is what is left to time (CUDA's copies and enqueues are not)."""

    class Buf:
        ptr = 0

        def __init__(self, shape, dtype):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def empty(self, shape, dtype):
        return self.Buf(shape, dtype)

    def view(self, arr, shape):
        return self.Buf(shape, arr.dtype)

    def upload(self, host, into):
        return into

    def download(self, arr):
        return np.zeros(arr.shape, arr.dtype)

    def synchronize(self):
        pass

    def free(self, arr):
        pass

    def mark(self):
        return 0.0

    def elapsed(self, marks):
        return [0.0] * (len(marks) - 1)

    def discard(self, marks):
        pass


class FixedDeviceEngine(FixedEngine):
    """A ``FixedEngine`` that also takes the device loop's calls (outputs left in the given buffers)."""

    def __init__(self, outputs: dict[str, np.ndarray], device: NullDevice, inputs: tuple[str, ...]):
        super().__init__(outputs)
        self.device, self.lcm_step, self.inputs = device, {}, list(inputs)
        self.dtypes = {n: np.dtype(np.float32) for n in (*inputs, *self.outputs)}

    def run_device(self, feeds, out=None):
        return dict(out or {})

    def run_all(self, feeds):
        if any(isinstance(v, NullDevice.Buf) for v in feeds.values()):  # the VAE fed the device latents
            feeds = {k: np.zeros(v.shape, v.dtype) if isinstance(v, NullDevice.Buf) else v for k, v in feeds.items()}
        return super().run_all(feeds)


def stub_pipeline(engine_dir: str | Path, hw: tuple[int, int] = (512, 512), max_batch: int = 2, device_loop: bool = False):
    """The entry's tokenizers, scheduler and manifest, with every engine a ``FixedEngine`` at ``hw``;
    ``device_loop``: UNet and VAE on a ``NullDevice``, with step engines (the GPU path's host work)."""
    from ..runtime import ClipTokenizer, LCMPipeline

    d = Path(engine_dir)
    m = copy.deepcopy(read_manifest(d))
    name = f"{hw[0]}x{hw[1]}"
    m["resolutions"] = [name]
    m["shape_plans"] = [{**(m["shape_plans"][0] if m.get("shape_plans") else {}),
                         "name": name, "static": True, "min_hw": list(hw), "max_hw": list(hw), "opt_hw": list(hw)}]
    m["default_resolution"] = list(hw)
    rng = np.random.default_rng(0)
    lh, lw = hw[0] // 8, hw[1] // 8
    engines = {}
    for comp, rec in m["components"].items():
        outs = {}
        for oname, _, dims in rec["outputs"]:
            shape = [max_batch] + [{"H/8": lh, "W/8": lw, "H": hw[0], "W": hw[1]}.get(v, v) for v in dims[1:]]
            scale = 0.5 if comp == "vae_decoder" else 1.0
            outs[oname] = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
        engines[comp] = {"*": FixedEngine(outs)}
    if device_loop:
        dev = NullDevice()
        unet = engines["unet"]["*"] = FixedDeviceEngine(dict(zip(engines["unet"]["*"].outputs, engines["unet"]["*"]._arrays)), dev,
                                                        ("sample",))
        step = FixedDeviceEngine({n: np.zeros(1, np.float32) for n in STEP_OUTPUTS}, dev, STEP_INPUTS)
        unet.lcm_step = {False: step, True: step}
        vae = engines["vae_decoder"]["*"]
        engines["vae_decoder"]["*"] = FixedDeviceEngine(dict(zip(vae.outputs, vae._arrays)), dev, ("latent",))
    toks = {k: ClipTokenizer(d / m[k]["file"], m[k]["max_length"], m[k]["pad_id"]) for k in ("tokenizer", "tokenizer_2") if k in m}
    sched = json.loads((d / m["scheduler"]["file"]).read_text())
    return LCMPipeline(m, d, engines, toks, sched)


def measure_overhead(engine_dir: str | Path, hw: tuple[int, int] = (512, 512), runs: int = 30, warmup: int = 3,
                     guidance: float = 1.0, device_loop: bool = False) -> dict:
    """Median overhead per image and its parts (seconds), over ``runs`` 4-step generations; with
    ``device_loop``, the GPU path's loop (``runtime/device_loop.py``) on a ``NullDevice``."""
    pipe = stub_pipeline(engine_dir, hw, device_loop=device_loop)
    if device_loop and pipe._device_loop(pipe.engines["unet"]["*"], guidance > 1, pipe.engines["vae_decoder"]["*"]) is None:
        raise RuntimeError("the stub device loop was not taken")
    for _ in range(warmup):
        pipe("a photo of an astronaut riding a horse on mars", steps=4, guidance=guidance)
    rec = {k: [] for k in ("overhead", "tokenize", "scheduler", "postprocess", "vae_input", "engines")}
    for _ in range(runs):
        pipe("a photo of an astronaut riding a horse on mars", steps=4, guidance=guidance)
        t = pipe.last_timings
        for k in rec:
            rec[k].append(getattr(t, k))
    med = {f"{k}_median_s": float(np.median(v)) for k, v in rec.items()}
    method = ("stub engines returning fixed arrays: the time left is the runtime's host work "
              "(tokenize, scheduler, host copies, VAE input scaling, image conversion to PIL)")
    if device_loop:
        method = ("device loop (latents on the GPU) with stub engines on a device whose copies and events cost "
                  "nothing: the loop's Python host work (tokenize, step coefficients, noise draws, image "
                  "conversion); the engines' own enqueue work (TrtEngine's checks and TensorRT calls) and CUDA's "
                  "copies are not in it")
    return {"resolution": f"{hw[0]}x{hw[1]}", "guidance": guidance, "steps": 4, "runs": runs,
            "loop": "device" if device_loop else "host", "method": method,
            "median_s": med["overhead_median_s"], **med}
