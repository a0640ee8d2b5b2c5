"""One competitor in one fresh process, for `competitors.py`: load, first image, warm images; or a run of
style-adapter switches. Standard library at the top: each kind imports only its own stack, so the same
file runs in the project's venv (lcm-export's lean runtime, OpenVINO GenAI, diffusers) and in
optimum-intel's own venv.

Usage (by competitors.py): python competitors_worker.py SPEC_JSON  -> last stdout line "RESULT {json}".
The result holds ``first_done_at`` (time.time() when the first image was done: the parent, which knows
when it started the process, gets the cold start from it) and ``peak_rss_first_mb`` (VmHWM right after
the first image: the process's peak from its start to its first image). Errors are one line, never a
traceback: {"error": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import time

KINDS = ("lcm", "genai", "optimum-sd", "optimum-lcm", "diffusers", "sdcpp", "reference")
PACKAGES = ("lcm-export", "numpy", "openvino", "openvino-genai", "openvino-tokenizers", "optimum", "optimum-intel", "nncf",
            "diffusers", "transformers", "huggingface-hub", "torch", "peft", "accelerate", "safetensors", "tokenizers",
            "onnxruntime", "stable-diffusion-cpp-python")


def one_line_error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {msg}"[:400]


def ov_type(t) -> str:
    """An OpenVINO element type as its short name (bf16, f32, ...)."""
    return t.to_string() if hasattr(t, "to_string") else str(t)


def peak_rss_mb() -> float:
    """VmHWM of this process in MB (the peak since exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "executable": sys.executable}
    for n in PACKAGES:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def to_uint8(img):
    """An image as uint8 HWC (first of the batch)."""
    import numpy as np

    a = np.asarray(img)
    if a.ndim == 4:
        a = a[0]
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return a


def load_noise(path: str) -> list:
    """The reference's noise (``competitors.py`` writes it: torch's CPU generator seeded with the seed, drawn in
    the order diffusers draws: the initial latents, then one array per LCM step but the last)."""
    import numpy as np

    with np.load(path) as z:
        return [z[f"noise_{i}"] for i in range(len(z.files))]


def _stages(text_encoder=None, unet_steps=(), vae_decoder=None, total=None) -> dict:
    return {"text_encoder": text_encoder, "unet_steps": list(unet_steps), "vae_decoder": vae_decoder, "total": total}


