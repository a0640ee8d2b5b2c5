"""What the build, ``adapter add`` and the runtime agree on about run-time adapters: the branch inputs'
names and layouts, the manifest's ``adapters`` section and the entry's adapter index, each checked in
one place. numpy and the standard library only (the lean runtime and the store read it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..confine import inside
from ..errors import DamagedEntry, UserError

INPUT_PREFIX = "adapter"
"""Branch inputs are named ``adapter.<component>.<i>.A`` / ``.B`` / ``.s`` (each rank's weight λ)."""
KINDS = ("matmul", "conv1x1")
RANK_AXIS = {"matmul": (1, 0), "conv1x1": (0, 1)}
"""The rank axis of (A, B) for each branch kind: matmul A [in, r], B [r, out]; conv1x1 A [r, in], B [out, r]."""
ADAPTER_DIR = "adapters"
INDEX = "index.json"
CONFIG_DIR = "config"
"""The entry's copies of the model configs a skeleton for ``adapter add`` is made from."""
INDEX_VERSION = 1
SPEC_VERSION = 2
"""The manifest's ``adapters`` section: 2 = branches take A, B and a per-rank weight ``s`` (1: A and B with λ
folded into B, written before the ``s`` input; its prepared factors are the same, so a rebuild keeps them)."""
RECORD_FIELDS = {"factors": str, "bytes": int, "sha256": str, "ranks": list, "layers": dict, "source": dict}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""An adapter's name (matched whole: no newline, no path separator)."""
FACTORS = "factors.safetensors"
FOLDER_RE = re.compile(rf"{ADAPTER_DIR}/(?P<name>{NAME_RE.pattern})-(?P<sha12>[0-9a-f]{{12}})")
"""The one folder ``adapter add`` writes per adapter and content: ``adapters/<name>-<first 12 of its sha256>``;
``adapter remove`` / ``add --force`` delete a folder only when it matches this whole (``confine.owned_dir``)."""


def factors_folder(name: str, sha256: str) -> str:
    """The folder (relative to the entry) that holds adapter ``name``'s factors of content ``sha256``."""
    return f"{ADAPTER_DIR}/{name}-{sha256[:12]}"


def record_problem(name, rec) -> str | None:
    """What is wrong with one record of the index (None when nothing): its fields' types, and a factors path that
    is exactly the writer's (``adapters/<name>-<sha12>/factors.safetensors``, sha12 the record's own sha256)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return "its name"
    bad = [k for k, t in RECORD_FIELDS.items() if not isinstance(rec, dict) or not isinstance(rec.get(k), t)
           or (t is int and isinstance(rec.get(k), bool))]
    if bad:
        return ", ".join(bad)
    if not re.fullmatch(r"[0-9a-f]{64}", rec["sha256"]) or not 0 <= rec["bytes"] < 1 << 50:
        return "sha256 or bytes"
    if rec["factors"] != f"{factors_folder(name, rec['sha256'])}/{FACTORS}":
        return f"factors path {rec['factors']!r}, not the {ADAPTER_DIR}/{name}-<sha256[:12]>/{FACTORS} lcm-export writes"
    return None


MAX_GAIN = 1e12
"""Largest Σ |λ_i| · g_i a choice may reach, g_i = max|A| · max|B| · in · rank over an adapter's layers (a bound on
how much its branch can amplify an activation, :func:`gain_bound`). Beyond 1e12 a branch can push activations of
~1e4 past ~1e16, where the next normalization's squares overflow float32 — refused as an input error, not left to
come out as a NaN image."""
MIN_USABLE_WEIGHT = 0.01
"""``adapter add`` refuses factors so large that every weight above this one would pass :data:`MAX_GAIN`: an
adapter no call could use (factors of 1e30, alpha 1e38)."""


def gain_bound(factors: dict) -> float:
    """g = max over layers of max|A| · max|B| · in · rank, for one adapter's factors ({"<comp>.<i>.A" / ".B": array})."""
    import numpy as np

    return max((float(np.abs(factors[k]).max(initial=0.0)) * float(np.abs(factors[k[:-1] + "B"]).max(initial=0.0))
                * max(factors[k].shape) * min(factors[k].shape) for k in factors if k.endswith(".A")), default=0.0)


