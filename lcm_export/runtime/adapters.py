"""Style adapters per call, in the lean runtime (numpy + safetensors).

An entry built with adapter branches (``adapter_graph.py``) takes, for every branch, two factor inputs
whose rank is free. ``adapters={"papercut": 0.8, "pixel": 0.3}`` becomes, per branch, the adapters'
factors concatenated along the rank with each λ folded into B — so their deltas add up, exactly the
``Σ λ_i·ΔW_i`` a build would fuse — and rank 0 where no chosen adapter touches the layer (the branch
then adds exactly zero: λ = 0 and no adapter give the same image). Switching adapters changes only these
inputs: no engine is rebuilt, recompiled or reloaded.

Prepared factors are read once per process (checked against the size and sha256 recorded when they
were added) and kept as they are; a combination of adapters and λ is assembled once and cached.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import UserError

MAX_WEIGHT = 8.0
"""Largest |λ| a call may give an adapter (the paper uses up to 1; a LoRA far beyond a few times its
training strength only saturates the image, and beyond this overflows fp16/bf16 activations)."""
RANK_AXIS = {"matmul": (1, 0), "conv1x1": (0, 1)}
"""(A, B) rank axes per branch kind (``adapter_graph.RANK_AXIS``; the runtime does not import the build side)."""
CACHE = 4
"""Assembled combinations kept per entry (each costs the chosen adapters' factors once more)."""


def _rebuild_hint(d: Path) -> str:
    return f"remove it with `lcm-export adapter remove --engine-dir {d} NAME` and add it again"


class Adapters:
    """The adapters an entry holds and the branch inputs for a choice of them."""

    def __init__(self, engine_dir: Path, manifest: dict):
        self.engine_dir = Path(engine_dir)
        spec = manifest.get("adapters") if isinstance(manifest.get("adapters"), dict) else {}
        self.branches: dict[str, list[dict]] = spec.get("branches") or {}
        self._index: dict | None = None
        self._factors: dict[str, dict[str, np.ndarray]] = {}
        self._combos: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._empty = {comp: self._empty_feeds(rows) for comp, rows in self.branches.items()}

    @staticmethod
    def _empty_feeds(rows: list[dict]) -> dict[str, np.ndarray]:
        """Rank-0 factors for every branch: the branch adds exactly zero."""
        out = {}
        for row in rows:
            matmul = row["kind"] == "matmul"
            out[row["inputs"][0]] = np.zeros((row["in"], 0) if matmul else (0, row["in"]), np.float32)
            out[row["inputs"][1]] = np.zeros((0, row["out"]) if matmul else (row["out"], 0), np.float32)
        return out

    @property
    def supported(self) -> bool:
        return bool(self.branches)

    def index(self) -> dict:
        if self._index is None:
            p = self.engine_dir / "adapters" / "index.json"
            if not p.exists():
                self._index = {}
            else:
                try:
                    self._index = dict(json.loads(p.read_text())["adapters"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise UserError(f"{p} is unreadable ({exc}); remove {p.parent} and add the adapters again") from None
        return self._index

    def names(self) -> list[str]:
        return sorted(self.index())

    def check(self, adapters) -> tuple[tuple[str, float], ...]:
        """``adapters`` ({name: λ} or None) checked; the non-zero ones as a sorted tuple (the cache key)."""
        if adapters is None:
            return ()
        if not isinstance(adapters, dict):
            raise UserError(f"adapters must be a mapping of adapter name to weight, e.g. {{\"papercut\": 0.8}}, not "
                            f"{type(adapters).__name__}")
        if adapters and not self.supported:
            raise UserError(f"{self.engine_dir} takes no run-time adapters (built without adapter branches); rebuild it "
                            f"with `lcm-export build-engine --adapters`, or bake the LoRA in with --lora")
        out = []
        for name, w in adapters.items():
            if not isinstance(name, str) or name not in self.index():
                raise UserError(f"unknown adapter {name!r}; {self.engine_dir} holds: {', '.join(self.names()) or 'none'} "
                                "(add one with `lcm-export adapter add`)")
            if not (isinstance(w, numbers.Real) and not isinstance(w, (bool, np.bool_)) and math.isfinite(w)
                    and abs(w) <= MAX_WEIGHT):
                raise UserError(f"adapter {name!r} weight {w!r}: must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                                "(0 turns it off)")
            if w != 0:
                out.append((name, float(w)))
        return tuple(sorted(out))

    def _load(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._factors:
            from safetensors import SafetensorError
            from safetensors.numpy import load

            rec = self.index()[name]
            p = self.engine_dir / rec["factors"]
            try:
                blob = p.read_bytes()
            except OSError as exc:
                raise UserError(f"adapter {name!r}: {p} cannot be read ({exc.strerror or exc}); {_rebuild_hint(self.engine_dir)}") from None
            import hashlib

            if len(blob) != rec["bytes"] or hashlib.sha256(blob).hexdigest() != rec["sha256"]:
                raise UserError(f"adapter {name!r}: {p} changed since it was added (size or sha256 differs); "
                                f"{_rebuild_hint(self.engine_dir)}")
            try:
                factors = load(blob)
            except (SafetensorError, ValueError) as exc:
                raise UserError(f"adapter {name!r}: {p} is not a valid factors file ({exc}); {_rebuild_hint(self.engine_dir)}") from None
            self._factors[name] = factors
        return self._factors[name]

    def feeds(self, choice: tuple[tuple[str, float], ...]) -> dict[str, dict[str, np.ndarray]]:
        """{component: {input name: array}} for a checked choice (``check``); cached per choice."""
        if not self.supported:
            return {}
        with self._lock:
            if choice in self._combos:
                self._combos.move_to_end(choice)
                return self._combos[choice]
            loaded = [(self._load(name), w) for name, w in choice]
            out = {}
            for comp, rows in self.branches.items():
                feeds = dict(self._empty[comp])
                for i, row in enumerate(rows):
                    parts = [(f[f"{comp}.{i}.A"], f[f"{comp}.{i}.B"], w) for f, w in loaded if f"{comp}.{i}.A" in f]
                    if not parts:
                        continue
                    a_axis, b_axis = RANK_AXIS[row["kind"]]
                    a = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts], axis=a_axis)
                    b = np.concatenate([p[1] * np.float32(p[2]) for p in parts], axis=b_axis)
                    if not np.isfinite(b).all():
                        raise UserError(f"adapters {dict(choice)}: the weights overflow float32 in {comp} layer "
                                        f"{row['module']}; use smaller weights")
                    feeds[row["inputs"][0]], feeds[row["inputs"][1]] = a, b
                out[comp] = feeds
            self._combos[choice] = out
            while len(self._combos) > CACHE:
                self._combos.popitem(last=False)
            return out
