"""Engine store: one folder per entry with ``manifest.json``; cache keys; compatibility checks.

Kept free of torch/diffusers: the lean runtime reads manifests through this module too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from ..confine import inside, problem
from ..errors import DamagedEntry, UserError

SCHEMA_VERSION = 2
"""2: ``file_sizes`` (every file of the entry, in bytes) and ``size_multiple`` are recorded and checked."""
MANIFEST = "manifest.json"
DEFAULT_ROOT = Path("engines")
FAMILY_COMPONENTS = {
    "sd15": ("text_encoder", "unet", "vae_decoder"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
    "ssd1b": ("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
}
"""The components an entry of each family holds, no more, no fewer (``export.components_for`` exports
exactly these; a test checks that the two agree)."""
REFIT_SOURCES = ".refit-sources"
"""Beside the store, not in any entry: ``<store>/.refit-sources/<entry name>/`` holds the exported fp32 graphs and
their weight maps that a weights-only update (refit) patches. An entry never holds them (it is what people
deploy: its weights once, in the precision they compute in); deleting this folder only turns later refits
into full builds."""
REFIT_SOURCE_STAMP = "source.json"
SHARED_ENGINE_KEYS = ("*", "all")
"""Engine-map keys that are not a shape plan's name: one engine for every plan ("*": CPU backends;
"all": TensorRT's text encoders)."""


def cache_key(inputs: dict) -> str:
    """sha256 of the canonical JSON of everything that determines an entry's contents.

    ``inputs`` holds the base identity (weight hashes), each LoRA's sha256 and λ, the shape plans,
    batch/guidance, backend, precision, build flags and tool versions. Any change rebuilds.
    """
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _rebuild(d) -> str:
    return f"rebuild it with `lcm-export build-engine --engine-dir {d} --force` (and the flags that built it)"


def read_manifest(engine_dir: str | Path, check_files: bool = True) -> dict:
    """Load and check an entry's manifest: JSON, schema (:func:`manifest_problems`) and, unless
    ``check_files`` is False, every recorded file's presence and size. One-line UserError otherwise."""
    d = Path(engine_dir)
    if not d.exists():
        raise UserError(f"engine dir {d} does not exist; build one with `lcm-export build-engine --engine-dir {d}`")
    if not d.is_dir():
        raise UserError(f"engine dir {d} is a file, not an engine-store folder; pass the folder build-engine wrote")
    p = inside(d, MANIFEST, f"engine dir {d}", _rebuild(d))
    if not p.is_file():
        raise UserError(f"engine dir {d} has no {MANIFEST}: not an engine-store entry (or an interrupted build); rebuild it with `lcm-export build-engine`")
    try:
        m = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid JSON ({str(exc).splitlines()[0]}); {_rebuild(d)}") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    version = m.get("schema_version") if isinstance(m, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{p}: manifest schema version {version!r} is not supported by this lcm-export (expects {SCHEMA_VERSION}); "
            "rebuild the entry with this version's `lcm-export build-engine --force`"
        )
    problems = manifest_problems(m)
    if problems:
        older = problems[0].startswith("its adapter branches were written by an older")
        raise (UserError if older else DamagedEntry)(f"{p}: {'' if older else 'damaged entry: '}{problems[0]}; {_rebuild(d)}")
    if check_files:
        problems = file_problems(m, d)
        if problems:
            raise DamagedEntry(f"engine dir {d}: damaged entry: {problems[0]}; {_rebuild(d)}")
    return m


# ---------------------------------------------------------------------------------------------
# The manifest's schema: every field the runtime, the backends and the store read, with its type and
# the range a real model's value lies in (generous, but finite: a damaged value is refused at load,
# before any engine runs, instead of reaching an engine as a 10^12-wide input or a zero divisor).
# Hand-written (the lean runtime has no jsonschema); one message per problem, naming the field.