class _Timer:
    """Wraps a callable attribute and records each call's wall time (diffusers / optimum-intel stages)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            self.times.setdefault(name, []).append(time.perf_counter() - t0)
            return r

        setattr(obj, attr, timed)

    def take(self) -> dict:
        t, self.times = self.times, {}
        return _stages(sum(t.get("text_encoder", [])) or None, t.get("unet", []), sum(t.get("vae_decoder", [])) or None)


# ----------------------------------------------------------------------------------------------
# Runners: load(), generate(setting) -> (image uint8, stages), switch(setting) -> {op: seconds}, precision()

class LcmRunner:
    """lcm-export's lean runtime on an engine-store entry; adapters per call (``adapters={name: λ}``)."""

    def __init__(self, s: dict):
        self.s = s

    def load(self):
        from lcm_export.runtime import LCMPipeline

        self.pipe = LCMPipeline.from_engine_dir(self.s["path"], threads=self.s["threads"], shapes=self.s.get("shapes", "dynamic"))

    def switch(self, setting: dict) -> dict:
        self.setting = setting
        return {}

    def generate(self):
        s = self.s
        kw = {}
        if s.get("noise"):  # the reference's latents and step noise (the image check)
            noise = self.noise = getattr(self, "noise", None) or load_noise(s["noise"])
            kw = {"latents": noise[0], "step_noise": noise[1:]}
        img = self.pipe(s["prompt"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"], height=s["height"],
                        width=s["width"], output_type="np", adapters=dict(getattr(self, "setting", {})) or None, **kw)
        t = self.pipe.last_timings
        return to_uint8(img), _stages(t.text_encoder, t.unet, t.vae_decoder, t.total)

    def precision(self) -> dict:
        m = self.pipe.manifest
        out = {"entry": m.get("precision"), "backend": m.get("backend")}
        for comp, plans in self.pipe.engines.items():
            eng = next(iter(plans.values()))
            compiled = getattr(eng, "compiled", None)
            if compiled is not None:
                out[comp] = ov_type(compiled.get_property("INFERENCE_PRECISION_HINT"))
        out["adapter_branches"] = bool(m.get("adapters"))
        from lcm_export.backends import static_shapes

        out["shapes"] = "static" if static_shapes(m, self.pipe.engine_dir, self.s.get("shapes", "dynamic")) else "dynamic"
        return out


class _OvRunner:
    """An OpenVINO-based competitor: its threads and precision as OpenVINO properties."""

    def __init__(self, s: dict):
        self.s = s
        self.props = {"INFERENCE_NUM_THREADS": s["threads"]}
        if s.get("precision"):
            self.props["INFERENCE_PRECISION_HINT"] = s["precision"]


class GenaiRunner(_OvRunner):
    """OpenVINO GenAI ``Text2ImagePipeline`` on an IR folder; adapters registered at construction and
    chosen per ``generate`` call (``adapters=AdapterConfig``; an empty config = none)."""

    def load(self):
        import openvino_genai as g

        self.g = g
        kw = dict(self.props)
        self.adapters = {}
        if self.s.get("adapters"):
            cfg = g.AdapterConfig()
            for name, path in self.s["adapters"].items():
                self.adapters[name] = g.Adapter(path)
                cfg.add(self.adapters[name], 0.0)  # registered, inactive until a call chooses it
            kw["adapters"] = cfg
        if self.s.get("static"):  # GenAI's static-shape path: reshape to the size, then compile
            self.pipe = g.Text2ImagePipeline(self.s["path"])
            self.pipe.reshape(1, self.s["height"], self.s["width"], self.s["guidance"])
            self.pipe.compile("CPU", **kw)
        else:
            self.pipe = g.Text2ImagePipeline(self.s["path"], "CPU", **kw)
        self.config = None

    def switch(self, setting: dict) -> dict:
        cfg = self.g.AdapterConfig()
        for name, w in setting.items():
            cfg.add(self.adapters[name], float(w))
        self.config = cfg
        return {}

    def generator(self):
        """A ``Generator`` that hands GenAI the reference's arrays in the order it asks for them (initial latents,
        then each LCM step's noise); zeros past the end (GenAI's last step draws noise it does not use)."""
        import numpy as np
        import openvino as ov

        noise = load_noise(self.s["noise"])
        runner = self

        class Replay(self.g.Generator):
            def __init__(self):
                super().__init__()
                self.i = 0

            def next(self):
                return 0.0

            def randn_tensor(self, shape):
                shape = tuple(shape)
                a = noise[self.i] if self.i < len(noise) else np.zeros(shape, np.float32)
                if a.shape != shape:
                    raise RuntimeError(f"replay generator: GenAI asked for {shape}, the reference has {a.shape}")
                self.i += 1
                runner.draws = self.i
                return ov.Tensor(np.ascontiguousarray(a, np.float32))

        return Replay()

    def generate(self):
        s = self.s
        kw = {"adapters": self.config} if self.config is not None else {}
        if s.get("noise"):
            kw["generator"] = self.generator()
        t = self.pipe.generate(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                               width=s["width"], rng_seed=s["seed"], **kw)
        img = t.data.copy()
        pm = self.pipe.get_performance_metrics()
        te = pm.get_text_encoder_infer_duration()
        te = sum(te.values()) if isinstance(te, dict) else float(te)
        steps = [d / 1e6 for d in pm.raw_metrics.unet_inference_durations]
        return to_uint8(img), _stages(te / 1e3, steps, pm.get_vae_decoder_infer_duration() / 1e3, pm.get_generate_duration() / 1e3)

    def precision(self) -> dict:
        """What the CPU plugin resolves these properties to (compiled on the small text encoder: the plugin's
        choice does not depend on the model), and the UNet IR's weight type."""
        import openvino as ov

        d = self.s["path"]
        compiled = ov.Core().compile_model(os.path.join(d, "text_encoder", "openvino_model.xml"), "CPU", self.props)
        out = {"inference_precision": ov_type(compiled.get_property("INFERENCE_PRECISION_HINT")), "properties": dict(self.props),
               "adapter_mode": "MODE_DYNAMIC (GenAI's CPU default for MODE_AUTO)" if self.adapters else None}
        out["unet_weights"] = _ir_weight_types(os.path.join(d, "unet", "openvino_model.xml"))
        out["shapes"] = "static (reshape + compile)" if self.s.get("static") else "dynamic"
        out["vae_decoder"] = _decoder_kind(os.path.join(d, "vae_decoder", "config.json"))
        if getattr(self, "draws", None):
            out["generator_draws"] = self.draws
        return out


def _decoder_kind(config: str) -> str:
    """"taesd" where the IR's decoder is a tiny one (``competitors_prep.py swap-decoder`` marks it), else "vae"."""
    try:
        with open(config) as f:
            return "taesd" if json.load(f).get("tiny_decoder") else "vae"
    except (OSError, ValueError):
        return "vae"


def _ir_weight_types(xml: str) -> list[str]:
    """Element types of the Constant nodes of an IR (e.g. ["f32"] or ["f32", "u8"] for int8 weights)."""
    import re

    seen = set()
    with open(xml) as f:
        for line in f:
            if 'type="Const"' in line:
                block = line
                for _ in range(3):
                    nxt = f.readline()
                    block += nxt
                    if "element_type" in nxt:
                        break
                m = re.search(r'element_type="([a-z0-9]+)"', block)
                if m:
                    seen.add(m.group(1))
    return sorted(seen)


class OptimumRunner(_OvRunner):
    """optimum-intel's OpenVINO pipeline on the same IR folder; per-stage times by wrapping each part's
    ``forward`` (``OVPipelinePart.__call__`` calls it)."""

    def load(self):
        import torch

        torch.set_num_threads(self.s["threads"])
        from optimum.intel import OVLatentConsistencyModelPipeline, OVStableDiffusionPipeline

        cls = OVLatentConsistencyModelPipeline if self.s["kind"] == "optimum-lcm" else OVStableDiffusionPipeline
        self.pipe = cls.from_pretrained(self.s["path"], ov_config=dict(self.props), compile=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.timer = _Timer()
        self.timer.wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self.timer.wrap(self.pipe.unet, "forward", "unet")
        self.timer.wrap(self.pipe.vae.decoder, "forward", "vae_decoder")
        self.torch = torch

    def switch(self, setting: dict) -> dict:
        raise RuntimeError("optimum-intel's OpenVINO pipelines take no LoRA adapters at run time")

    def generate(self):
        s = self.s
        t0 = time.perf_counter()
        img = self.pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                        width=s["width"], output_type="np", generator=self.torch.Generator().manual_seed(s["seed"])).images
        st = self.timer.take()
        st["total"] = time.perf_counter() - t0
        return to_uint8(img), st

    def precision(self) -> dict:
        out = {"scheduler": type(self.pipe.scheduler).__name__, "properties": dict(self.props)}
        for comp, part in (("text_encoder", self.pipe.text_encoder), ("unet", self.pipe.unet), ("vae_decoder", self.pipe.vae.decoder)):
            out[comp] = ov_type(part.request.get_property("INFERENCE_PRECISION_HINT"))
        out["unet_weights"] = _ir_weight_types(os.path.join(self.s["path"], "unet", "openvino_model.xml"))
        out["vae_decoder"] = _decoder_kind(os.path.join(self.s["path"], "vae_decoder", "config.json"))
        return out


class DiffusersRunner:
    """diffusers ``StableDiffusionPipeline`` + LCMScheduler, every module in ``dtype`` (bf16). Adapters:
    ``mode="fuse"`` (load_lora_weights + fuse_lora; unfuse_lora + unload_lora_weights to leave) or
    ``mode="set_adapters"`` (every adapter loaded once, then set_adapters / disable_lora, unfused)."""

    def __init__(self, s: dict):
        self.s = s
        self.mode = s.get("adapter_mode")
        self.loaded: dict[str, float] = {}
        self.fused = False
        self.register_s = {}

    def load(self):
        import torch

        torch.set_num_threads(self.s["threads"])
        from diffusers import LCMScheduler, StableDiffusionPipeline
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dtype = getattr(torch, self.s.get("dtype", "bfloat16"))
        self.pipe = StableDiffusionPipeline.from_pretrained(self.s["path"], torch_dtype=dtype, safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.timer = _Timer()
        self.timer.wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self.timer.wrap(self.pipe.unet, "forward", "unet")
        self.timer.wrap(self.pipe.vae, "decode", "vae_decoder")
        self.torch = torch
        if self.mode == "set_adapters":  # every adapter loaded once, none active
            for name, path in self.s["adapters"].items():
                t0 = time.perf_counter()
                self.pipe.load_lora_weights(path, adapter_name=name)
                self.register_s[f"load_lora_weights {name}"] = time.perf_counter() - t0
            self._note_lora_dtype()
            self.pipe.disable_lora()

    def _note_lora_dtype(self) -> None:
        if not hasattr(self, "lora_dtypes"):
            self.lora_dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in self.pipe.unet.named_parameters()
                                       if ".lora_" in n})

    def switch(self, setting: dict) -> dict:
        ops: dict[str, float] = {}

        def op(name, fn, *a, **k):
            t0 = time.perf_counter()
            fn(*a, **k)
            ops[name] = ops.get(name, 0.0) + time.perf_counter() - t0

        p = self.pipe
        names, weights = list(setting), [float(w) for w in setting.values()]
        if self.mode == "set_adapters":
            if not setting:
                op("disable_lora", p.disable_lora)
            else:
                op("enable_lora", p.enable_lora)
                op("set_adapters", p.set_adapters, names, weights)
            return ops
        if self.mode != "fuse":
            raise RuntimeError(f"unknown diffusers adapter mode {self.mode!r}")
        if self.fused:
            op("unfuse_lora", p.unfuse_lora)
            self.fused = False
        if set(self.loaded) != set(setting) and self.loaded:
            op("unload_lora_weights", p.unload_lora_weights)
            self.loaded = {}
        if setting:
            for name in names:
                if name not in self.loaded:
                    op("load_lora_weights", p.load_lora_weights, self.s["adapters"][name], adapter_name=name)
            op("set_adapters", p.set_adapters, names, weights)
            self._note_lora_dtype()
            op("fuse_lora", p.fuse_lora, adapter_names=names, lora_scale=1.0)
            self.loaded, self.fused = dict(setting), True
        return ops

    def generate(self):
        s = self.s
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            img = self.pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                            width=s["width"], output_type="np",
                            generator=self.torch.Generator().manual_seed(s["seed"])).images
        st = self.timer.take()
        st["total"] = time.perf_counter() - t0
        return to_uint8(img), st

    def precision(self) -> dict:
        t = self.torch
        out = {}
        for name, m in self.pipe.components.items():
            if isinstance(m, t.nn.Module):
                out[name] = sorted({str(p.dtype).removeprefix("torch.") for n, p in m.named_parameters() if ".lora_" not in n})
        if hasattr(self, "lora_dtypes"):
            out["lora_factors"] = self.lora_dtypes
            out["adapter_mode"] = self.mode
        return out