def empty_factors(rows: list[dict]) -> dict:
    """Rank-0 factors for every branch of one component: each branch then adds exactly zero."""
    import numpy as np

    out = {}
    for row in rows:
        a_axis, b_axis = RANK_AXIS[row["kind"]]
        a, b = [0, 0], [0, 0]
        a[1 - a_axis], b[1 - b_axis] = row["in"], row["out"]
        out[row["inputs"][0]] = np.zeros(a, np.float32)
        out[row["inputs"][1]] = np.zeros(b, np.float32)
        out[row["inputs"][2]] = np.zeros(0, np.float32)
    return out


MAX_WIDTH = 65536
"""Widest branch input or output a manifest may record (SDXL's widest layer: 10240)."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_WIDTH


def spec_problems(spec) -> list[str]:
    """What is wrong with a manifest's ``adapters`` section ([] when nothing)."""
    if not isinstance(spec, dict):
        return ["the manifest's 'adapters' is not an object"]
    version = spec.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < SPEC_VERSION:
        return [f"its adapter branches were written by an older lcm-export (adapters version {version}, "
                f"this one reads {SPEC_VERSION}); a rebuild with the same flags keeps its adapters"]
    out = []
    branches, configs = spec.get("branches"), spec.get("configs")
    if not isinstance(branches, dict) or not branches:
        return ["the manifest's adapters.branches is missing or not an object"]
    for comp, rows in branches.items():
        if not isinstance(rows, list):
            out.append(f"the manifest's adapters.branches.{comp} is not a list")
            continue
        for i, r in enumerate(rows):
            ok = (isinstance(r, dict) and r.get("kind") in KINDS and _int(r.get("in")) and _int(r.get("out"))
                  and isinstance(r.get("module"), str)
                  and r.get("inputs") == [f"{INPUT_PREFIX}.{comp}.{i}.{part}" for part in ("A", "B", "s")])
            if not ok:
                out.append(f"the manifest's adapters.branches.{comp}[{i}] is malformed (kind, module, inputs, or in / out "
                           f"widths from 1 to {MAX_WIDTH})")
                break
    if not isinstance(configs, dict) or not all(isinstance(v, str) and v and not Path(v).is_absolute()
                                                 and ".." not in Path(v).parts for v in configs.values()):
        out.append("the manifest's adapters.configs is missing or malformed")
    if version != SPEC_VERSION:
        out.append(f"the manifest's adapters.version is {version!r}, not one this lcm-export reads ({SPEC_VERSION})")
    return out


def read_index(engine_dir: str | Path) -> tuple[dict, tuple | None]:
    """({name: record}, the index file's (mtime_ns, size) or None when there is none), every record checked.
    UserError naming the problem for an unreadable or malformed index."""
    p = Path(engine_dir) / ADAPTER_DIR / INDEX
    fix = f"remove the folder {p.parent} and add the adapters again with `lcm-export adapter add`"
    inside(engine_dir, f"{ADAPTER_DIR}/{INDEX}", f"{p}", fix)  # no link out of the entry, no FIFO
    try:
        st = p.stat()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        raise UserError(f"{p} cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DamagedEntry(f"{p} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {fix}") from None
    adapters = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not isinstance(adapters, dict):
        raise DamagedEntry(f"{p} is not an adapter index of this lcm-export (version {INDEX_VERSION}); {fix}")
    for name, rec in adapters.items():
        bad = record_problem(name, rec)
        if bad:
            raise DamagedEntry(f"{p}: the record of adapter {name!r} is malformed ({bad}); {fix}")
    return adapters, (st.st_mtime_ns, st.st_size)


class entry_lock:
    """An exclusive lock on an entry (``flock`` on its manifest, opened read-only: nothing is written): held by
    ``adapter add`` / ``remove`` and by a build or refit of the entry, so an adapter is never added to an entry
    that is being replaced. No-op where the entry has no manifest yet."""

    def __init__(self, engine_dir: str | Path):
        self.path = Path(engine_dir) / "manifest.json"
        self.f = None

    def __enter__(self):
        import fcntl

        try:
            self.f = open(self.path, "rb")
        except OSError:
            return self
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()  # closing releases the lock
