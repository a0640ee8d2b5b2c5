"""The Ray Serve deployment: one replica = one ``LCMPipeline`` (lean runtime, no torch) behind the
FastAPI app of ``api.py``.

Concurrency inside a replica: the event loop takes requests, checks them (``make_job``) and queues
them in Ray Serve's ``@serve.batch``; one batch at a time goes to the replica's single engine thread,
which owns the pipeline (``LCMPipeline`` reuses buffers, so it is never called from two threads at
once). The event loop stays free for /health and for checking new requests while the engines run.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import FastAPI, Header, Request
from ray import serve

from .api import (TYPES, GenerateRequest, GenerateResponse, HealthResponse, check_format, image_response,
                  install_error_handlers)
from .batching import Done, make_job, run_jobs
from .guard import BODY_TIMEOUT_S, BodyLimit
from .playground import EntryResponse, entry_summary, page_response

app = FastAPI(
    title="lcm-export",
    summary="4-step LCM text-to-image over an engine-store entry (lean numpy runtime on Ray Serve)",
    description="Errors are `{\"error\": \"<one line>\"}`: 400 bad input, 408 a body that did not arrive within "
                f"{BODY_TIMEOUT_S:g} s, 500 engine failure, 503 + Retry-After when every replica and the queue are full. "
                "The one exception: a request that is not valid HTTP (e.g. `Content-Length: abc`) gets the HTTP server's "
                "plain-text `400 Invalid HTTP request received.` before any of this code runs. " + TYPES,
)
app.add_middleware(BodyLimit)
install_error_handlers(app)

PNG = {"content": {"image/png": {}, "application/json": {"schema": GenerateResponse.model_json_schema()}},
       "description": "one PNG (image/png), or JSON with base64 PNGs when asked"}
ERRORS = {400: {"description": "bad input: one-line message"}, 408: {"description": "the body arrived too slowly"},
          500: {"description": "engine failure"},
          503: {"description": "overloaded: retry after the Retry-After header's seconds"}}


# Helpers first: Ray pickles the deployment class by value, with the globals it uses at that point.
def entry_precision(manifest: dict) -> str:
    precs = sorted({str(r.get("precision")) for r in manifest.get("components", {}).values() if r.get("precision")})
    return manifest.get("precision") or "+".join(precs) or "?"


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id)
    except Exception:  # outside a replica (tests calling the class directly)
        return ""


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


@serve.deployment(name="LCMModel")
@serve.ingress(app)
class LCMModel:
    def __init__(self, engine_dir: str, threads: Optional[int] = None, max_batch_size: Optional[int] = None,
                 batch_wait_s: float = 0.005):
        from lcm_export.runtime import LCMPipeline  # absolute: Ray may pickle this class by value

        self.pipe = LCMPipeline.from_engine_dir(engine_dir, threads)
        built = int(self.pipe.manifest.get("batch", 1))
        # merging by default only where the backend declares it exact (each request's solo image)
        from lcm_export.backends import get as backend_module

        exact = getattr(backend_module(self.pipe.manifest["backend"]), "MERGE_EXACT", False) and self.pipe.manifest.get("device") == "cpu"
        default = built if exact else 1  # MERGE_EXACT was measured on the CPU: GPU kernels may differ per batch size
        self.cap = max(1, min(max_batch_size or default, built))
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="lcm-engine")
        self._run.set_max_batch_size(self.cap)
        self._run.set_batch_wait_timeout_s(batch_wait_s if self.cap > 1 else 0.0)
        m = self.pipe.manifest
        self.info = {
            "status": "ready", "engine_dir": str(engine_dir), "family": m.get("family", "sd15"),
            "backend": m.get("backend", "?"), "precision": entry_precision(m), "resolutions": list(m["resolutions"]),
            "batch": built, "guidance": str(m.get("guidance", "auto")), "max_batch_size": self.cap,
            "replica": {"pid": os.getpid(), "node_id": _node_id(), "replica_id": _replica_id()},
        }

    @app.get("/health", response_model=HealthResponse, summary="readiness: the loaded entry and this replica")
    async def health(self) -> dict:
        return self.info

    @app.get("/entry", response_model=EntryResponse, summary="the entry's summary, sizes and adapters (no paths): what the page offers")
    async def entry(self) -> dict:
        return entry_summary(self.pipe.manifest, self.info["precision"], self.pipe.adapters)

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request):
        return page_response("index.html", request.scope.get("root_path", ""))

    @app.get("/page.js", include_in_schema=False)
    async def page_js(self):
        return page_response("page.js")

    @app.get("/page.css", include_in_schema=False)
    async def page_css(self):
        return page_response("page.css")

    @app.post("/generate", summary="text to image", responses={200: PNG, **ERRORS})
    async def generate(self, req: GenerateRequest, accept: Optional[str] = Header(None)):
        job = make_job(self.pipe, req.prompt, req.negative_prompt, req.steps, req.guidance, req.seed, req.batch,
                       req.height, req.width, req.adapters)  # every value checked (batch bounded) before anything else
        check_format(req, accept)
        out = await self._run(job)
        if isinstance(out, Exception):
            raise out
        assert isinstance(out, Done)
        return image_response(req, accept, out.images, job, out.seconds, out.call_batch, out.timings)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _run(self, jobs: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine, run_jobs, self.pipe, jobs, self.cap)