class SdcppRunner:
    """stable-diffusion.cpp (stable-diffusion-cpp-python) on one file in the original SD layout (a gguf of one
    weight type, or the fp32 safetensors with ``wtype`` converting at load), TAESD decoding (``taesd_path``),
    the LCM sampler and schedule, cfg 1 (one UNet pass per step). Its noise comes from its own generator
    (``rng_type="cpu"``: sd.cpp's port of torch's CPU randn, seeded with the seed); stage times from its log:
    text encoder ("get_learned_condition completed"), UNet ("sampling completed" / steps: a mean, not each
    step), decoder ("decode_first_stage completed"), each in 10 ms units."""

    LOG_KEYS = {"get_learned_condition completed": "text_encoder", "sampling completed": "sampling",
                "decode_first_stage completed": "vae_decoder"}
    LOG_PATTERN = __import__("re").compile(
        r"(get_learned_condition completed|sampling completed|decode_first_stage completed), taking ([0-9.]+)s")

    def __init__(self, s: dict):
        self.s = s
        self.log: dict[str, float] = {}

    def load(self):
        import ctypes

        import stable_diffusion_cpp as sdc
        from stable_diffusion_cpp import StableDiffusion

        pat = self.LOG_PATTERN

        @sdc.sd_log_callback
        def on_log(level, text, data):
            m = pat.search(text.decode("utf-8", "replace"))
            if m:
                self.log[self.LOG_KEYS[m.group(1)]] = float(m.group(2))

        self._cb = on_log  # kept alive: sd.cpp calls it
        s = self.s
        self.sd = StableDiffusion(model_path=s["path"], taesd_path=s.get("taesd") or "", n_threads=s["threads"],
                                  wtype=s.get("wtype") or "default", rng_type="cpu", sampler_rng_type="cpu",
                                  vae_decode_only=True, verbose=True)
        sdc.sd_set_log_callback(on_log, ctypes.c_void_p(0))  # after the constructor: it sets its own

    def switch(self, setting: dict) -> dict:
        raise RuntimeError("the sd.cpp competitor takes no adapters here")

    def generate(self):
        import numpy as np

        s = self.s
        self.log = {}
        t0 = time.perf_counter()
        imgs = self.sd.generate_image(prompt=s["prompt"], width=s["width"], height=s["height"], cfg_scale=s["guidance"],
                                      sample_method="lcm", scheduler="lcm", sample_steps=s["steps"], seed=s["seed"])
        total = time.perf_counter() - t0
        img = np.asarray(imgs[0].convert("RGB"), dtype=np.uint8)
        lg = self.log
        steps = [lg["sampling"] / s["steps"]] * s["steps"] if "sampling" in lg else []
        return img, _stages(lg.get("text_encoder"), steps, lg.get("vae_decoder"), total)

    def precision(self) -> dict:
        return {"sdcpp_weights": self.s.get("wtype") or "as stored", "file": os.path.basename(self.s["path"]),
                "vae_decoder": "taesd" if self.s.get("taesd") else "vae", "rng": "cpu (torch CPU randn port)",
                "unet_step": "mean of the sampling time"}


