"""A fake "device" for driving the device loop (``runtime/device_loop.py``) on CPU: numpy buffers that
count every host<->device copy, engines that read and write them in place, and the real LCM step
graph run by ONNX Runtime. Plumbing and numbers only; not a GPU run."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from lcm_export.core.step_graph import INPUTS as STEP_INPUTS, OUTPUTS as STEP_OUTPUTS, lcm_step_onnx


class FakeArr:
    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.dtype, self.ptr = data, data.shape, data.dtype, id(data)


class FakeDevice:
    def __init__(self):
        self.uploads, self.downloads, self.allocs = [], 0, 0

    def empty(self, shape, dtype):
        self.allocs += 1
        return FakeArr(np.full(shape, np.nan, dtype))  # NaN: reading a buffer nobody wrote shows up

    def view(self, arr, shape):
        return FakeArr(arr.data.reshape(-1)[: int(np.prod(shape))].reshape(shape))

    def upload(self, host, into):
        assert tuple(np.shape(host)) == into.shape
        into.data[...] = host
        self.uploads.append(tuple(np.shape(host)))
        return into

    def download(self, arr):
        self.downloads += 1
        return arr.data.copy()

    def synchronize(self):
        pass

    def free(self, arr):
        pass

    def mark(self):
        return time.perf_counter()

    def elapsed(self, marks):
        return [b - a for a, b in zip(marks, marks[1:])]

    def discard(self, marks):
        self.discarded = len(marks)


def _host(feeds: dict) -> dict:
    return {k: (v.data if isinstance(v, FakeArr) else v) for k, v in feeds.items()}


class FakeDeviceEngine:
    """An engine on the fake device: device inputs are read in place, outputs written to ``out``."""

    def __init__(self, run_all, inputs, outputs, device, log):
        self._run_all, self.inputs, self.outputs, self.device, self.log = run_all, inputs, outputs, device, log
        self.dtypes = {n: np.dtype(np.float32) for n in inputs + outputs}
        self.lcm_step = {}

    def run_device(self, feeds, out=None):
        self.log.append({k: isinstance(v, FakeArr) for k, v in feeds.items()})
        results = dict(zip(self.outputs, self._run_all(_host(feeds))))
        for name, value in results.items():
            if out and name in out:
                assert out[name].shape == value.shape
                out[name].data[...] = value
                results[name] = out[name]
        return results

    def run(self, feeds):
        self.log.append({k: isinstance(v, FakeArr) for k, v in feeds.items()})
        return self._run_all(_host(feeds))[0]


def on_fake_device(pipe):
    """Put the entry's UNet and VAE engines of every plan on one fake device, with step engines."""
    dev, log = FakeDevice(), {"unet": [], "step": [], "vae": []}
    steps = {cfg: ort.InferenceSession(lcm_step_onnx(cfg).SerializeToString(), providers=["CPUExecutionProvider"])
             for cfg in (False, True)}
    for plan, eng in pipe.engines["unet"].items():
        unet = FakeDeviceEngine(eng.run_all, ["sample", "timestep", "encoder_hidden_states"], ["out_sample"], dev, log["unet"])
        for cfg, sess in steps.items():
            unet.lcm_step[cfg] = FakeDeviceEngine(lambda f, s=sess: s.run(None, f), list(STEP_INPUTS), list(STEP_OUTPUTS),
                                                  dev, log["step"])
        pipe.engines["unet"][plan] = unet
    for plan, eng in pipe.engines["vae_decoder"].items():
        pipe.engines["vae_decoder"][plan] = FakeDeviceEngine(eng.run_all, ["latent"], ["image"], dev, log["vae"])
    return dev, log
