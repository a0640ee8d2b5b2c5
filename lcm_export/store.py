"""Engine store: one folder per entry with ``manifest.json``; cache keys; compatibility checks.

Kept free of torch/diffusers: the lean runtime reads manifests through this module too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_ROOT = Path("engines")


def cache_key(inputs: dict) -> str:
    """sha256 of the canonical JSON of everything that determines an entry's contents.

    ``inputs`` holds the base identity (weight hashes), each LoRA's sha256 and λ, the shape plans,
    batch/guidance, backend, precision, build flags and tool versions. Any change rebuilds.
    """
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(engine_dir: str | Path) -> dict:
    """Load and check an entry's manifest; one-line errors for the usual ways it can be wrong."""
    d = Path(engine_dir)
    if not d.exists():
        raise UserError(f"engine dir {d} does not exist; build one with `lcm-export build-engine --engine-dir {d}`")
    p = d / MANIFEST
    if not p.is_file():
        raise UserError(f"engine dir {d} has no {MANIFEST}: not an engine-store entry (or an interrupted build); rebuild it with `lcm-export build-engine`")
    try:
        m = json.loads(p.read_text())
    except ValueError as exc:
        raise UserError(f"{p}: not valid JSON ({exc}); rebuild the entry with `lcm-export build-engine --force`") from None
    version = m.get("schema_version") if isinstance(m, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{p}: manifest schema version {version!r} is not supported by this lcm-export (expects {SCHEMA_VERSION}); "
            "rebuild the entry with this version's `lcm-export build-engine --force`"
        )
    return m


def existing_entry(engine_dir: Path, base_source: str, key: str, force: bool) -> dict | None:
    """Decide what to do with what is already at ``engine_dir``.

    Returns the manifest when it is up to date (same cache key); None when the folder is free or
    holds an older build of the same base (rebuild). Refuses (unless ``force``) a folder that holds
    another model's entry or something that is not an entry at all.
    """
    if not engine_dir.exists():
        return None
    if not (engine_dir / MANIFEST).is_file():
        if force or not any(engine_dir.iterdir()):
            return None
        raise UserError(f"engine dir {engine_dir} exists and is not an engine-store entry; choose another --engine-dir or pass --force to replace it")
    try:
        m = json.loads((engine_dir / MANIFEST).read_text())
    except ValueError:
        if force:
            return None
        raise UserError(f"engine dir {engine_dir} has an unreadable manifest; pass --force to rebuild it") from None
    if m.get("cache_key") == key and all((engine_dir / f).exists() for f in manifest_files(m)):
        return m
    other = m.get("base_source")
    if other != base_source and not force:
        raise UserError(f"engine dir {engine_dir} holds an entry for another model ({other}); choose another --engine-dir or pass --force to replace it")
    return None


def manifest_files(m: dict) -> list[str]:
    files = []
    for c in m.get("components", {}).values():
        files += c.get("files", [])
    return files


def format_manifest(m: dict, engine_dir: str | Path | None = None) -> str:
    """A readable table of a manifest (``lcm-export inspect``)."""
    rows = [
        ("name", m.get("name")), ("family", m.get("family")), ("backend", m.get("backend")),
        ("precision", m.get("precision")), ("resolutions", ", ".join(m.get("resolutions", []))),
        ("batch", f"{m.get('batch')} (guidance shapes: {m.get('guidance')})"),
        ("base", m.get("base_source")), ("built", m.get("created")), ("cache key", m.get("cache_key", "")[:16] + "…"),
    ]
    if m.get("demo"):
        rows.append(("note", "demo model with random weights: its images are noise"))
    fid = m.get("fidelity")
    if fid:
        rows.append(("image check", f"4-step image vs PyTorch fp32 at {fid['resolution']}: PSNR {fid['image_psnr_db']:.1f} dB "
                                    f"(gate {fid['gate_db']:g} dB)"))
    for l in m.get("fusion", {}).get("loras", []):
        rows.append(("lora", f"{Path(l['path']).name}  λ={l['weight']:g}  {l['format']}  rank {','.join(map(str, l['ranks']))}  "
                              f"layers {sum(l['layers'].values())}  sha256 {l['sha256'][:12]}…"))
    v = m.get("versions", {})
    rows.append(("versions", "  ".join(f"{k} {val}" for k, val in v.items())))
    hw = m.get("hardware", {})
    if hw:
        rows.append(("hardware", "  ".join(f"{k}: {val}" for k, val in hw.items() if val)))
    w = max(len(r[0]) for r in rows)
    out = [f"{k:<{w}}  {val}" for k, val in rows]
    out.append("")
    out.append(f"{'component':<13} {'precision':<9} {'inputs':<60} parity (rel-L2 / max-abs @ res)")
    for name, c in m.get("components", {}).items():
        ins = ", ".join(f"{i[0]}:{i[1]}{list(i[2])}" for i in c.get("inputs", []))
        par = "; ".join(f"{p['rel_l2']:.1e}/{p['max_abs']:.1e} @ {p['resolution']}" for p in c.get("parity", []))
        out.append(f"{name:<13} {c.get('precision', m.get('precision')):<9} {ins:<60} {par}")
    plans = m.get("shape_plans", [])
    if plans:
        out.append("")
        out.append("shape plans: " + "; ".join(
            f"{p['name']} (unet batch {p['unet_batch'][0]}-{p['unet_batch'][2]})" for p in plans))
    return "\n".join(out)