class ReferenceRunner:
    """PyTorch fp32 (diffusers ``StableDiffusionPipeline`` + LCMScheduler) on the reference noise: writes the
    noise (``spec["noise"]``) and the images decoded from the same final latents by the model's VAE and by the
    tiny decoder (``spec["taesd"]``). Run once per resolution, not timed."""

    def __init__(self, s: dict):
        self.s = s

    def load(self):
        import torch

        torch.set_num_threads(self.s["threads"])
        from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(self.s["path"], torch_dtype=torch.float32, safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.taesd = AutoencoderTiny.from_pretrained(self.s["taesd"]).eval() if self.s.get("taesd") else None
        self.torch = torch

    def generate(self):
        import numpy as np

        s, torch = self.s, self.torch
        shape = (1, self.pipe.unet.config.in_channels, s["height"] // 8, s["width"] // 8)
        g = torch.Generator().manual_seed(s["seed"])
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(s["steps"])]
        np.savez(s["noise"], **{f"noise_{i}": n.numpy() for i, n in enumerate(noise)})
        g = torch.Generator().manual_seed(s["seed"])
        torch.randn(shape, generator=g, dtype=torch.float32)  # the pipeline draws the step noise after the latents
        t0 = time.perf_counter()
        with torch.inference_mode():
            lat = self.pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                            width=s["width"], latents=noise[0], generator=g, output_type="latent").images
            dt = time.perf_counter() - t0
            out = {}
            vae = self.pipe.vae
            out["vae"] = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
            if self.taesd is not None:
                out["taesd"] = self.taesd.decode(lat / self.taesd.config.scaling_factor, return_dict=False)[0]
        imgs = {k: (v[0].permute(1, 2, 0).clamp(-1, 1).float().numpy() + 1.0) / 2.0 for k, v in out.items()}
        for k, v in imgs.items():
            np.save(os.path.join(s["image_dir"], f"reference-{k}.npy"), to_uint8(v))
        return to_uint8(imgs["vae"]), _stages(total=dt)

    def precision(self) -> dict:
        return {"reference": "torch fp32", "decoders": ["vae"] + (["taesd"] if self.taesd is not None else [])}


