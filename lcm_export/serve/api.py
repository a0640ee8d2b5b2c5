"""The HTTP API's shape: request/response models, error mapping and the body-size guard (FastAPI and
Starlette only; the Ray deployment in ``deployment.py`` mounts it).

Errors are one JSON line, ``{"error": "<message>"}``:

- 400: bad input. The runtime's ``UserError`` message (steps 0, an unbuilt size, ...), a missing or
  mistyped field, a body that is not JSON, a body over ``MAX_BODY_BYTES``.
- 500: ``EngineError`` (an engine produced NaN/inf, an internal failure): valid input, our fault.
- 503 with ``Retry-After``: every replica is busy and the queue is full (Ray Serve's backpressure,
  ``max_ongoing_requests`` + ``max_queued_requests``).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineError, UserError

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted; a prompt is a few hundred bytes (CLIP reads 77 tokens)."""


class GenerateRequest(BaseModel):
    """Text to image. Defaults are ``lcm-export generate``'s; the same arguments and seed give the same
    PNG bytes as ``generate`` writes."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="text prompt (may be empty: unconditional)")
    negative_prompt: Optional[StrictStr] = Field(None, description="negative prompt (used when guidance > 1)")
    steps: int = Field(4, description="LCM steps, 1-50")
    guidance: float = Field(1.0, description="classifier-free guidance scale; > 1 runs the UNet at 2B")
    seed: int = Field(0, description="seed of numpy's Generator for latents and step noise (>= 0)")
    width: Optional[int] = Field(None, description="a width the entry was built for (default: its default size)")
    height: Optional[int] = Field(None, description="a height the entry was built for (give both or neither)")
    batch: int = Field(1, description="images for this prompt; more than 1 needs response_format json")
    response_format: Literal["png", "json"] = Field(
        "png", description="png: the image's bytes (image/png); json: {images: [base64 PNG], ...}. "
                           "`Accept: application/json` also selects json")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNG files, one per image")
    width: int
    height: int
    seed: int
    runtime_ms: float = Field(description="wall time of the engine call that made these images")
    call_batch: int = Field(description="images made by that engine call (more than batch when requests were merged)")


class HealthResponse(BaseModel):
    status: Literal["ready"]
    engine_dir: str
    family: str
    backend: str
    precision: str
    resolutions: list[str]
    batch: int = Field(description="images per engine call the entry was built for")
    guidance: str = Field(description="guidance shapes built: auto (both), on (2B), off (B)")
    max_batch_size: int = Field(description="images this replica merges into one engine call")
    replica: dict = Field(description="process id and Ray node of the replica that answered")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of errors -> one line, like the runtime's messages."""
    errs = exc.errors()
    if not errs:
        return "bad request"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')}); send a JSON object"
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    if e.get("type") == "missing":
        return f"{field} is required"
    if e.get("type") == "extra_forbidden":
        return f"{field}: unknown field; fields: {', '.join(GenerateRequest.model_fields)}"
    if e.get("type") == "model_attributes_type":
        return "the request body must be a JSON object"
    got = e.get("input")
    got = f" (got {json.dumps(got)[:60]})" if got is not None and not isinstance(got, dict) else ""
    return f"{field}: {e.get('msg', 'invalid')}{got}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ...: same shape
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error(400, str(exc))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error(500, str(exc))


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 400 before the app sees it. Content-Length
    is checked up front; a body without one (chunked) is read, counting, up to the limit, then
    replayed to the app (bodies here are a few hundred bytes)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error(400, f"the request body is over {self.limit} bytes; send a JSON object with a prompt")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return await error(400, "bad Content-Length header")(scope, receive, send)
                if size > self.limit:
                    return await too_big(scope, receive, send)
        messages, seen = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await too_big(scope, receive, send)
            if not msg.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def png_bytes(img) -> bytes:
    """The PNG file ``lcm-export generate`` writes for ``img`` (same encoder call: ``img.save(format="PNG")``)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wants_json(req: GenerateRequest, accept: str | None) -> bool:
    return req.response_format == "json" or "application/json" in (accept or "")


def image_response(req: GenerateRequest, accept: str | None, images: list, job, seconds: float, call_batch: int):
    """PNG bytes for one image, JSON with base64 PNGs when asked (or when batch > 1)."""
    headers = {"X-Runtime-Ms": f"{seconds * 1e3:.2f}", "X-Call-Batch": str(call_batch)}
    if not wants_json(req, accept):
        return Response(png_bytes(images[0]), media_type="image/png", headers=headers)
    body = GenerateResponse(images=[base64.b64encode(png_bytes(i)).decode() for i in images], width=job.width,
                            height=job.height, seed=job.seed, runtime_ms=seconds * 1e3, call_batch=call_batch)
    return JSONResponse(body.model_dump(), headers=headers)


def check_format(req: GenerateRequest, accept: str | None) -> None:
    if req.batch > 1 and not wants_json(req, accept):
        raise UserError(f"batch {req.batch} makes {req.batch} images and a PNG response holds one; "
                        "send \"response_format\": \"json\" (base64 PNGs) or batch 1")