MAX_SIDE = 8192
"""Largest image side a manifest may record (builds stop at ``shapes.MAX_SIDE``, 4096); sides are multiples of 8."""
MAX_BATCH = 64
"""Largest batch a manifest may record (``shapes.MAX_BATCH``; the UNet's batch range reaches twice it)."""
MAX_WIDTH = 65536
"""Largest width of a layer, a latent channel count or a token id a manifest may record."""
MAX_SCALE = 100.0
"""Largest VAE scaling / shift factor (SD 1.5: 0.18215, SDXL: 0.13025, SD3: 1.5305)."""
MAX_BYTES = 1 << 50
"""Largest file size a manifest may record (1 PiB)."""


def _is_int(v, lo: int | None = None, hi: int | None = None) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi))


def _is_num(v, lo: float, hi: float, lo_open: bool = False) -> bool:
    """A finite real number (not a bool) in [lo, hi] (``lo_open``: (lo, hi])."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        x = float(v)
    except OverflowError:
        return False
    return math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi


def _is_side(v) -> bool:
    return _is_int(v, 8, MAX_SIDE) and v % 8 == 0


def _is_hw(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_side(x) for x in v)


def _is_res(v) -> bool:
    if not isinstance(v, str) or v.count("x") != 1 or len(v) > 16:
        return False
    h, w = v.split("x")
    return h.isdigit() and w.isdigit() and _is_side(int(h)) and _is_side(int(w))


def _is_range(v, lo: int, hi: int) -> bool:
    """[min, opt, max] whole numbers in [lo, hi], min <= opt <= max."""
    return isinstance(v, list) and len(v) == 3 and all(_is_int(x, lo, hi) for x in v) and v[0] <= v[1] <= v[2]


def _vae_problem(v) -> str | None:
    """What is wrong with the VAE's latent scaling as diffusers records it (None when nothing): scaling_factor in
    (0, 100]; shift_factor None or within ±100; latents_mean / latents_std None or lists of finite numbers (std
    > 0); scale_factor a power of 2."""
    if not isinstance(v, dict):
        return "is not an object"
    if not _is_num(v.get("scaling_factor"), 0.0, MAX_SCALE, lo_open=True):
        return f"scaling_factor is {_shown_value(v.get('scaling_factor'))}, not a number in (0, {MAX_SCALE:g}]"
    if v.get("shift_factor") is not None and not _is_num(v["shift_factor"], -MAX_SCALE, MAX_SCALE):
        return f"shift_factor is {_shown_value(v['shift_factor'])}, not a number from -{MAX_SCALE:g} to {MAX_SCALE:g}"
    for k, lo in (("latents_mean", -MAX_SCALE), ("latents_std", 0.0)):
        x = v.get(k)
        if x is not None and not (isinstance(x, list) and 0 < len(x) <= MAX_WIDTH
                                  and all(_is_num(e, lo, MAX_SCALE, lo_open=k == "latents_std") for e in x)):
            return f"{k} is {_shown_value(x)}, not a list of numbers {'above 0' if lo == 0 else 'within ±100'}"
    if v.get("scale_factor") is not None and v["scale_factor"] not in (1, 2, 4, 8, 16, 32, 64):
        return f"scale_factor is {_shown_value(v['scale_factor'])}, not a power of 2"
    return None


def _is_relpath(v) -> bool:
    return isinstance(v, str) and bool(v) and not Path(v).is_absolute() and ".." not in Path(v).parts


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_io(v) -> bool:
    """Inputs/outputs as recorded: [[name, dtype, shape], ...]."""
    return isinstance(v, list) and all(isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[1], str)
                                       and isinstance(x[2], list) for x in v)


def _backends() -> tuple[str, ...]:
    from ..backends import names

    return names()


def _precisions() -> tuple[str, ...]:
    """Every precision some backend builds (the registry's list: one place to add one)."""
    from ..backends import PRECISIONS

    return PRECISIONS


_TOP = {
    "schema_version": _is_int, "name": lambda v: isinstance(v, str), "family": lambda v: v in FAMILY_COMPONENTS,
    "backend": lambda v: v in _backends(), "precision": lambda v: v in _precisions(),
    "cache_key": lambda v: isinstance(v, str), "base_source": lambda v: isinstance(v, str),
    "resolutions": lambda v: isinstance(v, list) and 0 < len(v) <= 256 and all(_is_res(r) for r in v),
    "shape_plans": lambda v: isinstance(v, list) and 0 < len(v) <= 256,
    "batch": lambda v: _is_int(v, 1, MAX_BATCH),
    "size_multiple": lambda v: _is_int(v, 8, 1024) and v % 8 == 0,
    "latent_channels": lambda v: _is_int(v, 1, 64),
    "text_encoders": lambda v: _is_str_list(v) and bool(v),
    "vae": lambda v: _vae_problem(v) is None,
    "scheduler": lambda v: isinstance(v, dict) and _is_relpath(v.get("file")),
    "tokenizer": lambda v: (isinstance(v, dict) and _is_relpath(v.get("file")) and _is_int(v.get("max_length"), 1, 4096)
                            and _is_int(v.get("pad_id"), 0, 1 << 24)),
    "components": lambda v: isinstance(v, dict) and bool(v),
    "file_sizes": lambda v: isinstance(v, dict) and all(_is_relpath(k) and _is_int(n, 0, MAX_BYTES) for k, n in v.items()),
}
_PLAN = {"name": lambda v: isinstance(v, str), "min_hw": _is_hw, "opt_hw": _is_hw, "max_hw": _is_hw,
         "static": lambda v: isinstance(v, bool),
         "unet_batch": lambda v: _is_range(v, 1, 2 * MAX_BATCH)}


def _shown_value(v) -> str:
    """A damaged value as a message shows it: JSON, at most 80 characters (a 10^400 integer included)."""
    try:
        text = json.dumps(v)
    except (ValueError, TypeError):
        text = type(v).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_problems(m) -> list[str]:
    """What is wrong with a manifest ([] when nothing): missing fields, wrong types or values, a
    component the family needs missing or one it does not have, components without files or engines,
    an engine that is not among its component's files, paths leaving the entry, and the values only
    the entry's backend reads (``backends.manifest_problems``)."""
    if not isinstance(m, dict):
        return ["the manifest is not a JSON object"]
    out = []
    if m.get("schema_version") != SCHEMA_VERSION:
        out.append(f"manifest schema version {m.get('schema_version')!r} (expects {SCHEMA_VERSION})")
    for k, ok in _TOP.items():
        if k not in m:
            out.append(f"the manifest has no {k!r}")
        elif not ok(m[k]):
            out.append(f"the manifest's 'vae' is malformed: vae.{_vae_problem(m[k])}" if k == "vae" else
                       f"the manifest's {k!r} is malformed or out of range: {_shown_value(m[k])}")
    if out:
        return out
    for k in ("latents_mean", "latents_std"):
        if m["vae"].get(k) is not None and len(m["vae"][k]) != m["latent_channels"]:
            out.append(f"the manifest's vae.{k} has {len(m['vae'][k])} values for {m['latent_channels']} latent channels")
    if "tokenizer_2" in m and not _TOP["tokenizer"](m["tokenizer_2"]):
        out.append("the manifest's 'tokenizer_2' is malformed")
    for i, p in enumerate(m["shape_plans"]):
        bad = [k for k, ok in _PLAN.items() if not isinstance(p, dict) or not ok(p.get(k))]
        if bad:
            out.append(f"the manifest's shape_plans[{i}] has a missing or malformed {', '.join(bad)}")
        elif not all(p["min_hw"][j] <= p["opt_hw"][j] <= p["max_hw"][j] for j in (0, 1)):
            out.append(f"the manifest's shape_plans[{i}] has min_hw, opt_hw, max_hw out of order")
    family, comps = m["family"], m["components"]
    need = FAMILY_COMPONENTS[family]
    out += [f"the manifest has no component {c!r}, which a {family} entry needs" for c in need if c not in comps]
    out += [f"the manifest names a component {c!r}, which a {family} entry does not have" for c in comps if c not in need]
    encoders = [c for c in need if c.startswith("text_encoder")]
    if m["text_encoders"] != encoders:
        out.append(f"the manifest's 'text_encoders' is {json.dumps(m['text_encoders'])[:80]}; a {family} entry has {encoders}")
    if "text_encoder_2" in need and "tokenizer_2" not in m:
        out.append(f"the manifest has no 'tokenizer_2', which a {family} entry needs")
    plans = {p.get("name") for p in m["shape_plans"] if isinstance(p, dict)}
    for comp, c in comps.items():
        out += _component_problems(comp, c, plans)
    if out:
        return out
    for f in manifest_files(m):
        if f not in m["file_sizes"]:
            out.append(f"the manifest records no size for {f}")
    if "adapters" in m:  # run-time adapter branches: the runtime builds its inputs from this section
        from ..adapters.spec import spec_problems

        out += spec_problems(m["adapters"])
        branched = m["adapters"].get("branches") if isinstance(m["adapters"], dict) else None
        out += [f"the manifest's adapters.branches names a component {c!r} the entry does not have"
                for c in (branched if isinstance(branched, dict) else {}) if c not in m["components"]]
    genai = m.get("genai")
    if genai is not None and not (isinstance(genai, dict) and (isinstance(genai.get("why"), str) or (
            isinstance(genai.get("files"), list) and all(_is_relpath(f) for f in genai["files"])))):
        out.append("the manifest's 'genai' section is malformed (a 'files' list inside the entry, or a 'why')")
    if not out:  # every other path it names (graphs, tokenizers, configs) too: confined with the recorded ones
        out += [f"the manifest records no size for {f}" for f in entry_files(m) if f not in m["file_sizes"]]
    if not out:
        from ..backends import manifest_problems as backend_problems

        out += backend_problems(m)
    return out


def _component_problems(comp: str, c, plans: set) -> list[str]:
    if not isinstance(c, dict):
        return [f"the manifest's component {comp!r} is not an object"]
    out = []
    files, engines = c.get("files"), c.get("engines")
    if not (isinstance(files, list) and files and all(_is_relpath(f) for f in files)):
        out.append(f"component {comp!r} has a missing or malformed 'files' list")
        files = []
    if not (isinstance(engines, dict) and engines and all(_is_relpath(f) for f in engines.values())):
        return out + [f"component {comp!r} has a missing or malformed 'engines' map"]
    for key, f in engines.items():
        if key not in SHARED_ENGINE_KEYS and key not in plans:
            out.append(f"component {comp!r} has an engine for plan {key!r}, which is not among the manifest's shape_plans")
        if files and f not in files:
            out.append(f"component {comp!r} runs engine {f}, which is not among its files (the entry does not hold it)")
    if "precision" in c and c["precision"] not in (*_precisions(), "mixed"):
        out.append(f"component {comp!r} has precision {json.dumps(c['precision'])[:40]}; expected one of {', '.join(_precisions())}")
    for k in ("inputs", "outputs"):
        if k in c and not _is_io(c[k]):
            out.append(f"component {comp!r} has a malformed {k!r} list")
    return out


def manifest_files(m: dict) -> list[str]:
    """Each component's files (tolerates a malformed manifest: what cannot be read is skipped)."""
    files = []
    comps = m.get("components") if isinstance(m, dict) else None
    for c in (comps.values() if isinstance(comps, dict) else []):
        f = c.get("files") if isinstance(c, dict) else None
        files += [x for x in f if isinstance(x, str)] if isinstance(f, list) else []
    return files


def refit_source_dir(engine_dir: str | Path) -> Path:
    """Where the refit source of the entry at ``engine_dir`` is kept: beside the store, never inside the entry."""
    d = Path(engine_dir).absolute()
    return d.parent / REFIT_SOURCES / d.name


def refit_source_files(m: dict) -> list[str]:
    """The refit source's files (each component's ``onnx_files`` and ``weight_map``, relative to
    :func:`refit_source_dir`)."""
    files = []
    comps = m.get("components") if isinstance(m, dict) else None
    for c in (comps.values() if isinstance(comps, dict) else []):
        if isinstance(c, dict):
            files += [f for f in (c["onnx_files"] if isinstance(c.get("onnx_files"), list) else []) if isinstance(f, str)]
            files += [c["weight_map"]] if isinstance(c.get("weight_map"), str) else []
    return files


def refit_source_problem(m: dict, engine_dir: str | Path) -> str | None:
    """Why the refit source beside the store cannot be patched for the entry ``m`` (None: it can): missing,
    written for other weights than the entry holds, or a file missing or of another size."""
    d = refit_source_dir(engine_dir)
    where = f"the refit source (the exported fp32 graphs, kept beside the store in {d})"
    try:
        stamp = json.loads((d / REFIT_SOURCE_STAMP).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{where} is missing; this build writes it again"
    sizes = stamp.get("file_sizes") if isinstance(stamp, dict) else None
    if not isinstance(sizes, dict) or stamp.get("weights_key") != m.get("weights_key") or stamp.get("graph_key") != m.get("graph_key"):
        return f"{where} was written for other weights than the entry holds; this build writes it again"
    from ..core.onnx_weights import MAP_FILE

    for comp, c in (m.get("components") or {}).items():
        graphs, wmap = c.get("onnx_files"), c.get("weight_map")
        if not (isinstance(graphs, list) and graphs and all(isinstance(g, str) for g in graphs) and isinstance(wmap, str)
                and Path(wmap).name == MAP_FILE):
            return f"{where} cannot be used: the entry's record of {comp}'s exported graph is malformed; this build writes it again"
    for f in refit_source_files(m):  # names from the entry's manifest: confined to the source folder like any entry path
        p = d / f if isinstance(f, str) else None
        if problem(d, f) or f not in sizes or p.is_symlink() or not p.is_file() or p.stat().st_size != sizes[f]:
            return f"{where} is damaged or does not match the entry ({str(f)[:80]}); this build writes it again"
    return None


def write_refit_stamp(m: dict, source_dir: Path) -> None:
    """Record which weights the refit source in ``source_dir`` holds, and its files' sizes."""
    from .._util import write_json

    write_json(Path(source_dir) / REFIT_SOURCE_STAMP, {
        "graph_key": m.get("graph_key"), "weights_key": m.get("weights_key"), "entry": m.get("name"),
        "file_sizes": {f: (Path(source_dir) / f).stat().st_size for f in refit_source_files(m)}})


def entry_files(m: dict) -> list[str]:
    """Every file an entry needs: each component's files, the tokenizer(s), the scheduler config, the
    adapter configs, and the files that make it an OpenVINO GenAI folder (not the refit source: it lives beside
    the store, :func:`refit_source_dir`)."""
    files = manifest_files(m)
    for k in ("tokenizer", "tokenizer_2", "scheduler"):
        if isinstance(m.get(k), dict) and "file" in m[k]:
            files.append(m[k]["file"])
    configs = m.get("adapters", {}).get("configs") if isinstance(m.get("adapters"), dict) else None
    files += [f for f in configs.values() if isinstance(f, str)] if isinstance(configs, dict) else []
    genai = m.get("genai", {}).get("files") if isinstance(m.get("genai"), dict) else None
    files += [f for f in genai if isinstance(f, str)] if isinstance(genai, list) else []  # the OpenVINO GenAI layout
    return list(dict.fromkeys(files))


def record_file_sizes(m: dict, engine_dir: Path) -> dict:
    """``m`` with ``file_sizes``: the size in bytes of every file in :func:`entry_files` (at build time)."""
    return {**m, "file_sizes": {f: (Path(engine_dir) / f).stat().st_size for f in entry_files(m)}}


def file_problems(m: dict, engine_dir: Path) -> list[str]:
    """Recorded files that lead outside the entry (``confine.problem``: absolute, ``..``, a symbolic link out, a
    FIFO or device), are missing, or whose size differs from the build's (truncated, replaced)."""
    out = []
    for f, size in m.get("file_sizes", {}).items():
        why = problem(engine_dir, f)
        if why is not None:
            out.append(f"{f} {why}")
            continue
        p = Path(engine_dir) / f
        if not p.is_file():
            out.append(f"{f} is missing")
        elif p.stat().st_size != size:
            out.append(f"{f} is {p.stat().st_size} bytes but the build wrote {size} (corrupt or truncated)")
    return out


def existing_entry(engine_dir: Path, base_source: str, key: str, force: bool) -> dict | None:
    """Decide what to do with what is already at ``engine_dir``.

    Returns the manifest only when it is up to date: valid schema, same cache key, every file
    present with the size the build recorded, and no ``force``. Returns None (rebuild) when the
    folder is free, ``force`` is given, or it holds a stale or damaged entry of the same base.
    Refuses (unless ``force``) a folder holding another model's entry, a manifest too damaged to
    tell whose it is, or something that is not an entry at all.
    """
    from .._util import check_dir_path, check_replaceable

    check_dir_path(engine_dir, "engine dir")
    if not engine_dir.exists():
        return None
    if force:  # --force always rebuilds, but replaces only an entry (or an empty folder)
        check_replaceable(engine_dir, "engine dir", MANIFEST)
        return None
    if not (engine_dir / MANIFEST).is_file():
        if not any(engine_dir.iterdir()):
            return None
        raise UserError(f"engine dir {engine_dir} exists and is not an engine-store entry; choose another --engine-dir, "
                        "or empty it yourself (lcm-export replaces only folders it wrote)")
    try:
        m = json.loads((engine_dir / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        raise UserError(f"engine dir {engine_dir} has an unreadable manifest; pass --force to rebuild it") from None
    other = m.get("base_source") if isinstance(m, dict) else None
    if other != base_source:
        if isinstance(other, str):
            raise UserError(f"engine dir {engine_dir} holds an entry for another model ({other}); choose another --engine-dir or pass --force to replace it")
        raise UserError(f"engine dir {engine_dir} has a damaged manifest (no base_source); pass --force to rebuild it")
    if manifest_problems(m) or file_problems(m, engine_dir) or m.get("cache_key") != key:
        return None  # the same base's entry, stale or damaged: rebuild it
    return m


def reusable_entry(engine_dir: Path, base_source: str) -> dict | None:
    """The manifest at ``engine_dir`` when it is an intact entry of ``base_source`` (valid schema, every
    file with its recorded size), else None: what a weights-only update (refit) may start from."""
    try:
        m = json.loads((Path(engine_dir) / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("base_source") != base_source or manifest_problems(m) or file_problems(m, engine_dir):
        return None
    return m


BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
"""Bytes of one weight at each compute precision (int8: the quantized layers' weights; their per-channel scales
and the few layers left unquantized make an int8 component slightly larger)."""
_FOLDER_PURPOSE = {"tokenizer": "tokenizer", "tokenizer_2": "second tokenizer", "scheduler": "LCM scheduler config",
                   "onnx": "refit source inside the entry (built before recipe 7: now kept beside the store)",
                   "config": "model configs (`adapter add` builds a weightless skeleton from them)",
                   "adapters": "run-time style adapter (`adapter add`)"}


def file_purpose(m: dict, f: str) -> str:
    """What one file of an entry is for, in words (``inspect``)."""
    top, name = f.split("/", 1)[0], f.rsplit("/", 1)[-1]
    c = (m.get("components") or {}).get(top) if isinstance(m.get("components"), dict) else None
    if f == MANIFEST:
        return "manifest: what the entry holds and how it was built"
    genai = m.get("genai") if isinstance(m.get("genai"), dict) else {}
    if f in (genai.get("files") or []) and not f.endswith((".bin", ".xml")) or f == "model_index.json":
        return "OpenVINO GenAI layout (model_index.json, component configs)"
    if f.startswith("tokenizer") and "openvino_" in name:
        return "tokenizer converted for OpenVINO GenAI (openvino-tokenizers)"
    if isinstance(c, dict):
        if c.get("compiled_blob") == f:
            return f"{top}: compiled model for this CPU and engine version (faster cold start)"
        if f in (c.get("engines") or {}).values():
            return f"{top}: engine graph"
        if name.endswith((".bin", ".data", ".onnx_data", ".weights")):
            return f"{top}: weights"
        return f"{top}: engine file"
    return _FOLDER_PURPOSE.get(top, "not written by lcm-export (ignored)")


def footprint(m: dict, engine_dir: str | Path) -> dict:
    """Every file in the entry folder (symlinks not followed) with its size and purpose; the total; and the
    weights' bytes at the precision each component computes in, where the build recorded parameter counts."""
    d = Path(engine_dir)
    files = []
    for root, dirs, names in os.walk(d):
        for n in names:
            p = Path(root) / n
            rel = p.relative_to(d).as_posix()
            files.append((rel, p.lstat().st_size, file_purpose(m, rel)))
    files.sort()
    weights, per = 0, {}
    for comp, c in (m.get("components") or {}).items():
        n = c.get("parameters") if isinstance(c, dict) else None
        if not (isinstance(n, int) and n > 0):
            weights = None
            break
        per[comp] = n * BYTES_PER_WEIGHT.get(c.get("precision", m.get("precision")), 4)
        weights += per[comp]
    return {"files": files, "total": sum(b for _, b, _ in files), "weights": weights, "weights_per_component": per if weights else {}}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_footprint(fp: dict) -> list[str]:
    w = max([len(f) for f, _, _ in fp["files"]] + [4])
    out = ["", "files (every file in the folder: size, purpose)"]
    out += [f"  {f:<{w}}  {_gb(b):>9}  {why}" for f, b, why in fp["files"]]
    if fp["weights"]:
        out.append(f"  {'total':<{w}}  {_gb(fp['total']):>9}  = {fp['total'] / fp['weights']:.2f}x the weights at their compute "
                   f"precision ({_gb(fp['weights'])}: " + ", ".join(f"{c} {_gb(b)}" for c, b in fp["weights_per_component"].items()) + ")")
    else:
        out.append(f"  {'total':<{w}}  {_gb(fp['total']):>9}  (weights not recorded by the build that wrote this entry)")
    return out


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
    if m.get("graph_key"):
        rows.append(("keys", f"graph {m['graph_key'][:12]}…  weights {m.get('weights_key', '')[:12]}…"))
    r = m.get("refit")
    if isinstance(r, dict):
        rows.append(("refit", f"{r.get('at')}: {r.get('weights_changed')} weights in {', '.join(r.get('components', [])) or 'no component'} "
                              f"({r.get('seconds')} s)"))
    pre = m.get("preset")
    if isinstance(pre, dict) and pre.get("name"):
        rows.append(("preset", f"{pre['name']}: {pre.get('trades', '')}"))
        rows += [("", f"note: {n}") for n in pre.get("notes", []) if isinstance(n, str)]
    dec = m.get("vae_decoder")
    if isinstance(dec, dict):
        sha = dec.get("sha256") or {}
        sha = next(iter(sha.values()), "") if isinstance(sha, dict) else ""
        sha = sha or dec.get("state_dict_sha256") or ""
        rows.append(("vae decoder", f"tiny ({dec.get('class')}) {dec.get('source')}  for {dec.get('family') or 'an unchecked family'} "
                                    f"latents ({dec.get('family_from')})  sha256 {sha[:12]}…"))
    for comp, c in m.get("components", {}).items():
        q = c.get("quantization") if isinstance(c, dict) else None
        if isinstance(q, dict):
            rows.append(("int8", _shown(lambda: f"{comp}: scheme {q.get('scheme')} ({q.get('tool')}), rest of the graph in "
                                                f"{c.get('inference_precision')}; calibrated on {(q.get('calibration') or {}).get('samples')} "
                                                f"UNet calls ({q['calibration'].get('prompts')} prompts x {q['calibration'].get('steps')} "
                                                f"LCM steps at {q['calibration'].get('resolution')})")))
    fid = m.get("fidelity")
    if isinstance(fid, dict) and isinstance(fid.get("image_psnr_db"), (int, float)):
        ssim = fid.get("image_ssim")
        gate = "not gated" if fid.get("gate_db") is None else \
            f"gate {fid.get('gate_db')} dB" + (f", SSIM {fid['gate_ssim']}" if fid.get("gate_ssim") is not None else "")
        rows.append(("image check", f"4-step image vs PyTorch fp32 at {fid.get('resolution')}: PSNR {fid['image_psnr_db']:.1f} dB"
                                    + (f", SSIM {ssim:.3f}" if isinstance(ssim, (int, float)) else "") + f" ({gate})"))
        full = fid.get("vs_full_vae")
        if isinstance(full, dict) and isinstance(full.get("image_psnr_db"), (int, float)):
            rows.append(("", _shown(lambda: f"vs the base's own VAE decoder: PSNR {full['image_psnr_db']:.1f} dB, SSIM "
                                            f"{full.get('image_ssim', float('nan')):.3f} (what the tiny decoder trades)")))
        if m.get("demo"):
            rows.append(("", "random weights: these figures compare noise images, not pictures (README, int8 UNet)"))
    genai = m.get("genai")
    if isinstance(genai, dict):
        rows.append(("genai", _shown(lambda: f"OpenVINO GenAI: a {genai['pipeline']} folder too: openvino_genai.Text2ImagePipeline(entry, "
                                                      "\"CPU\"), guidance_scale=1.0 (docs/genai.md)" if "files" in genai
                                                      else f"not a GenAI folder: {genai['why']}")))
    fusion = m.get("fusion")
    for l in fusion.get("loras", []) if isinstance(fusion, dict) and isinstance(fusion.get("loras"), list) else []:
        rows.append(("lora", _shown(lambda: f"{Path(l['path']).name}  λ={l['weight']:g}  {l['format']}  rank "
                                            f"{','.join(map(str, l['ranks']))}  layers {sum(l['layers'].values())}  "
                                            f"sha256 {l['sha256'][:12]}…")))
    v = m.get("versions", {})
    rows.append(("versions", _shown(lambda: "  ".join(f"{k} {val}" for k, val in v.items()))))
    hw = m.get("hardware", {})
    if hw:
        rows.append(("hardware", _shown(lambda: "  ".join(f"{k}: {val}" for k, val in hw.items() if val))))
    w = max(len(r[0]) for r in rows)
    rows = [(k, "" if v is None else v) for k, v in rows]
    out = [f"{k:<{w}}  {val}" for k, val in rows]
    out.append("")
    out.append(f"{'component':<13} {'precision':<9} {'inputs':<60} parity @ size")
    for name, c in m.get("components", {}).items():
        ins = ", ".join(f"{i[0]}:{i[1]}{list(i[2])}" for i in c.get("inputs", []))
        par = _shown(lambda: "; ".join(f"{describe_parity(p)} @ {p.get('resolution')}" for p in c.get("parity", []) if isinstance(p, dict)))
        out.append(f"{name:<13} {c.get('precision', m.get('precision')):<9} {ins:<60} {par}")
    plans = m.get("shape_plans", [])
    if plans:
        out.append("")
        out.append("shape plans: " + "; ".join(
            f"{p['name']} (unet batch {p['unet_batch'][0]}-{p['unet_batch'][2]})" for p in plans))
    if engine_dir is not None:
        out += format_footprint(footprint(m, engine_dir))
    return "\n".join(out)


def describe_parity(p: dict) -> str:
    """One parity record in words: fp32 engines against float64 beside PyTorch fp32's own distance
    ("as accurate as PyTorch"), reduced precision against PyTorch fp32."""
    try:
        if p.get("reference") == "PyTorch fp64":
            return (f"rel-L2 to fp64 {p['rel_l2']:.1e} (PyTorch fp32: {p['torch_fp32_rel_l2']:.1e}; limit {p['limit']:.1e}), "
                    f"max-abs {p['max_abs']:.1e}")
        return f"rel-L2 to PyTorch fp32 {p['rel_l2']:.1e}, max-abs {p['max_abs']:.1e}"
    except (KeyError, TypeError, ValueError):
        return "(malformed parity record)"


def _shown(render) -> str:
    """One informational cell of ``inspect`` (fields the runtime never reads, so outside the schema): a
    malformed one is shown as such instead of ending the listing."""
    try:
        return render()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return "(malformed in the manifest)"