RUNNERS = {"lcm": LcmRunner, "genai": GenaiRunner, "optimum-sd": OptimumRunner, "optimum-lcm": OptimumRunner,
           "diffusers": DiffusersRunner, "sdcpp": SdcppRunner, "reference": ReferenceRunner}


# ----------------------------------------------------------------------------------------------

def timed_image(runner) -> dict:
    t0 = time.perf_counter()
    img, st = runner.generate()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "stages": st, "_img": img}


def run_plain(runner, s: dict, res: dict) -> None:
    """First image (cold), ``warmup - 1`` more untimed, then ``repeats`` timed."""
    first = timed_image(runner)
    res["first_done_at"] = time.time()
    res["peak_rss_first_mb"] = peak_rss_mb()
    res["first_image_s"] = first["seconds"]
    img = first.pop("_img")
    res["image"] = {"shape": list(img.shape), "mean": float(img.mean()), "std": float(img.std())}
    if s.get("image_out"):  # the first image, for the image check (competitors.py compares it with a reference)
        import numpy as np

        np.save(s["image_out"], img)
        res["image"]["saved"] = s["image_out"]
    for _ in range(max(0, s["warmup"] - 1)):
        runner.generate()
    res["images"] = []
    for _ in range(s["repeats"]):
        r = timed_image(runner)
        r.pop("_img")
        res["images"].append(r)


