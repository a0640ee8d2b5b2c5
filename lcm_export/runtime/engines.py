"""The engine protocol the pipeline runs; engines are loaded through the backend registry.

An engine takes a dict of numpy inputs and returns its first output (``run``) or every output in the
graph's order (``run_all``). Loading checks the manifest against this machine (backend ``check``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..backends import load_engines as _load


class Engine(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output."""

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the graph's order."""


def load_engines(manifest: dict, engine_dir: Path, threads: int | None = None, shapes: str = "dynamic") -> dict[str, dict[str, Engine]]:
    """{component: {plan name or '*': engine}} for an entry; the backend's warnings go to stderr.
    ``shapes``: "static" compiles each engine for its call's input shapes, "dynamic" as built, "auto"
    static where the backend can (``backends.SHAPES``)."""
    import sys

    engines, warnings = _load(manifest, engine_dir, threads, shapes)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return engines
