"""TensorRT engines through Polygraphy's API (never a CLI): fp16, optimisation profiles, a timing
cache shared across builds, a refittable option, and an fp32 VAE decoder when fp16 overflows.

Two TensorRT lines are supported (``build_config``):
- TensorRT 10: the exported fp32 ONNX, weakly typed, with the builder's fp16 flag;
- TensorRT 11: strong typing is always on and the fp16 flag is gone, so the precision lives in the
  graph: the fp32 ONNX is converted to fp16 with fp32 inputs/outputs (``fp16_onnx``).
fp32 engines allow TF32 on both (Polygraphy clears it unless asked).

This file is the build half (and the backend interface); ``tensorrt_runtime.py`` is the runtime half
(``TrtEngine``, device buffers, CUDA graphs, finding libcudart), re-exported here. Everything that can
be decided without TensorRT is a pure function (``build_plan``, ``lcm_step_plan``, ``build_config``,
``check_feeds``, ``cuda_runtime_dirs``) and is tested on CPU machines, as is ``TrtEngine``'s control
flow against stub objects; the functions that import TensorRT run only where it and a CUDA GPU exist.
None of it has run on real TensorRT yet (see the README).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._util import writing
from ..errors import UserError
from ..core.shapes import ShapePlan, component_profiles
from ..core.step_graph import COEF, write_lcm_step_onnx
from . import entry_file, rebuild_hint
from .tensorrt_runtime import (  # noqa: F401 (the runtime half; check_feeds & co. re-exported for callers of this module)
    TrtEngine, check_feeds, cuda_graphs_enabled, cuda_runtime_dirs, ensure_cuda_runtime, tensorrt_cuda_major)

NAME = "tensorrt"
PRECISIONS = ("fp16", "fp32")
COMPONENT_PRECISIONS = ("fp16", "fp32", "mixed")
"""An fp16 entry's VAE decoder may be rebuilt in fp32 (overflow): that component records "mixed"."""
SECTION = {  # the manifest section's values the runtime reads (checked with the manifest's schema)
    "tensorrt": lambda v: isinstance(v, str),
    "builds": lambda v: isinstance(v, list) and all(isinstance(i, dict) and isinstance(i.get("file"), str) for i in v),
    "compute_capability": lambda v: v is None or isinstance(v, str),
}
SPEED_RANK = {"fp16": 0, "fp32": 0}
VERIFY_IN_BUILD = False  # parity is ONNX vs PyTorch; benchmarks/gpu_check.py checks the engines on a GPU
REFIT = True
"""Refit: engines built with --refit take new weights through TensorRT's refitter, fed the patched ONNX
(weights are named after the ONNX initializers); never run here (no TensorRT), the plan is unit-tested."""
REFIT_NEEDS_FLAG = True
"""Only engines built with ``--refit`` (refittable, slightly slower) can take new weights."""
ADAPTERS = False
"""Adapter inputs would need an optimization profile per factor; not written yet."""
MERGE_EXACT = False
"""Not measured on a GPU: ``serve`` merges requests only when ``--max-batch-size`` asks."""

INSTALL_HINT = ("install TensorRT on a machine with an NVIDIA GPU: pip install 'lcm-export[tensorrt]' "
                "--extra-index-url https://pypi.nvidia.com (or use --backend onnxruntime)")
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default: good engines without hour-long builds
TESTED_MAJORS = (10, 11)  # pyproject's tensorrt extra pins <12 to match


def status() -> tuple[bool, str, str]:
    ok, why = tensorrt_status()
    return ok, "cuda", "ok" if ok else f"{why}; {INSTALL_HINT}"


def default_precision(device: str, cpu_bf16: bool) -> str:
    return "fp16"


def entry_settings(threads: int | None, device: str) -> dict:
    return {}


