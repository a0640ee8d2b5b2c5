"""The playground page (``GET /``) and what it reads (``GET /entry``): static files shipped in the package
(``serve/page/``: HTML, one script, one style sheet; no build step, no CDN, works offline) and the entry's
summary with no paths in it.

The page calls the JSON API (``POST /generate`` with ``response_format: json``) and shows the server's
own one-line error messages; it never checks values itself, so its limits are the API's. It puts data
into the document with ``textContent`` and attributes only, never as markup, and the files are served with a
Content-Security-Policy that allows this origin's script, style and requests only (no inline script, no
other origin, no framing), so a prompt or an adapter name that holds markup stays text.
"""

from __future__ import annotations

import functools
import html
from importlib import resources

from pydantic import BaseModel, Field

from ..core.shapes import MAX_BATCH
from ..errors import UserError
from ..runtime.adapters import MAX_WEIGHT
from ..runtime.pipeline import MAX_STEPS
from ..runtime.validate import MAX_GUIDANCE

PAGE_FILES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
              "page.css": "text/css; charset=utf-8"}
"""The only files served, by these fixed names (a request never names a file)."""
ROOT_MARK = "{{ROOT}}"
"""In index.html: the app's route prefix (``<base href>``), so the page works under any Serve route prefix."""
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@functools.lru_cache(maxsize=None)
def page_file(name: str) -> str:
    """The text of one of ``PAGE_FILES`` (package data, read once)."""
    if name not in PAGE_FILES:
        raise KeyError(name)
    return (resources.files("lcm_export.serve") / "page" / name).read_text(encoding="utf-8")


def page_response(name: str, root_path: str = ""):
    """One page file with its type and the security headers; index.html gets the route prefix as its base."""
    from fastapi.responses import Response

    text = page_file(name)
    if name == "index.html":
        text = text.replace(ROOT_MARK, html.escape(root_path.rstrip("/") + "/", quote=True))
    return Response(text, media_type=PAGE_FILES[name], headers=HEADERS)


class EntryResponse(BaseModel):
    """What the page shows and offers: the entry's summary and choices, no paths."""

    name: str = Field(description="the entry's name (its folder's name)")
    family: str
    backend: str
    device: str
    precision: str
    preset: str = Field(description="the build preset: quality | fast")
    preset_trades: str = Field(description="what the preset trades, one line")
    demo: bool = Field(description="a demo model with random weights: its images are noise")
    resolutions: list[str] = Field(description="sizes the entry was built for, HxW")
    default_resolution: str = Field(description="the size used when a request gives none, HxW")
    batch: int
    guidance: str
    adapters: list[str] = Field(description="names of the style adapters the entry holds now (none: no adapter branches)")
    adapter_branches: bool = Field(description="whether the entry takes run-time style adapters at all")
    limits: dict = Field(description="the API's ranges: steps, guidance, adapter weight, batch")


def entry_summary(manifest: dict, precision: str, adapters) -> dict:
    """``EntryResponse`` for a loaded entry (``adapters``: the pipeline's ``Adapters``; its index is re-read
    when it changed, so adapters added while serving show up)."""
    sizes = [str(r) for r in manifest.get("resolutions", [])]
    default = "x".join(str(v) for v in manifest.get("default_resolution") or ())
    names: list[str] = []
    if adapters.supported:
        try:
            names = sorted(adapters.index())
        except UserError:  # a malformed index: /generate says why (with the entry's paths); the page offers none
            names = []
    preset = manifest.get("preset") if isinstance(manifest.get("preset"), dict) else {}
    return {
        "name": str(manifest.get("name", "")), "family": str(manifest.get("family", "sd15")),
        "backend": str(manifest.get("backend", "?")), "device": str(manifest.get("device", "?")), "precision": precision,
        "preset": str(preset.get("name", "quality")), "preset_trades": str(preset.get("trades", "")),
        "demo": bool(manifest.get("demo")), "resolutions": sizes,
        "default_resolution": default if default in sizes else (sizes[0] if sizes else ""),
        "batch": int(manifest.get("batch", 1)), "guidance": str(manifest.get("guidance", "auto")),
        "adapters": names, "adapter_branches": bool(adapters.supported),
        "limits": {"steps": [1, MAX_STEPS], "guidance": [0, MAX_GUIDANCE], "adapter_weight": [-MAX_WEIGHT, MAX_WEIGHT],
                   "batch": [1, MAX_BATCH]},
    }
