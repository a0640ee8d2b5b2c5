"""The HTTP API's shape: request/response models and error mapping (FastAPI and Starlette only; the Ray
deployment in ``deployment.py`` mounts it; the body guard is ``guard.py``'s).

Errors are one JSON line, ``{"error": "<message>"}``:

- 400: bad input. The runtime's ``UserError`` message (steps 0, an unbuilt size, guidance out of range,
  ...), a missing or mistyped field (types are strict: ``TYPES``), a body that is not JSON, a body over
  ``MAX_BODY_BYTES``.
- 408: a body that did not arrive within ``BODY_TIMEOUT_S``.
- 500: ``EngineError`` (an engine produced NaN/inf, an internal failure): valid input, our fault; and
  ``DamagedEntry`` (the served entry's own files are damaged: an adapter index or factors file changed on
  disk), with the same one line the CLI prints.
- 503 with ``Retry-After``: every replica is busy and the queue is full (Ray Serve's backpressure,
  ``max_ongoing_requests`` + ``max_queued_requests``; made JSON by ``guard.JsonErrors`` in the proxy).

One exception: a request that is not HTTP at all (a malformed request line or header, e.g.
``Content-Length: abc``) is refused by the HTTP server (uvicorn, inside Ray Serve's proxy) before any
application code runs, with its own plain-text ``400 Invalid HTTP request received.``.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DamagedEntry, EngineError, UserError
from ..runtime.validate import MAX_GUIDANCE
from ..core.shapes import MAX_BATCH
from .guard import BODY_TIMEOUT_S, MAX_BODY_BYTES, BodyLimit, error  # noqa: F401 (re-exported: the API's shape)

TYPES = ("Types are strict, as in the Python API: steps, seed, batch, width and height must be JSON integers "
         "(not 4.0, not \"4\", not true); guidance a JSON number (2 and 2.0 both work; not \"2\", not true); "
         "prompts JSON strings of valid Unicode (no lone surrogates).")


class GenerateRequest(BaseModel):
    """Text to image. Defaults are ``lcm-export generate``'s; the same arguments and seed give the same
    PNG bytes as ``generate`` writes. Types are strict (``TYPES``); ranges are checked by the runtime
    (``runtime/validate.py``), the same checks as the Python API's."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "description": "Text to image; defaults are `lcm-export generate`'s, and so are the PNG bytes. " + TYPES})

    prompt: StrictStr = Field(description="text prompt (may be empty: unconditional); valid Unicode")
    negative_prompt: Optional[StrictStr] = Field(None, description="negative prompt (used when guidance > 1)")
    steps: StrictInt = Field(4, description="LCM steps: an integer from 1 to 50")
    guidance: StrictFloat = Field(1.0, description=f"classifier-free guidance scale, a number from 0 to {MAX_GUIDANCE:g}; "
                                                   "> 1 runs the UNet at 2B (LCM-LoRA works best at 1-2)")
    seed: StrictInt = Field(0, description="seed of numpy's Generator for latents and step noise: an integer >= 0")
    width: Optional[StrictInt] = Field(None, description="a width the entry was built for (default: its default size)")
    height: Optional[StrictInt] = Field(None, description="a height the entry was built for (give both or neither)")
    batch: StrictInt = Field(1, description=f"images for this prompt, 1 to {MAX_BATCH}; more than 1 needs response_format json")
    adapters: Optional[dict[StrictStr, StrictFloat]] = Field(
        None, description="style adapters for this request only, by name: {\"papercut\": 0.8, \"pixel\": 0.3}; names of "
                          "adapters the entry holds (`lcm-export adapter list`; never a path), weights from -8 to 8 "
                          "(0 = off). Requests with other adapters never share an engine call")
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
    stages_ms: Optional[dict[str, float | list[float]]] = Field(
        None, description="the runtime's milliseconds per stage of that engine call: tokenize, text_encoder, unet_steps "
                          "(one per step), unet_total, scheduler, vae_input, vae_decoder, postprocess, engines, overhead, total")


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


def _validation_message(exc: RequestValidationError, content_type: str | None = None) -> str:
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
        if not _is_json_type(content_type):  # FastAPI reads the body as JSON only when it is declared JSON
            return (f"the request body is read as JSON only with Content-Type: application/json (got "
                    f"{repr(content_type) if content_type else 'no Content-Type'}); send a JSON object with that header")
        return "the request body must be a JSON object"
    if e.get("type") == "float_type" and isinstance(e.get("input"), int) and not isinstance(e.get("input"), bool):
        return f"{field}: an integer of {len(str(abs(e['input'])))} digits is out of range for a number"
    got = e.get("input")
    got = f" (got {json.dumps(got, ensure_ascii=True)[:60]})" if got is not None and not isinstance(got, dict) else ""
    want = _STRICT.get(e.get("type"))
    if want:
        return f"{field}: must be {want}{got}; types are strict (no numbers in quotes, no true/false for numbers)"
    return f"{field}: {e.get('msg', 'invalid')}{got}"


def _is_json_type(content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _parse_error(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (its own message is "There was an error parsing the body"), in one line."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start}); send JSON text in UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to read; send a flat JSON object"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the request body holds a number of more than 4300 digits; send numbers in the documented ranges"
    return f"the request body cannot be read as JSON ({type(cause).__name__ if cause else 'parse error'}); send a JSON object"


_STRICT = {"int_type": "a JSON integer, e.g. 4", "int_from_float": "a JSON integer, e.g. 4",
           "float_type": "a JSON number, e.g. 1.5", "string_type": "a JSON string"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return error(400, _validation_message(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ...: same shape
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return error(400, _parse_error(exc.__cause__))
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error(400, str(exc))

    @app.exception_handler(DamagedEntry)
    async def _damaged_entry(request: Request, exc: DamagedEntry):  # the server's entry, not the request: 500
        return error(500, str(exc))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error(500, str(exc))


def png_bytes(img) -> bytes:
    """The PNG file ``lcm-export generate`` writes for ``img`` (same encoder call: ``img.save(format="PNG")``)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wants_json(req: GenerateRequest, accept: str | None) -> bool:
    return req.response_format == "json" or "application/json" in (accept or "")


def stages_ms(timings: dict | None) -> dict | None:
    """``Timings.as_dict()`` (seconds) in milliseconds."""
    if not timings:
        return None
    return {k: [s * 1e3 for s in t] if isinstance(t, list) else t * 1e3 for k, t in timings.items()}


def image_response(req: GenerateRequest, accept: str | None, images: list, job, seconds: float, call_batch: int,
                   timings: dict | None = None):
    """PNG bytes for one image, JSON with base64 PNGs when asked (or when batch > 1), with the runtime's
    per-stage times (``timings``: seconds, ``Timings.as_dict()``) in milliseconds."""
    headers = {"X-Runtime-Ms": f"{seconds * 1e3:.2f}", "X-Call-Batch": str(call_batch)}
    if not wants_json(req, accept):
        return Response(png_bytes(images[0]), media_type="image/png", headers=headers)
    body = GenerateResponse(images=[base64.b64encode(png_bytes(i)).decode() for i in images], width=job.width,
                            height=job.height, seed=job.seed, runtime_ms=seconds * 1e3, call_batch=call_batch,
                            stages_ms=stages_ms(timings))
    return JSONResponse(body.model_dump(), headers=headers)


def check_format(req: GenerateRequest, accept: str | None) -> None:
    if req.batch > 1 and not wants_json(req, accept):
        raise UserError(f"batch {req.batch} makes {req.batch} images and a PNG response holds one; "
                        "send \"response_format\": \"json\" (base64 PNGs) or batch 1")