def refit_component(job, record: dict) -> dict:
    """New weights into the refittable engines of ``record``: TensorRT's ONNX-parser refitter reads
    the patched exported graph (``job.onnx``) and sets every weight by its initializer name. Anything
    it cannot do raises RefitImpossible (the build then takes the full path, saying why)."""
    import tensorrt as trt

    from . import RefitImpossible

    ensure_cuda_runtime()
    builds = {i["file"]: i for i in job.section.get("builds", [])}
    logger = trt.Logger(trt.Logger.ERROR)
    for plan, file in record["engines"].items():
        item = builds.get(file)
        if item is None or not item.get("refittable"):
            raise RefitImpossible(f"{file} was not built refittable (build with --refit)")
        if build_config(item, trt.__version__)["onnx"] == "fp16":
            raise RefitImpossible(f"TensorRT {trt.__version__} builds fp16 engines from a converted fp16 graph, whose "
                                  "weights the refitter cannot take from the fp32 export; refitting them is not supported yet")
        with trt.Runtime(logger) as runtime:
            engine = runtime.deserialize_cuda_engine((job.previous / file).read_bytes())
        if engine is None:
            raise RefitImpossible(f"{job.previous / file} could not be deserialized for a refit")
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(job.onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RefitImpossible(f"TensorRT could not read the new weights for {file} ({errors or 'no detail'})")
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise RefitImpossible(f"TensorRT could not refit {file}" + (f" (weights missing: {', '.join(missing[:5])})" if missing else ""))
        out = job.out_dir / file
        out.parent.mkdir(parents=True, exist_ok=True)
        with writing(out), engine.serialize() as blob, open(out, "wb") as f:
            f.write(blob)
    relink_weightless(record, job.previous, job.out_dir)
    return {"refitted": True}


def refit_weight_count(weight_map: dict, modules: list[str]) -> int:
    """How many engine weights a refit of ``modules`` sets (recorded in the refit record); UserError for
    a module with no refittable weight."""
    from ..core.onnx_weights import trt_refit_plan

    return len(trt_refit_plan(weight_map, modules))


def relink_weightless(record: dict, previous: Path, out_dir: Path) -> list[str]:
    """The component's files that hold no weights (the LCM step engines), linked (or copied) back from
    the entry being refit: the refit drops every file of a component it re-derives. Returns them."""
    engines = set(record["engines"].values())
    kept = [f for f in record.get("files", []) if f not in engines]
    for f in kept:
        dst = out_dir / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(previous / f, dst)
        except OSError:
            shutil.copy2(previous / f, dst)
    return kept


def build_component(job) -> dict:
    """One engine per shape plan (text encoders: one for all), fp16 VAE rebuilt in fp32 on overflow."""
    import tensorrt as trt

    ensure_cuda_runtime()
    dims = job.dims
    items = build_plan([job.component], job.plans, dims["text_dim"], job.precision, job.vae_fp32, job.refit,
                       dims["latent_channels"], dims["pooled_dim"])
    if "tensorrt" not in job.section:
        job.section.update({"tensorrt": trt.__version__, **gpu_info(), "builds": []})
    cache = timing_cache_path(job.store_root, trt.__version__, job.section.get("compute_capability", "unknown"))
    job.section["timing_cache"] = str(cache)
    graphs = {"fp32": job.onnx}

    def graph_for(cfg: dict) -> Path:  # the fp16 graph is converted once per component, on first need
        if cfg["onnx"] not in graphs:
            graphs[cfg["onnx"]] = fp16_onnx(job.onnx, job.onnx.with_name("model.fp16.onnx"))
        return graphs[cfg["onnx"]]

    for item in items:
        cfg = build_config(item, trt.__version__)
        build_engine_file(graph_for(cfg), job.out_dir / item["file"], item, cache, cfg)
        if item["component"] == "vae_decoder" and item["fp16"] and job.sample_feeds:
            if not engine_outputs_finite(job.out_dir / item["file"], job.sample_feeds):
                item["fp16"] = False
                item["fp32_reason"] = "fp16 overflow (non-finite output) detected after build"
                cfg = build_config(item, trt.__version__)
                build_engine_file(graph_for(cfg), job.out_dir / item["file"], item, cache, cfg)
        item["typing"] = "strong" if cfg["strongly_typed"] else "weak"
    steps = lcm_step_plan(items) if job.component == "unet" else []
    if steps:  # the LCM step as its own small fp32 engine: latents stay on the GPU (runtime/device_loop.py)
        with tempfile.TemporaryDirectory() as scratch:
            step_graphs = {cfg: write_lcm_step_onnx(Path(scratch) / f"lcm_step_{cfg}.onnx", cfg) for cfg in (False, True)}
            for item in steps:
                build_engine_file(step_graphs[item["cfg"]], job.out_dir / item["file"], item, cache,
                                  build_config(item, trt.__version__))
    job.section["builds"] += items + steps
    fp16 = [i["fp16"] for i in items]
    return {"engines": {i["plan"]: i["file"] for i in items}, "files": [i["file"] for i in items + steps],
            "precision": "fp16" if all(fp16) else ("fp32" if not any(fp16) else "mixed"),
            "parity_note": "ONNX vs PyTorch fp32; run benchmarks/gpu_check.py for TensorRT fp16 parity"}


def check(manifest: dict, engine_dir: Path) -> list[str]:
    check_tensorrt_compat(manifest, engine_dir)
    return []


def load_engine(manifest: dict, engine_dir: Path, component: str, path: Path, threads: int | None = None):
    """The engine for ``path``; a UNet engine also gets the entry's LCM step engines (``lcm_step``),
    with which the runtime keeps the latents on the GPU between steps."""
    graphs = cuda_graphs_enabled(os.environ)
    engine = TrtEngine(path, engine_dir, profile=entry_profile(manifest, engine_dir, path), use_cuda_graph=graphs)
    for item in step_items_for(manifest, engine_dir, path):
        engine.lcm_step[bool(item["cfg"])] = TrtEngine(entry_file(engine_dir, item["file"]), engine_dir, profile=item.get("profile"),
                                                       use_cuda_graph=graphs)
    return engine


def _rel(engine_dir: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(engine_dir).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def entry_profile(manifest: dict, engine_dir: Path, path: Path) -> dict | None:
    """The optimisation profile an engine file was built with, from the manifest's build records."""
    rel = _rel(engine_dir, path)
    for item in manifest.get(NAME, {}).get("builds", []):
        if item.get("file") == rel:
            return item.get("profile")
    return None


def step_items_for(manifest: dict, engine_dir: Path, path: Path) -> list[dict]:
    """The LCM step engines built beside the UNet engine ``path`` (none for entries built before them)."""
    rel = _rel(engine_dir, path)
    return [i for i in manifest.get(NAME, {}).get("builds", []) if i.get("role") == "lcm_step" and i.get("for") == rel]


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT imports and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        pass
    return True, "ok"


def build_plan(components: list[str], plans: list[ShapePlan], text_dim: int, precision: str,
               vae_fp32: bool = False, refit: bool = False, latent_channels: int = 4,
               pooled_dim: int | None = None) -> list[dict]:
    """What to build: one engine per (component, shape plan) with its profile and flags. Pure.

    Text encoders do not depend on the image size, so each gets one engine (covering every plan's
    batch range). The VAE decoder is fp32 when asked (``vae_fp32``); fp16 overflow is handled after
    the build by ``build_tensorrt`` (checked on real data, rebuilt in fp32).
    """
    out = []
    for comp in components:
        text = comp.startswith("text_encoder")
        comp_plans = plans[:1] if text else plans
        for plan in comp_plans:
            prof = component_profiles(plan, text_dim, latent_channels, pooled_dim)[comp]
            if text:
                lo = min(p.unet_batch[0] for p in plans)
                hi = max(p.unet_batch[2] for p in plans)
                opt = plans[0].unet_batch[1]
                prof = {"input_ids": ((lo, 77), (opt, 77), (hi, 77))}
            fp16 = precision == "fp16" and not (comp == "vae_decoder" and vae_fp32)
            name = "all" if text else plan.name
            out.append({
                "component": comp, "plan": name, "file": f"{comp}/{name}.plan",
                "fp16": fp16, "refittable": refit,
                "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in prof.items()},
                "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL,
            })
    return out


def lcm_step_plan(unet_items: list[dict]) -> list[dict]:
    """The LCM step engines to build beside each UNet engine (``step_graph.py``). Pure.

    ``lcm_step`` runs without guidance (the UNet batch N is the image batch B); ``lcm_step_cfg``
    with guidance (N = 2B), built only where the UNet's profile admits an even batch of 2 or more.
    Both are fp32: elementwise work on a few latents, where precision matters more than speed."""
    out = []
    for item in unet_items:
        s = item["profile"]["sample"]
        lo, opt, hi = s["min"][0], s["opt"][0], s["max"][0]
        chw = {k: s[k][1:] for k in ("min", "opt", "max")}
        b_lo, b_hi = -(-lo // 2), hi // 2
        b_opt = min(max(opt // 2, b_lo), b_hi)
        for cfg in (False, True):
            if cfg and b_hi < max(b_lo, 1):
                continue
            n = (b_lo * 2, b_opt * 2, b_hi * 2) if cfg else (lo, opt, hi)
            b = (b_lo, b_opt, b_hi) if cfg else n
            lat = lambda batch: {k: [v, *chw[k]] for k, v in zip(("min", "opt", "max"), batch)}  # noqa: E731
            c = chw["min"][0]  # latent channels
            profile = {"sample": lat(b), "model_output": lat(n), "noise": lat(b),
                       "coef": {k: [len(COEF)] for k in ("min", "opt", "max")},
                       "vae_affine": {k: [3, c, 1, 1] for k in ("min", "opt", "max")}}
            name = "lcm_step_cfg" if cfg else "lcm_step"
            out.append({"component": "unet", "role": "lcm_step", "cfg": cfg, "for": item["file"], "plan": item["plan"],
                        "file": f"unet/{item['plan']}.{name}.plan", "fp16": False, "refittable": False,
                        "profile": profile, "builder_optimization_level": item["builder_optimization_level"]})
    return out


def timing_cache_path(store_root: Path, trt_version: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU architecture, shared by all entries of a store."""
    return store_root / ".timing-cache" / f"trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {}


def trt_major(version: str) -> int:
    """10 for '10.15.1.29'. UserError for a version string that does not start with a number."""
    m = re.match(r"\s*(\d+)\.", str(version) + ".")
    if not m:
        raise UserError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1))


def build_config(item: dict, trt_version: str) -> dict:
    """How to build one ``build_plan`` item with this TensorRT. Pure.

    Returns ``{"onnx": "fp32" | "fp16", "strongly_typed": bool, "config": CreateConfig keyword arguments}``.
    TensorRT 10: the fp32 graph, weakly typed, ``fp16=True`` for fp16 engines. TensorRT 11 and later:
    no precision flags exist; fp16 engines are built from the fp16 graph (fp32 I/O), strongly typed.
    fp32 engines: ``tf32=True`` (TF32 matmuls/convs; Polygraphy disables TF32 unless asked).
    """
    major = trt_major(trt_version)
    if major < TESTED_MAJORS[0]:
        raise UserError(f"TensorRT {trt_version} is too old: lcm-export builds with TensorRT 10 or 11 "
                        "(pip install 'lcm-export[tensorrt]' --extra-index-url https://pypi.nvidia.com)")
    fp16 = bool(item["fp16"])
    config = {"tf32": not fp16, "refittable": bool(item["refittable"]),
              "builder_optimization_level": item["builder_optimization_level"]}
    if major == 10:
        return {"onnx": "fp32", "strongly_typed": False, "config": {**config, "fp16": fp16}}
    # 11+: strong typing is always on; the STRONGLY_TYPED creation flag is accepted and ignored
    return {"onnx": "fp16" if fp16 else "fp32", "strongly_typed": True, "config": config}


def fp16_onnx(src: Path, dst: Path) -> Path:
    """``src`` (fp32 ONNX) converted to fp16 with fp32 inputs and outputs (casts at the edges), the
    precision TensorRT 11 builds in. Weights go to one external data file beside ``dst``, so graphs
    over 2 GB (SDXL's UNet) save too. Uses onnxruntime's converter (a base dependency), which keeps
    its block list of ops in fp32 and clamps constants to the fp16 range."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=_over_2gb(src))
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    with writing(dst):
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    return dst


def _over_2gb(path: Path) -> bool:
    size = sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file())
    return size > 2 * 1024**3 - 2**20  # shape inference needs the model in one protobuf


def build_engine_file(onnx_path: Path, out_path: Path, item: dict, timing_cache: Path, cfg: dict) -> None:
    """Build one engine with Polygraphy (serialized once: ``engine_bytes_from_network``) and save it.

    Polygraphy reports every failure (parser errors, unavailable flags, an empty engine) by raising
    ``PolygraphyException``; that becomes a one-line UserError (TensorRT's own log is above it)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for name, p in item["profile"].items():
        profile.add(name, min=p["min"], opt=p["opt"], max=p["max"])
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        network = network_from_onnx_path(str(onnx_path), strongly_typed=cfg["strongly_typed"])
        config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
                              **cfg["config"])
        data = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    except PolygraphyException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"TensorRT could not build {item['file']} from {onnx_path}: {first} (TensorRT's log is above)") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with writing(out_path), open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)


def engine_outputs_finite(engine_path: Path, feeds: dict) -> bool:
    """Run an engine once on ``feeds`` (numpy) and say whether every output is finite."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        outputs = runner.infer(feeds)
    return all(np.isfinite(np.asarray(v)).all() for v in outputs.values())


def check_tensorrt_compat(manifest: dict, engine_dir: Path) -> None:
    """The plan's TensorRT version and GPU compute capability must match this machine's."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"{engine_dir} holds TensorRT engines but TensorRT is not installed here; install "
                        "lcm-export[tensorrt] on a GPU machine, or build an ONNX Runtime entry (--backend onnxruntime)") from None
    built = manifest.get("tensorrt", {})
    if built.get("tensorrt") != trt.__version__:
        raise UserError(f"{engine_dir} was built with TensorRT {built.get('tensorrt')}, this machine has {trt.__version__}; "
                        f"{rebuild_hint(engine_dir)}")
    ensure_cuda_runtime()
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    rc = lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    rc = rc or lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    if rc != 0:
        raise UserError(f"{engine_dir} holds TensorRT engines but the CUDA runtime found no usable GPU here (CUDA error {rc})")
    here = f"{major.value}.{minor.value}"
    if built.get("compute_capability") not in (None, here):
        raise UserError(f"{engine_dir} was built for GPU compute capability {built.get('compute_capability')}, this GPU is {here}; "
                        f"{rebuild_hint(engine_dir)}")
