"""Style adapters per call, in the lean runtime (numpy + safetensors).

An entry built with adapter branches (``adapter_graph.py``) takes, for every branch, two factor inputs
whose rank is free. ``adapters={"papercut": 0.8, "pixel": 0.3}`` becomes, per branch, the adapters'
factors concatenated along the rank with each λ folded into B — so their deltas add up, exactly the
``Σ λ_i·ΔW_i`` a build would fuse — and rank 0 where no chosen adapter touches the layer (the branch
then adds exactly zero: λ = 0 and no adapter give the same image). Switching adapters changes only these
inputs: no engine is rebuilt, recompiled or reloaded.

Prepared factors are read once (checked against the size and sha256 recorded when they were added)
and kept as they are; a combination of adapters and λ is assembled once and cached. The index is
re-read when its file changes, so an adapter added, replaced or removed while a server runs is seen
by the next call (factors whose recorded sha256 changed are read again).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..adapter_spec import ADAPTER_DIR, RANK_AXIS, empty_factors, read_index
from ..errors import UserError

MAX_WEIGHT = 8.0
"""Largest |λ| a call may give an adapter (the paper uses up to 1; a LoRA far beyond a few times its
training strength only saturates the image, and beyond this overflows fp16/bf16 activations)."""
CACHE = 4
"""Assembled combinations kept per entry (each costs the chosen adapters' factors once more)."""


def _rebuild_hint(d: Path) -> str:
    return f"remove it with `lcm-export adapter remove --engine-dir {d} NAME` and add it again"


class Adapters:
    """The adapters an entry holds and the branch inputs for a choice of them (safe to share between threads)."""

    def __init__(self, engine_dir: Path, manifest: dict):
        self.engine_dir = Path(engine_dir)
        spec = manifest.get("adapters") if isinstance(manifest.get("adapters"), dict) else {}
        self.branches: dict[str, list[dict]] = spec.get("branches") or {}
        self._index: dict | None = None
        self._stamp: tuple | None = None
        self._factors: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
        self._combos: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        self.empty = {comp: empty_factors(rows) for comp, rows in self.branches.items()}
        """{component: rank-0 factors for every branch}: no adapter."""

    @property
    def supported(self) -> bool:
        return bool(self.branches)

    def index(self) -> dict:
        """{name: record} as the index file says now (re-read when the file changed since the last call)."""
        with self._lock:
            p = self.engine_dir / ADAPTER_DIR / "index.json"
            try:
                st = p.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if self._index is None or stamp != self._stamp:
                self._index, self._stamp = read_index(self.engine_dir)
                self._combos.clear()
                self._factors = {n: f for n, f in self._factors.items()
                                 if n in self._index and self._index[n]["sha256"] == f[0]}
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
        index = self.index() if adapters else {}
        out = []
        for name, w in adapters.items():
            if not isinstance(name, str) or name not in index:
                raise UserError(f"unknown adapter {name!r}; {self.engine_dir} holds: {', '.join(sorted(index)) or 'none'} "
                                "(add one with `lcm-export adapter add`)")
            if not (isinstance(w, numbers.Real) and not isinstance(w, (bool, np.bool_)) and math.isfinite(w)
                    and abs(w) <= MAX_WEIGHT):
                raise UserError(f"adapter {name!r} weight {w!r}: must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                                "(0 turns it off)")
            if w != 0:
                out.append((name, float(w)))
        return tuple(sorted(out))

    def _load(self, name: str) -> dict[str, np.ndarray]:
        rec = self.index()[name]
        cached = self._factors.get(name)
        if cached is not None and cached[0] == rec["sha256"]:
            return cached[1]
        import hashlib

        from safetensors import SafetensorError
        from safetensors.numpy import load

        p = self.engine_dir / rec["factors"]
        try:
            blob = p.read_bytes()
        except OSError as exc:
            raise UserError(f"adapter {name!r}: {p} cannot be read ({exc.strerror or exc}); {_rebuild_hint(self.engine_dir)}") from None
        if len(blob) != rec["bytes"] or hashlib.sha256(blob).hexdigest() != rec["sha256"]:
            raise UserError(f"adapter {name!r}: {p} changed since it was added (size or sha256 differs); "
                            f"{_rebuild_hint(self.engine_dir)}")
        try:
            factors = load(blob)
        except (SafetensorError, ValueError) as exc:
            raise UserError(f"adapter {name!r}: {p} is not a valid factors file ({exc}); {_rebuild_hint(self.engine_dir)}") from None
        self._factors[name] = (rec["sha256"], factors)
        return factors

    def feeds(self, choice: tuple[tuple[str, float], ...]) -> dict[str, dict[str, np.ndarray]]:
        """{component: {input name: array}} for a checked choice (``check``); cached per choice."""
        if not self.supported:
            return {}
        with self._lock:
            if choice:
                self.index()  # a changed index drops stale combinations before the cache is asked
            if choice in self._combos:
                self._combos.move_to_end(choice)
                return self._combos[choice]
            loaded = [(self._load(name), w) for name, w in choice]
            out = {}
            for comp, rows in self.branches.items():
                feeds = dict(self.empty[comp])
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
