"""The lean runtime's own overhead (tokenize, scheduler arithmetic, host copies, image conversion) at a
given size, measured with stub engines that return fixed arrays instantly: what is left is host work.

A measurement, not a test: ``bench`` records it in report.json (``runtime_overhead_stub``) and
``benchmarks/runtime_overhead.py`` prints it. The goal (issue 13) is at most 2 ms per 512² image.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from .store import read_manifest


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


def stub_pipeline(engine_dir: str | Path, hw: tuple[int, int] = (512, 512), max_batch: int = 2):
    """The entry's tokenizers, scheduler and manifest, with every engine a ``FixedEngine`` at ``hw``."""
    from .runtime import ClipTokenizer, LCMPipeline

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
    toks = {k: ClipTokenizer(d / m[k]["file"], m[k]["max_length"], m[k]["pad_id"]) for k in ("tokenizer", "tokenizer_2") if k in m}
    sched = json.loads((d / m["scheduler"]["file"]).read_text())
    return LCMPipeline(m, d, engines, toks, sched)


def measure_overhead(engine_dir: str | Path, hw: tuple[int, int] = (512, 512), runs: int = 30, warmup: int = 3,
                     guidance: float = 1.0) -> dict:
    """Median overhead per image and its parts (seconds), over ``runs`` 4-step generations."""
    pipe = stub_pipeline(engine_dir, hw)
    for _ in range(warmup):
        pipe("a photo of an astronaut riding a horse on mars", steps=4, guidance=guidance)
    rec = {k: [] for k in ("overhead", "tokenize", "scheduler", "postprocess", "vae_input", "engines")}
    for _ in range(runs):
        pipe("a photo of an astronaut riding a horse on mars", steps=4, guidance=guidance)
        t = pipe.last_timings
        for k in rec:
            rec[k].append(getattr(t, k))
    med = {f"{k}_median_s": float(np.median(v)) for k, v in rec.items()}
    return {"resolution": f"{hw[0]}x{hw[1]}", "guidance": guidance, "steps": 4, "runs": runs,
            "method": "stub engines returning fixed arrays: the time left is the runtime's host work "
                      "(tokenize, scheduler, host copies, VAE input scaling, image conversion to PIL)",
            "median_s": med["overhead_median_s"], **med}
