"""The house: the stage folders import one way (docs/design.md, "Import floors"). Every relative import in the
package, lazy ones inside functions included, is checked against the floor order; the few imports that climb
within ``builder/`` are listed here and in the design notes, so a new one fails this test until it is justified."""

import ast
from pathlib import Path

import lcm_export

FLOORS = ["errors", "_stderr", "_cpu", "confine", "_util", "core", "adapters.spec", "backends", "store", "runtime",
          "sources.lora", "sources.demo", "sources.models", "sources.tiny_vae",
          "builder.presets", "builder.plan", "builder.components", "builder.fuse", "builder.export", "adapters.graph",
          "builder.verify", "builder.quantize", "builder.genai", "builder.refit", "builder.build_engine",
          "adapters.index", "bench", "serve", "cli"]
"""Lowest first: a module may import its own floor and those before it."""
CLIMBS = {("builder.plan", "builder.quantize"), ("builder.plan", "builder.verify"), ("builder.export", "builder.verify")}
"""plan.py reads two constants of later stages (the calibration version in the graph key; which precisions get an
image check, for the progress bar); the ``export`` command composes export and verify."""


def _floor(mod: str) -> tuple[int, str]:
    best = None
    for i, name in enumerate(FLOORS):
        if mod == name or mod.startswith(name + "."):
            best = (i, name)
    assert best is not None, f"lcm_export.{mod} is on no floor: add it to FLOORS (and docs/design.md)"
    return best


def _is_docstring_only(f: Path) -> bool:
    """A stage folder's ``__init__.py`` that only says what the folder holds (it imports nothing)."""
    body = ast.parse(f.read_text()).body
    return f.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body)


def _imports():
    root = Path(lcm_export.__file__).parent
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_init else parts)
        pkg = mod.split(".") if is_init else mod.split(".")[:-1]
        if not mod or _is_docstring_only(f):
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                target = base = pkg[: len(pkg) - n.level + 1] + (n.module.split(".") if n.module else [])
                for a in n.names:  # `from .adapters import index`: the module imported is adapters.index
                    if (root.joinpath(*base) / "__init__.py").is_file():
                        target = base + [a.name]
                    if not base and not (root / f"{a.name}.py").is_file() and not (root / a.name).is_dir():
                        continue  # `from .. import __version__`: the package's own attribute
                    yield mod, ".".join(target)


def test_every_module_has_a_floor():
    root = Path(lcm_export.__file__).parent
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if mod and not _is_docstring_only(f):
            _floor(mod)


def test_imports_run_down_the_floors():
    climbs = set()
    for mod, target in _imports():
        (a, fa), (b, fb) = _floor(mod), _floor(target)
        if b > a and fa != fb:
            climbs.add((fa, fb))
    assert climbs == CLIMBS
