"""Style adapters per call, in the lean runtime (numpy + safetensors).

An entry built with adapter branches (``adapters/graph.py``) takes, for every branch, two factor inputs
whose rank is free and a scale vector ``s`` (one λ per rank). ``adapters={"papercut": 0.8, "pixel": 0.3}``
becomes, per branch, the adapters' factors (alpha/rank folded into B when each was added) concatenated
along the rank, and ``s`` holding each rank's λ — so their deltas add up, exactly the ``Σ λ_i·ΔW_i`` a
build would fuse — and rank 0 where no chosen adapter touches the layer (the branch then adds exactly
zero: λ = 0 and no adapter give the same image). Switching adapters changes only these inputs: no engine
is rebuilt, recompiled or reloaded.

Prepared factors are read once (checked against the size and sha256 recorded when they were added)
and fed as they are (one adapter: no copy; a set of several: concatenated once); a choice of λ costs
only its ``s`` vectors. ``resident_bytes`` says what the cache holds. The index is
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

from ..adapters.spec import ADAPTER_DIR, INDEX, MAX_GAIN, RANK_AXIS, empty_factors, gain_bound, read_index
from ..confine import inside
from ..errors import DamagedEntry, UserError

MAX_WEIGHT = 8.0
"""Largest |λ| a call may give an adapter (the paper uses up to 1; a LoRA far beyond a few times its
training strength only saturates the image, and beyond this overflows fp16/bf16 activations)."""
CACHE = 8
"""Sets of several adapters (their factors concatenated once) and choices of weights (their ``s`` vectors) kept
per entry (the least recently used dropped first); one adapter's factors are fed as loaded (no copy). A choice kept
keeps its set: a set is dropped together with its choices, so its factors are never concatenated twice."""


def _finite(w) -> bool:
    """Whether a real number is finite as a float (an integer of 10^400 digits is not: float() overflows)."""
    try:
        return math.isfinite(float(w))
    except (OverflowError, ValueError):
        return False


def _shown(w) -> str:
    """A weight as a message shows it: at most ~24 characters (an integer of 400 digits is cut, and one past
    Python's 4300-digit limit is not turned into text at all)."""
    try:
        text = repr(w)
    except ValueError:
        return f"(an integer of {w.bit_length()} bits)"
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


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
        self._bounds: dict[str, float] = {}
        self._stacks: OrderedDict = OrderedDict()
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
            p = self.engine_dir / ADAPTER_DIR / INDEX
            try:
                st = p.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if self._index is None or stamp != self._stamp:
                self._index, self._stamp = read_index(self.engine_dir)
                self._combos.clear()
                self._stacks.clear()
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
            if not (isinstance(w, numbers.Real) and not isinstance(w, (bool, np.bool_)) and _finite(w)
                    and abs(w) <= MAX_WEIGHT):
                raise UserError(f"adapter {name!r} weight {_shown(w)}: must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                                "(0 turns it off)")
            if w != 0:
                out.append((name, float(w)))
        return tuple(sorted(out))

    def _load(self, name: str) -> dict[str, np.ndarray]:
        rec = self.index().get(name)
        if rec is None:  # removed between the check and this call
            raise UserError(f"unknown adapter {name!r}: it was removed from {self.engine_dir} (add it again with "
                            "`lcm-export adapter add`)")
        cached = self._factors.get(name)
        if cached is not None and cached[0] == rec["sha256"]:
            return cached[1]
        import hashlib

        from safetensors import SafetensorError, safe_open

        p = inside(self.engine_dir, rec["factors"], f"adapter {name!r} ({self.engine_dir / ADAPTER_DIR / INDEX})",
                   _rebuild_hint(self.engine_dir))
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:  # streamed: the file's bytes are never held beside the arrays
                size = 0
                while block := f.read(1 << 20):
                    h.update(block)
                    size += len(block)
            if size != rec["bytes"] or h.hexdigest() != rec["sha256"]:
                raise DamagedEntry(f"adapter {name!r}: {p} changed since it was added (size or sha256 differs); "
                                f"{_rebuild_hint(self.engine_dir)}")
            with safe_open(str(p), framework="np") as f:
                factors = {k: f.get_tensor(k) for k in f.keys()}
            bound = gain_bound(factors)
        except OSError as exc:
            raise UserError(f"adapter {name!r}: {p} cannot be read ({exc.strerror or exc}); {_rebuild_hint(self.engine_dir)}") from None
        except (SafetensorError, ValueError, KeyError) as exc:
            raise DamagedEntry(f"adapter {name!r}: {p} is not a valid factors file ({exc}); {_rebuild_hint(self.engine_dir)}") from None
        self._factors[name] = (rec["sha256"], factors)
        self._bounds[name] = bound
        return factors

    def _stacked(self, names: tuple[str, ...]) -> dict:
        """{component: {branch index: (A, B, ranks)}} for a set of adapters: one adapter's factors as loaded (no
        copy); several concatenated along the rank (cached: a λ change reuses them)."""
        if names in self._stacks:
            self._stacks.move_to_end(names)
            return self._stacks[names]
        loaded = [self._load(n) for n in names]
        out = {}
        for comp, rows in self.branches.items():
            layers = {}
            for i, row in enumerate(rows):
                parts = [(f[f"{comp}.{i}.A"], f[f"{comp}.{i}.B"], j) for j, f in enumerate(loaded) if f"{comp}.{i}.A" in f]
                if not parts:
                    continue
                a_axis, b_axis = RANK_AXIS[row["kind"]]
                ranks = [(j, int(pa.shape[a_axis])) for pa, _, j in parts]
                if len(parts) == 1:
                    layers[i] = (parts[0][0], parts[0][1], ranks)
                else:
                    layers[i] = (np.concatenate([pa for pa, _, _ in parts], axis=a_axis),
                                 np.concatenate([pb for _, pb, _ in parts], axis=b_axis), ranks)
            out[comp] = layers
        self._stacks[names] = out
        while len(self._stacks) > CACHE:
            gone, _ = self._stacks.popitem(last=False)
            for choice in [c for c in self._combos if tuple(n for n, _ in c) == gone]:
                del self._combos[choice]
        return out

    def resident_bytes(self) -> int:
        """Bytes of the arrays this object holds now (loaded factors, concatenated sets, ``s`` vectors), each
        array counted once: what prepared adapters cost in memory beside the engines. Loaded factors stay until
        their adapter leaves the index. The engines hold the inputs of their last call too: the same arrays
        while that choice is cached here, so at most one evicted choice more."""
        with self._lock:
            seen: dict[int, int] = {}

            def walk(x):
                if isinstance(x, np.ndarray):
                    base = x if x.base is None or not isinstance(x.base, np.ndarray) else x.base
                    seen[id(base)] = base.nbytes
                elif isinstance(x, dict):
                    for v in x.values():
                        walk(v)
                elif isinstance(x, (list, tuple)):
                    for v in x:
                        walk(v)

            walk([f for _, f in self._factors.values()])
            walk(list(self._stacks.values()))
            walk(list(self._combos.values()))
            return sum(seen.values())

    def _trim(self) -> None:
        while len(self._combos) > CACHE:
            self._combos.popitem(last=False)

    def feeds(self, choice: tuple[tuple[str, float], ...]) -> dict[str, dict[str, np.ndarray]]:
        """{component: {input name: array}} for a checked choice (``check``); cached per choice. The factors are
        fed as prepared (several adapters: concatenated once per set); each rank's λ goes in ``s``."""
        if not self.supported:
            return {}
        with self._lock:
            if choice:
                self.index()  # a changed index drops stale combinations before the cache is asked
            names, weights = tuple(n for n, _ in choice), [w for _, w in choice]
            if choice in self._combos:
                self._combos.move_to_end(choice)
                if names in self._stacks:
                    self._stacks.move_to_end(names)
                return self._combos[choice]
            stacked = self._stacked(names) if names else {}
            gain = sum(abs(w) * self._bounds.get(n, 0.0) for n, w in choice)
            if gain > MAX_GAIN:
                n, w = max(choice, key=lambda c: abs(c[1]) * self._bounds.get(c[0], 0.0))
                raise UserError(f"adapters {dict(choice)} would overflow float32 (the factors of {n!r} are too large for "
                                f"weight {w:g}: alone it takes at most ±{MAX_GAIN / max(self._bounds[n], 1e-30):.3g}); "
                                "use smaller weights")
            out = {}
            for comp, rows in self.branches.items():
                feeds = dict(self.empty[comp])
                for i, (a, b, ranks) in stacked.get(comp, {}).items():
                    row = rows[i]
                    feeds[row["inputs"][0]], feeds[row["inputs"][1]] = a, b
                    feeds[row["inputs"][2]] = np.concatenate([np.full(r, weights[j], np.float32) for j, r in ranks])
                out[comp] = feeds
            self._combos[choice] = out
            self._trim()
            return out
