"""The HTTP layer without Ray (lcm_export/serve/api.py): error mapping, body limit, PNG bytes."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI

from lcm_export.errors import EngineError, UserError
from lcm_export.runtime.pipeline import NonFiniteOutput
from lcm_export.serve.api import MAX_BODY_BYTES, BodyLimit, GenerateRequest, install_error_handlers


def _app() -> FastAPI:
    """The deployment's error handling and body limit around a route that fails on demand."""
    app = FastAPI()
    app.add_middleware(BodyLimit)
    install_error_handlers(app)

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if req.prompt == "user":
            raise UserError("steps 0: must be an integer from 1 to 50")
        if req.prompt == "nan":
            raise NonFiniteOutput("the unet engine produced NaN/inf at step 1 (fp16 overflow?)")
        if req.prompt == "engine":
            raise EngineError("internal error: RuntimeError: boom")
        return {"ok": req.model_dump()}

    return app


def call(app, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, chunks: int = 1):
    """One HTTP request through the ASGI app, in-process: (status, headers, JSON body)."""
    if headers is None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    step = max(1, -(-len(body) // chunks))
    parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(data)


@pytest.mark.parametrize("body, status, words", [
    (b'{"prompt": "a cat"}', 200, None),
    (b'{"steps": 4}', 400, "prompt is required"),
    (b'{"prompt": 5}', 400, "prompt: Input should be a valid string"),
    (b'{"prompt": "x", "stepz": 4}', 400, "stepz: unknown field"),
    (b'{"prompt": "x", "steps": "four"}', 400, "steps: Input should be a valid integer"),
    (b"prompt=a cat", 400, "not valid JSON"),
    (b'{"prompt": "x"', 400, "not valid JSON"),
    (b'["a cat"]', 400, "must be a JSON object"),
    (b'{"prompt": "user"}', 400, "steps 0: must be an integer"),
    (b'{"prompt": "nan"}', 500, "NaN/inf"),
    (b'{"prompt": "engine"}', 500, "internal error"),
])
def test_statuses_and_one_line_messages(body, status, words):
    code, _, out = call(_app(), body)
    assert code == status, out
    if words:
        assert set(out) == {"error"} and words in out["error"] and "\n" not in out["error"]


def test_oversized_bodies_get_400_declared_or_streamed():
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    code, _, out = call(_app(), big)
    assert code == 400 and f"over {MAX_BODY_BYTES} bytes" in out["error"]
    # no Content-Length (chunked): counted as it streams
    code, _, out = call(_app(), big, headers=[(b"content-type", b"application/json")], chunks=8)
    assert code == 400 and f"over {MAX_BODY_BYTES} bytes" in out["error"]
    # just under the limit is fine
    ok = json.dumps({"prompt": "x" * (MAX_BODY_BYTES - 100)}).encode()
    assert call(_app(), ok)[0] == 200


def test_text_plain_body_is_400_not_422():
    code, _, out = call(_app(), b"a cat", headers=[(b"content-type", b"text/plain"), (b"content-length", b"5")])
    assert code == 400 and "error" in out
