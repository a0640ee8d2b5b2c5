"""Text -> image around the engines: tokenizer(s) -> text engine(s) -> steps × (UNet engine + numpy
LCM step) -> VAE engine -> PIL images. numpy, tokenizers, Pillow and the engine backend only.
Engines that keep tensors on the GPU (TensorRT entries with LCM step engines, ONNX Runtime CUDA entries
with LCM step graphs) run the steps and the decoder's input in ``device_loop.py`` instead, with the same
noise draws and the same arithmetic.

SD 1.5 conditions the UNet on the text encoder's last hidden state. SDXL / SSD-1B concatenate the
penultimate hidden states of both encoders, and add the second encoder's pooled projection and six
"time ids" (original size, crop top-left, target size) — as diffusers' StableDiffusionXLPipeline does,
including zeroed unconditional embeddings when the model sets ``force_zeros_for_empty_prompt`` and
no negative prompt is given.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..confine import inside
from ..errors import EngineError, UserError
from ..store.manifest import MANIFEST, read_manifest
from .adapters import Adapters
from .device_loop import decoder_affine, device_loop_for
from .engines import load_engines
from .scheduler import LCMScheduler
from .tokenizer import ClipTokenizer
from .validate import check_call_memory, check_latents, check_scalars

MAX_STEPS = 50
POST_BUFFER_SHAPES = 4
"""Image shapes whose conversion buffers are kept between calls."""


class NonFiniteOutput(EngineError):
    """An engine produced NaN/inf from finite inputs (typically fp16 overflow): an engine failure, not
    bad input (the inputs are checked finite first). The CLI exits with code 1."""


@dataclass
class Timings:
    """Seconds per stage of the last call; ``overhead`` is everything outside the engine calls. With
    the device loop, ``unet[i]`` is step i's GPU time (UNet and LCM step engine, from CUDA events),
    ``vae_input`` is 0 (the step engine computes the decoder's input) and ``scheduler`` is the host's
    coefficient, noise and upload work."""

    tokenize: float = 0.0
    text_encoder: float = 0.0
    unet: list[float] = field(default_factory=list)
    scheduler: float = 0.0
    vae_input: float = 0.0
    vae_decoder: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0

    @property
    def engines(self) -> float:
        return self.text_encoder + sum(self.unet) + self.vae_decoder

    @property
    def overhead(self) -> float:
        return self.total - self.engines

    def as_dict(self) -> dict:
        return {"tokenize": self.tokenize, "text_encoder": self.text_encoder, "unet_steps": list(self.unet),
                "unet_total": sum(self.unet), "scheduler": self.scheduler, "vae_input": self.vae_input, "vae_decoder": self.vae_decoder,
                "postprocess": self.postprocess, "engines": self.engines, "overhead": self.overhead, "total": self.total}

    def line(self) -> str:
        steps = " ".join(f"{t * 1e3:.1f}" for t in self.unet)
        return (f"text encoder {self.text_encoder * 1e3:.1f} ms | unet steps [{steps}] ms | vae {self.vae_decoder * 1e3:.1f} ms | "
                f"total {self.total * 1e3:.1f} ms | runtime overhead {self.overhead * 1e3:.2f} ms "
                f"(tokenize {self.tokenize * 1e3:.2f}, scheduler {self.scheduler * 1e3:.2f}, vae input {self.vae_input * 1e3:.2f}, "
                f"postprocess {self.postprocess * 1e3:.2f})")


def _tokenizer(path: Path, record: dict, engine_dir: Path) -> ClipTokenizer:
    try:
        return ClipTokenizer(path, record["max_length"], record["pad_id"])
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for an unreadable file
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is damaged ({first}); rebuild it with `lcm-export build-engine --engine-dir {engine_dir} --force`") from None


def _scheduler_config(path: Path, engine_dir: Path) -> dict:
    """The entry's LCMScheduler config (a damaged one: one-line UserError)."""
    try:
        cfg = json.loads(path.read_text())
        LCMScheduler.from_config(cfg)
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); "
                        f"rebuild it with `lcm-export build-engine --engine-dir {engine_dir} --force`") from None
    return cfg


