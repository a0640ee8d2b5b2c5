"""The denoising loop with the latents on the device (GPU engines that offer it: TensorRT, and ONNX Runtime's
CUDA provider).

The host loop (``pipeline.py``) copies the latents to the engine and the UNet's output back at every
step, and does the LCM step in numpy. Here the text embeddings are uploaded once, the latents are
uploaded once, and every step is two engine calls on device buffers: the UNet, then the LCM step
engine (``lcm_export/core/step_graph.py``: guidance combine, ``LCMScheduler.step``, and the VAE decoder's
input affine). The only copies per step are host -> device: the step's coefficients (40 bytes), its
timestep and its noise (drawn on the host with the same generator as the host loop: both loops use
the same noise). Nothing comes back to the host but the 4-byte NaN/inf flag before the VAE
decoder's output.

An engine offers this by having ``lcm_step`` ({guidance on: step engine}), ``run_device``,
``dtypes``, ``outputs`` and a ``device`` (``empty``, ``view``, ``upload``, ``download``,
``synchronize``, ``free``, ``mark``, ``elapsed``, ``discard``); see ``backends/tensorrt_runtime.py`` and
``backends/onnxruntime_runtime.py``.
The step engine also flags NaN/inf in the UNet's output, with the first step it happened at, so the
loop reports them as the host loop does (naming the UNet and the step) with one 4-byte copy after the
last step.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..core.step_graph import INPUTS as STEP_INPUTS

F32 = np.dtype(np.float32)


def decoder_affine(vae: dict, channels: int) -> np.ndarray:
    """[3, C, 1, 1] float32 (div, mul, add): the VAE decoder's input is latents / div · mul + add, as
    diffusers computes it (latents / scaling_factor, or · std / scaling_factor + mean for VAEs with
    latent statistics, + shift_factor where set)."""
    scaling = np.float32(vae["scaling_factor"])
    div, mul = np.full(channels, scaling, np.float32), np.ones(channels, np.float32)
    add = np.zeros(channels, np.float32)
    if vae.get("latents_mean") is not None and vae.get("latents_std") is not None:
        div = np.ones(channels, np.float32)
        mul = np.asarray(vae["latents_std"], np.float32) / scaling
        add = np.asarray(vae["latents_mean"], np.float32)
    if vae.get("shift_factor"):
        add = np.float32(vae["shift_factor"]) + add
    return np.stack([div, mul, add]).reshape(3, channels, 1, 1).astype(np.float32)


def device_loop_for(unet, cfg: bool, vae) -> "DeviceLoop | None":
    """A device loop over ``unet`` and the decoder ``vae`` for this guidance mode, or None (no step
    engine for it, a step engine of another graph version, or I/O types the step engine does not
    take): the pipeline then runs the host loop."""
    step = (getattr(unet, "lcm_step", None) or {}).get(bool(cfg))
    if step is None or not hasattr(unet, "run_device") or getattr(unet, "device", None) is None:
        return None
    if set(getattr(step, "inputs", ())) != set(STEP_INPUTS):
        return None
    io = [unet.dtypes.get("sample"), unet.dtypes.get(unet.outputs[0])]
    io += [step.dtypes.get(n) for n in ("sample", "model_output", "next_sample", "latent", "nonfinite")]
    io.append((getattr(vae, "dtypes", None) or {}).get("latent"))
    if any(dt != F32 for dt in io):
        return None
    return DeviceLoop(unet, step)


class DeviceLoop:
    """Buffers (per shape, reused across calls) and the loop. One call at a time per loop (a lock):
    the buffers are this loop's, so engines may serve other callers between its steps."""

    def __init__(self, unet, step):
        self.unet, self.step, self.dev = unet, step, unet.device
        self._bufs: dict[tuple, dict] = {}
        self._lock = threading.Lock()

    def _buffers(self, n: int, shape: tuple, feeds: dict) -> dict:
        key = (n, shape) + tuple((k, np.shape(v)) for k, v in sorted(feeds.items()))
        if key not in self._bufs:
            dev, full = self.dev, (n, *shape[1:])
            self._bufs[key] = {
                "u": [dev.empty(full, F32), dev.empty(full, F32)],  # the UNet's sample input, ping-pong
                "flag": [dev.empty((1,), F32), dev.empty((1,), F32)],  # NaN/inf seen so far, ping-pong
                "eps": dev.empty(full, F32), "noise": dev.empty(shape, F32), "latent": dev.empty(shape, F32),
                "affine": dev.empty((3, shape[1], 1, 1), F32),
                "feeds": {k: dev.empty(np.shape(v), self.unet.dtypes.get(k, np.asarray(v).dtype)) for k, v in feeds.items()},
            }
        return self._bufs[key]

    def run(self, x: np.ndarray, feeds: dict, timesteps, coefs: list[np.ndarray], noise, vae, affine: np.ndarray,
            timings) -> tuple[np.ndarray | None, int | None]:
        """Denoise ``x`` [B,C,h,w] (scaled initial latents) with ``feeds`` (the UNet's per-image inputs:
        text embeddings, SDXL's added conditioning; uploaded once), then decode with ``vae``.

        ``coefs[i]`` is step i's coefficient vector, ``noise(i)`` its noise (host). Returns (the
        decoder's output on the host, None), or (None, the first step, 0-based, at which the UNet
        produced NaN/inf — the step engine's flag, one 4-byte copy after the loop; nothing is decoded
        then). ``timings.unet[i]`` is step i's GPU time (UNet and step engine, CUDA events)."""
        dev, b = self.dev, x.shape[0]
        n = next(iter(feeds.values())).shape[0]
        with self._lock:
            bufs = self._buffers(n, x.shape, feeds)
            t0 = time.perf_counter()
            on_dev = {k: dev.upload(v, bufs["feeds"][k]) for k, v in feeds.items()}
            dev.upload(np.concatenate([x] * (n // b)) if n != b else x, bufs["u"][0])
            dev.upload(affine, bufs["affine"])
            dev.upload(np.zeros(1, np.float32), bufs["flag"][0])
            out_name = self.unet.outputs[0]
            marks, cur = [dev.mark()], 0
            host_s = time.perf_counter() - t0
            try:
                for i, ts in enumerate(timesteps):
                    u, u_next = bufs["u"][cur], bufs["u"][1 - cur]
                    self.unet.run_device({"sample": u, "timestep": np.full((n,), ts, np.float32), **on_dev},
                                         out={out_name: bufs["eps"]})
                    t0 = time.perf_counter()
                    dev.upload(noise(i), bufs["noise"])
                    host_s += time.perf_counter() - t0
                    self.step.run_device({"sample": dev.view(u, x.shape), "model_output": bufs["eps"], "noise": bufs["noise"],
                                          "coef": coefs[i], "vae_affine": bufs["affine"], "nonfinite_in": bufs["flag"][cur]},
                                         out={"next_sample": u_next, "latent": bufs["latent"], "nonfinite": bufs["flag"][1 - cur]})
                    marks.append(dev.mark())
                    cur = 1 - cur
                flag = int(dev.download(bufs["flag"][cur])[0])  # waits for the loop's work
            except BaseException:
                dev.discard(marks)
                raise
            timings.unet = dev.elapsed(marks)
            timings.scheduler += host_s
            if flag:  # the UNet produced NaN/inf: no decode
                return None, len(coefs) - flag
            t0 = time.perf_counter()
            img = vae.run({"latent": bufs["latent"]})
            timings.vae_decoder = time.perf_counter() - t0
        return img, None
