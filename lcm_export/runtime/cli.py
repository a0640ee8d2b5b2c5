"""``lcm-export generate`` (lean: no torch/diffusers imports)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .._util import disk_error, file_parent
from ..errors import UserError
from .validate import check_batch


def output_paths(out: str, batch: int) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise UserError(f"--out {out}: must be a .png path")
    if p.is_dir():
        raise UserError(f"--out {out} is a folder; give a .png file path")
    parent = file_parent(p)
    if parent is not None:
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if batch == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(batch)]


def save_png_atomic(img, path: Path) -> None:
    """Write ``img`` as PNG at ``path`` in one rename, readable like any file the user makes
    (mode 0666 & ~umask; mkstemp alone would leave 0600)."""
    from .._util import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_adapters(items: list[str]) -> dict[str, float] | None:
    """``--adapter NAME[:WEIGHT]`` (repeatable) -> {name: weight}; a name given twice is refused."""
    out: dict[str, float] = {}
    for text in items:
        name, sep, tail = text.rpartition(":")
        if not sep:
            name, tail = text, "1"
        try:
            weight = float(tail)
        except ValueError:
            raise UserError(f"--adapter {text}: WEIGHT {tail!r} is not a number (use NAME or NAME:WEIGHT, e.g. papercut:0.8)") from None
        if name in out:
            raise UserError(f"--adapter {name} is given twice; give each adapter once")
        out[name] = weight
    return out or None


def generate_cmd(a) -> int:
    from .pipeline import LCMPipeline

    paths = output_paths(a.out, check_batch(a.batch))  # bounded first: it sizes the list of paths and every array
    height, width = a.resolution if a.resolution else (None, None)
    adapters = parse_adapters(a.adapter)
    pipe = LCMPipeline.from_engine_dir(a.engine_dir, shapes=a.shapes)  # one size and batch per run: static pays
    images = pipe(a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance, seed=a.seed,
                  batch=a.batch, height=height, width=width, adapters=adapters)
    written = []
    try:
        for img, p in zip(images, paths):
            save_png_atomic(img, p)
            written.append(p)
    except OSError as exc:
        for p in written:  # all of the batch or none of it
            p.unlink(missing_ok=True)
        raise disk_error(exc, a.out) from None
    t = pipe.last_timings
    print(f"wrote {', '.join(map(str, paths))}")
    print(f"timing: {t.line()}")
    if pipe.manifest.get("demo"):
        print("note: demo model with random weights: the image is noise")
    if a.json:
        print(json.dumps(t.as_dict()))
    return 0