def run_adapters(runner, s: dict, res: dict) -> None:
    """The switch sequence, ``passes`` times: at each setting the first image after the switch, then a warm
    one with the same setting. The first pass meets each choice of adapters for the first time in this
    process; later passes have seen it before."""
    import numpy as np

    runner.switch({})
    first = timed_image(runner)
    res["first_done_at"] = time.time()
    res["peak_rss_first_mb"] = peak_rss_mb()
    res["first_image_s"] = first["seconds"]
    ref = first.pop("_img")
    for _ in range(max(0, s["warmup"] - 1)):
        runner.generate()
    res["passes"] = []
    for p in range(s["passes"]):
        rows = []
        for label, setting in s["sequence"]:
            t0 = time.perf_counter()
            ops = runner.switch(setting)
            ops_s = time.perf_counter() - t0
            try:
                a = timed_image(runner)
            except Exception as exc:  # GenAI 2026.4: see the note in the report; the call is tried again once
                first_error = one_line_error(exc)
                a = timed_image(runner)
            else:
                first_error = None
            b = timed_image(runner)
            img = a.pop("_img")
            b.pop("_img")
            diff = np.abs(img.astype(np.int16) - ref.astype(np.int16))
            rows.append({"label": label, "setting": setting, "ops": ops, "ops_s": ops_s, "first": a, "warm": b,
                         "switch_s": ops_s + a["seconds"] - b["seconds"],
                         "image_vs_none": {"mean_abs": float(diff.mean()), "max_abs": int(diff.max())},
                         **({"first_call_error": first_error} if first_error else {})})
        res["passes"].append(rows)
    res["register_s"] = getattr(runner, "register_s", {})


def main() -> None:
    s = json.loads(sys.argv[1])
    res: dict = {"kind": s["kind"], "started_at": time.time()}
    try:
        t0 = time.perf_counter()
        runner = RUNNERS[s["kind"]](s)
        runner.load()
        res["load_s"] = time.perf_counter() - t0
        res["load_done_at"] = time.time()
        if s.get("scenario") == "adapters":
            run_adapters(runner, s, res)
        else:
            run_plain(runner, s, res)
        res["precision"] = runner.precision()
        res["peak_rss_mb"] = peak_rss_mb()
    except Exception as exc:  # one line for the report; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        res["error"] = one_line_error(exc)
    res["versions"] = versions()
    sys.stdout.flush()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