class LCMPipeline:
    """The lean runtime: ``LCMPipeline.from_engine_dir(DIR)(prompt)`` -> list of PIL images."""

    def __init__(self, manifest: dict, engine_dir: Path, engines: dict, tokenizers: dict[str, ClipTokenizer], scheduler_config: dict):
        self.manifest = manifest
        self.engine_dir = engine_dir
        self.engines = engines
        self.tokenizers = tokenizers
        self.xl = "text_encoder_2" in manifest.get("text_encoders", ["text_encoder"])
        self.scheduler_config = scheduler_config
        self.latent_channels = int(manifest.get("latent_channels", 4))
        self.resolutions = [tuple(int(v) for v in r.split("x")) for r in manifest["resolutions"]]
        self.last_timings = Timings()
        # decoder input z = x / div * mul + add (diffusers: x / scaling_factor [* std + mean] [+ shift])
        self._affine = decoder_affine(manifest["vae"], self.latent_channels)
        self._vae_div, self._vae_mul, self._vae_add = self._affine
        self._post_buffers: dict[tuple, np.ndarray] = {}
        self._post_u8: dict[tuple, np.ndarray] = {}
        self._device_loops: dict[tuple, object] = {}
        self.adapters = Adapters(engine_dir, manifest)
        """The style adapters this entry holds (``lcm-export adapter add``), applied per call."""
        self.device_loop = True
        """Keep the latents on the GPU between steps where the engines can (TensorRT entries with LCM
        step engines, ONNX Runtime CUDA entries); False forces the host loop (to compare the two)."""

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, threads: int | None = None, shapes: str = "dynamic") -> "LCMPipeline":
        """``shapes``: "dynamic" (default) compiles every engine once for every size and batch the entry was
        built for; "static" compiles each engine at its first call for that call's shapes, and again when a
        call brings others (OpenVINO entries: faster images, e.g. 7-15 % at 256² for SD 1.5 on an AMX Xeon;
        a switch of size, guidance or between no adapter and some costs a compile); "auto": static where the
        backend can."""
        d = Path(engine_dir)
        m = read_manifest(d)
        fix = f"rebuild it with `lcm-export build-engine --engine-dir {d} --force`"
        sched_path = inside(d, m["scheduler"]["file"], str(d / MANIFEST), fix)
        toks = {k: m[k] for k in ("tokenizer", "tokenizer_2") if k in m}
        paths = {k: inside(d, t["file"], str(d / MANIFEST), fix) for k, t in toks.items()}
        for p in [sched_path, *paths.values()]:
            if not p.is_file():
                raise UserError(f"{p} is missing from the engine dir; {fix}")
        tokenizers = {k: _tokenizer(paths[k], t, d) for k, t in toks.items()}
        return cls(m, d, load_engines(m, d, threads, shapes), tokenizers, _scheduler_config(sched_path, d))

    # ------------------------------------------------------------------------------------------
    def _plan_for(self, comp: str, h: int, w: int):
        engines = self.engines[comp]
        if "*" in engines:
            return engines["*"]
        if "all" in engines:
            return engines["all"]
        for p in self.manifest["shape_plans"]:
            if p["min_hw"][0] <= h <= p["max_hw"][0] and p["min_hw"][1] <= w <= p["max_hw"][1] and p["name"] in engines:
                return engines[p["name"]]
        raise self._resolution_error(h, w)

    def _resolution_error(self, h: int, w: int) -> UserError:
        from ..core.shapes import MAX_SIDE

        built = ", ".join(self.manifest["resolutions"])
        dyn = [p["name"] for p in self.manifest["shape_plans"] if not p["static"]]
        extra = f" (dynamic range {', '.join(dyn)})" if dyn else ""
        multiple = int(self.manifest.get("size_multiple", 64))
        if h <= MAX_SIDE and w <= MAX_SIDE and not h % multiple and not w % multiple:
            fix = f"use one of those, or rebuild with --resolution {h}x{w}"
        else:  # no entry can hold it: do not suggest building one
            fix = f"use one of those (this model takes sides that are multiples of {multiple}, at most {MAX_SIDE})"
        return UserError(f"resolution {h}x{w} was not built into {self.engine_dir}; built: {built}{extra}; {fix}")

    def _check_resolution(self, h: int, w: int) -> None:
        if (h, w) in self.resolutions:
            return
        multiple = int(self.manifest.get("size_multiple", 64))
        for p in self.manifest["shape_plans"]:
            if not p["static"] and p["min_hw"][0] <= h <= p["max_hw"][0] and p["min_hw"][1] <= w <= p["max_hw"][1]:
                if h % multiple or w % multiple:  # the UNet's skip connections need this, not just latent = image/8
                    raise UserError(f"resolution {h}x{w}: this UNet needs sides that are multiples of {multiple}; "
                                    f"try {max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}")
                return
        raise self._resolution_error(h, w)

    def _check_finite(self, arr: np.ndarray, comp: str, step: int | None = None) -> None:
        # a sum is finite exactly when no element is NaN/inf, unless it overflows: then check element-wise
        if not np.isfinite(np.add.reduce(arr, axis=None)) and not np.isfinite(arr).all():
            raise self._nonfinite(comp, step)

    @staticmethod
    def _nonfinite(comp: str, step: int | None = None) -> NonFiniteOutput:
        where = f" at step {step + 1}" if step is not None else ""
        return NonFiniteOutput(f"the {comp} engine produced NaN/inf{where} (fp16 overflow?); nothing was written — rebuild "
                               f"with --precision fp32{' or --vae-fp32' if comp == 'vae_decoder' else ''}")

    def _default_hw(self) -> tuple[int, int]:
        """The model's default resolution if it was built, else the first built one."""
        default = tuple(self.manifest.get("default_resolution") or ())
        return default if default in self.resolutions else self.resolutions[0]

    def _encode(self, prompt, negative_prompt, batch, cfg, h, w, t: "Timings", adapter_feeds: dict):
        """Text embeddings [N,77,D] (N = 2B with guidance: uncond first) and, for SDXL, pooled [N,P]."""
        t0 = time.perf_counter()
        zero_uncond = cfg and self.xl and negative_prompt is None and self.manifest.get("force_zeros_for_empty_prompt")
        texts = list(prompt) if isinstance(prompt, list) else [prompt] * batch
        if cfg and not zero_uncond:
            texts = [negative_prompt or ""] * batch + texts
        ids = {k: tok(texts) for k, tok in self.tokenizers.items()}
        t.tokenize = time.perf_counter() - t0
        t0 = time.perf_counter()
        if not self.xl:
            emb = self._plan_for("text_encoder", h, w).run({"input_ids": ids["tokenizer"], **adapter_feeds.get("text_encoder", {})})
            pooled = None
        else:
            h1 = self._plan_for("text_encoder", h, w).run({"input_ids": ids["tokenizer"], **adapter_feeds.get("text_encoder", {})})
            te2 = self._plan_for("text_encoder_2", h, w)
            out2 = self._by_name(te2, te2.run_all({"input_ids": ids["tokenizer_2"], **adapter_feeds.get("text_encoder_2", {})}),
                                 "text_encoder_2")
            h2, pooled = out2["hidden_states"], out2["text_embeds"]
            emb = np.concatenate([h1, h2], axis=-1)
        t.text_encoder = time.perf_counter() - t0
        self._check_finite(emb, "text_encoder")
        if zero_uncond:  # diffusers SDXL: zeros for the unconditional branch when no negative prompt
            emb = np.concatenate([np.zeros_like(emb), emb])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        return np.ascontiguousarray(emb, dtype=np.float32), pooled

    def _by_name(self, engine, outputs: list, comp: str) -> dict[str, np.ndarray]:
        """{output name: array}: names from the engine (ORT/TensorRT: str; OpenVINO: ports), else the manifest."""
        names = getattr(engine, "outputs", None)
        if names is None:
            names = [o[0] for o in self.manifest["components"][comp]["outputs"]]
        names = [n if isinstance(n, str) else n.get_any_name() for n in names]
        out = dict(zip(names, outputs))
        want = [o[0] for o in self.manifest["components"][comp]["outputs"]]
        missing = [n for n in want if n not in out]
        if missing:
            raise UserError(f"the {comp} engine has no output {', '.join(missing)} (it has {', '.join(names)}); rebuild with "
                            f"`lcm-export build-engine --engine-dir {self.engine_dir} --force`")
        return out

    def _device_loop(self, unet, cfg: bool, vae):
        """The device loop for this UNet engine and guidance mode (cached), or None: host loop."""
        if not self.device_loop:
            return None
        key = (id(unet), cfg, id(vae))
        if key not in self._device_loops:
            self._device_loops[key] = device_loop_for(unet, cfg, vae)
        return self._device_loops[key]

    def _decoder_input(self, x: np.ndarray) -> np.ndarray:
        """Latents -> VAE decoder input, in place on ``x`` (the scheduler's fresh output); the same
        float32 operations as the step graph's ``latent`` output (identity factors skipped)."""
        if (self._vae_div != 1).any():
            x /= self._vae_div  # as diffusers: latents / scaling_factor
        if (self._vae_mul != 1).any():
            x *= self._vae_mul
        if self._vae_add.any():
            x += self._vae_add
        return x

    def _postprocess(self, img: np.ndarray, output_type: str):
        """[-1, 1] NCHW floats -> images as diffusers does ((x / 2 + 0.5).clamp(0, 1) * 255, rounded), in one
        reused planar buffer (contiguous passes; the NCHW -> NHWC interleave is PIL's merge, in C)."""
        buf = self._post_buffers.get(img.shape)
        if buf is None:
            if len(self._post_buffers) >= POST_BUFFER_SHAPES:  # a server sees many batch sizes: keep a few
                self._post_buffers.clear()
                self._post_u8.clear()
            buf = self._post_buffers.setdefault(img.shape, np.empty(img.shape, np.float32))
        np.multiply(img, np.float32(0.5), out=buf)
        buf += np.float32(0.5)
        np.clip(buf, 0.0, 1.0, out=buf)
        if output_type == "np":
            return np.ascontiguousarray(buf.transpose(0, 2, 3, 1))
        buf *= np.float32(255)
        planes = self._post_u8.get(img.shape)
        if planes is None:
            planes = self._post_u8.setdefault(img.shape, np.empty(img.shape, np.uint8))
        np.rint(buf, out=planes, casting="unsafe")  # rounded in float, stored as uint8: one pass, not two
        # merge copies the planes into the image; a one-plane image would share the reused buffer: copied
        return [Image.merge("RGB", [Image.fromarray(c) for c in p]) if p.shape[0] == 3 else Image.fromarray(p[0].copy())
                for p in planes]

    def check_args(self, prompt: str | list[str], negative_prompt: str | None = None, steps: int = 4, guidance: float = 1.0,
                   seed: int = 0, batch: int = 1, height: int | None = None, width: int | None = None,
                   output_type: str = "pil", adapters: dict | None = None) -> tuple[int, float, int, int, int, int]:
        """Check ``__call__``'s plain arguments without running anything (a server validates before it
        queues); return (steps, guidance, seed, batch, height, width) with the default size filled in.
        Raises one ``UserError`` naming the bad argument."""
        steps, guidance, seed, batch, height, width = check_scalars(
            prompt, negative_prompt, steps, guidance, seed, batch, height, width, output_type, MAX_STEPS)
        h, w = (height, width) if height is not None else self._default_hw()
        self._check_resolution(h, w)
        check_call_memory(batch, steps, h, w, self.latent_channels)
        self.adapters.check(adapters)
        return steps, guidance, seed, batch, h, w

    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None, steps: int = 4, guidance: float = 1.0,
                 seed: int = 0, batch: int = 1, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, step_noise: list[np.ndarray] | None = None, output_type: str = "pil",
                 adapters: dict[str, float] | None = None):
        """Generate ``batch`` images. guidance > 1 runs classifier-free guidance (UNet at batch 2B).
        ``prompt`` may be a list of ``batch`` prompts, one per image. ``adapters`` ({name: λ}) applies
        style adapters the entry holds (``lcm-export adapter add``) to this call only."""
        # 0. Every argument checked before any engine runs (one UserError naming the argument)
        steps, guidance, seed, batch, h, w = self.check_args(
            prompt, negative_prompt, steps, guidance, seed, batch, height, width, output_type)
        adapter_feeds = self.adapters.feeds(self.adapters.check(adapters))
        cfg = guidance > 1.0
        lh, lw = h // 8, w // 8
        shape = (batch, self.latent_channels, lh, lw)
        check_latents(latents, step_noise, steps, shape)
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)

        t = Timings()
        t_start = time.perf_counter()

        # 1.-2. Tokenize and encode (uncond first, as diffusers concatenates [uncond, cond])
        emb, pooled = self._encode(prompt, negative_prompt, batch, cfg, h, w, t, adapter_feeds)
        extra = dict(adapter_feeds.get("unet", {}))
        if self.xl:  # SDXL added conditioning: pooled text embedding + (original, crop, target) sizes
            extra.update({"text_embeds": pooled,
                          "time_ids": np.tile(np.array([h, w, 0, 0, h, w], np.float32), (emb.shape[0], 1))})

        # 3. Denoising loop
        t0 = time.perf_counter()
        sched = LCMScheduler.from_config(self.scheduler_config)
        timesteps = sched.set_timesteps(steps)
        unet = self._plan_for("unet", h, w)
        x = np.ascontiguousarray(latents, dtype=np.float32) * np.float32(sched.init_noise_sigma)
        t.scheduler += time.perf_counter() - t0

        def noise(i: int) -> np.ndarray | None:  # the same draws, in the same order, on both loops
            if i == steps - 1:
                return None
            return step_noise[i] if step_noise is not None else rng.standard_normal(shape, dtype=np.float32)

        vae = self._plan_for("vae_decoder", h, w)
        loop = self._device_loop(unet, cfg, vae)
        if loop is not None:  # 3.-4. on the device: latents stay there until the decoder's output
            t0 = time.perf_counter()
            coefs = [sched.step_coefficients(int(ts), guidance) for ts in timesteps]
            t.scheduler += time.perf_counter() - t0
            zeros = np.zeros(shape, np.float32)
            img, bad_step = loop.run(x, {"encoder_hidden_states": emb, **extra}, timesteps, coefs,
                                     lambda i: zeros if i == steps - 1 else noise(i), vae, self._affine, t)
            if bad_step is not None:
                raise self._nonfinite("unet", bad_step)
        else:
            for i, ts in enumerate(timesteps):
                t0 = time.perf_counter()
                x_in = np.concatenate([x, x]) if cfg else x
                tt = np.full((x_in.shape[0],), ts, dtype=np.float32)
                out = unet.run({"sample": x_in, "timestep": tt, "encoder_hidden_states": emb, **extra})
                t.unet.append(time.perf_counter() - t0)
                self._check_finite(out, "unet", i)
                t0 = time.perf_counter()
                if cfg:
                    uncond, cond = out[:batch], out[batch:]
                    out = uncond + np.float32(guidance) * (cond - uncond)
                x, _ = sched.step(out, int(ts), x, noise=noise(i))
                t.scheduler += time.perf_counter() - t0

            # 4. VAE decode
            t0 = time.perf_counter()
            z = self._decoder_input(np.ascontiguousarray(x, dtype=np.float32))
            t1 = time.perf_counter()
            img = vae.run({"latent": z})
            t.vae_input, t.vae_decoder = t1 - t0, time.perf_counter() - t1
        self._check_finite(img, "vae_decoder")

        # 5. Post-process as diffusers does: [-1, 1] -> [0, 1] -> uint8 -> PIL (NHWC)
        t0 = time.perf_counter()
        result = self._postprocess(img, output_type)
        t.postprocess = time.perf_counter() - t0
        t.total = time.perf_counter() - t_start
        self.last_timings = t
        return result
