"""The HTTP layer without Ray (lcm_export/serve/api.py): error mapping, body limit, PNG bytes."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI

from lcm_export.errors import DamagedEntry, EngineError, UserError
from lcm_export.runtime.pipeline import NonFiniteOutput
from lcm_export.serve.api import MAX_BODY_BYTES, BodyLimit, GenerateRequest, install_error_handlers
from lcm_export.serve.guard import JsonErrors, RetryBackpressure


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
        if req.prompt == "damaged":
            raise DamagedEntry("/e/adapters/index.json: the record of adapter 'a' is malformed (sha256 or bytes); remove it")
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
    (b'{"prompt": 5}', 400, "prompt: must be a JSON string"),
    (b'{"prompt": "x", "stepz": 4}', 400, "stepz: unknown field"),
    (b'{"prompt": "x", "steps": "four"}', 400, "steps: must be a JSON integer"),
    # types are strict (issue 19): no bools for numbers, no numbers in quotes, no fractions for integers
    (b'{"prompt": "x", "steps": true}', 400, "steps: must be a JSON integer, e.g. 4 (got true)"),
    (b'{"prompt": "x", "steps": "4"}', 400, 'steps: must be a JSON integer, e.g. 4 (got "4")'),
    (b'{"prompt": "x", "steps": 4.0}', 400, "steps: must be a JSON integer"),
    (b'{"prompt": "x", "seed": "7"}', 400, "seed: must be a JSON integer"),
    (b'{"prompt": "x", "batch": false}', 400, "batch: must be a JSON integer"),
    (b'{"prompt": "x", "width": "64", "height": 64}', 400, "width: must be a JSON integer"),
    (b'{"prompt": "x", "guidance": "2"}', 400, "guidance: must be a JSON number"),
    (b'{"prompt": "x", "guidance": true}', 400, "guidance: must be a JSON number"),
    (b'{"prompt": "x", "guidance": 2}', 200, None),
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


# issue 26: each body FastAPI cannot parse says why, in one line; a damaged entry is the server's 500
HOSTILE_BODIES = [
    ("weight-400-digit-integer", b'{"prompt": "x", "adapters": {"s": ' + b"1" * 400 + b"}}", None, 400,
     "adapters.s: an integer of 400 digits is out of range for a number"),
    ("guidance-400-digit-integer", b'{"prompt": "x", "guidance": ' + b"9" * 400 + b"}", None, 400,
     "guidance: an integer of 400 digits is out of range"),
    ("number-5000-digits", b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", None, 400, "a number of more than 4300 digits"),
    ("invalid-utf8", b'{"prompt": "x\xff"}', None, 400, "not valid UTF-8 (byte 13)"),
    ("nesting-5000-deep", b"[" * 5000 + b"]" * 5000, None, 400, "nests arrays or objects too deeply"),
    ("json-as-text-plain", b'{"prompt": "x"}', [(b"content-type", b"text/plain")], 400,
     "read as JSON only with Content-Type: application/json (got 'text/plain')"),
    ("json-as-form", b'{"prompt": "x"}', [(b"content-type", b"application/x-www-form-urlencoded")], 400,
     "(got 'application/x-www-form-urlencoded')"),
    ("json-without-content-type", b'{"prompt": "x"}', [], 400, "(got no Content-Type)"),
    ("json-with-charset", b'{"prompt": "x"}', [(b"content-type", b"application/json; charset=utf-8")], 200, None),
    ("damaged-entry", b'{"prompt": "damaged"}', None, 500, "the record of adapter 'a' is malformed"),
]


@pytest.mark.parametrize("body, headers, status, words", [r[1:] for r in HOSTILE_BODIES], ids=[r[0] for r in HOSTILE_BODIES])
def test_hostile_bodies_get_one_meaningful_line(body, headers, status, words):
    code, _, out = call(_app(), body, headers)
    assert code == status, out
    if words:
        assert set(out) == {"error"} and words in out["error"] and "\n" not in out["error"], out
        assert "There was an error parsing the body" not in out["error"]


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


# ------------------------------------------------------------------------------------------------
# one set of type rules (issue 19): a JSON value the HTTP model takes is one the Python API takes

FIELD_VALUES = {"steps": [4, 4.0, True, "4", None], "seed": [7, 7.5, False, "7"], "batch": [1, 1.0, True, "1"],
                "guidance": [2, 2.5, True, "2", None], "prompt": ["x", 5, True, None]}


@pytest.mark.parametrize("field, value", [(f, v) for f, vs in FIELD_VALUES.items() for v in vs])
def test_http_and_python_api_take_the_same_types(field, value):
    import pydantic

    from lcm_export.runtime.validate import check_scalars

    args = {"prompt": "x", "negative_prompt": None, "steps": 4, "guidance": 1.0, "seed": 0, "batch": 1, "height": None,
            "width": None, "output_type": "pil", "max_steps": 50, field: value}
    try:
        check_scalars(**args)
        python_ok = True
    except UserError:
        python_ok = False
    try:
        GenerateRequest.model_validate_json(json.dumps({"prompt": "x", field: value}))
        http_ok = True
    except pydantic.ValidationError:
        http_ok = False
    assert http_ok == python_ok, (field, value, http_ok, python_ok)


# ------------------------------------------------------------------------------------------------
# a stalled body is cut off (408), and Ray Serve's own plain-text errors become JSON (guard.py)

def test_a_body_that_stalls_gets_408_after_the_timeout():
    async def ok(scope, receive, send):
        raise AssertionError("the app ran before the body arrived")

    guard = BodyLimit(ok, timeout_s=0.3)
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"200")]}
    first = [{"type": "http.request", "body": b'{"prompt": "x' + b" " * 80, "more_body": True}]
    sent = []

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(3600)  # the client sent half its body and stalled

    async def send(msg):
        sent.append(msg)

    async def go():
        t0 = asyncio.get_running_loop().time()
        await guard(scope, receive, send)
        return asyncio.get_running_loop().time() - t0

    took = asyncio.run(go())
    assert 0.25 <= took < 2.0
    start = sent[0]
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert "did not arrive within 0.3 s" in json.loads(sent[1]["body"])["error"]


def _answer(status: int, body: bytes, content_type: bytes, extra=()):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
    return app


def _through(app):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    asyncio.run(JsonErrors(app)({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_ray_serves_plain_text_errors_become_one_json_line():
    text = b"Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
    status, headers, body = _through(_answer(503, text, b"text/plain; charset=utf-8", [(b"retry-after", b"1")]))
    assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"error": text.decode()} and int(headers[b"content-length"]) == len(body)
    # our own JSON errors and every success pass byte for byte
    assert _through(_answer(400, b'{"error": "steps 0"}', b"application/json"))[2] == b'{"error": "steps 0"}'
    assert _through(_answer(200, b"\x89PNG", b"image/png"))[2] == b"\x89PNG"

    async def silent(scope, receive, send):  # the proxy gave up without answering (a replica died)
        return None

    status, _, body = _through(silent)
    assert status == 500 and "internal error" in json.loads(body)["error"]


# ------------------------------------------------------------------------------------------------
# issue 26: Ray's router turns requests away while it still counts ones it is about to place

def _flaky(rejections: int, status: int = 503, content_type: bytes = b"text/plain; charset=utf-8", retry_after=True):
    """An app that answers like Ray's router over its queue for its first ``rejections`` calls, then
    echoes the request body it read (each call reads the whole body, as the proxy does)."""
    calls = []

    async def app(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        calls.append(body)
        if len(calls) <= rejections:
            extra = [(b"retry-after", b"1")] if retry_after else []
            return await _answer(status, b"Request dropped due to backpressure", content_type, extra)(scope, receive, send)
        await _answer(200, b"ok:" + body, b"text/plain")(scope, receive, send)

    return app, calls


def _retry_through(app, grace_s: float):
    sent = []
    parts = [{"type": "http.request", "body": b'{"prompt":', "more_body": True},
             {"type": "http.request", "body": b' "a cat"}', "more_body": False}]

    async def receive():
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)  # the client keeps the connection open

    async def send(msg):
        sent.append(msg)

    async def run():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await RetryBackpressure(app, grace_s)({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive, send)
        return loop.time() - t0

    took = asyncio.run(run())
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent  # the client sees exactly one answer
    return starts[0]["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), took


def test_a_backpressure_503_is_retried_with_the_same_body_and_the_client_sees_only_the_answer():
    app, calls = _flaky(3)
    status, body, took = _retry_through(app, grace_s=1.0)
    assert status == 200 and body == b'ok:{"prompt": "a cat"}'
    assert calls == [b'{"prompt": "a cat"}'] * 4  # 3 turned away, the 4th placed: each got the whole body
    assert 0.01 + 0.02 + 0.04 <= took < 0.5, took  # the backoff between tries


def test_a_lasting_backpressure_503_reaches_the_client_after_the_grace():
    app, calls = _flaky(10**6)
    status, body, took = _retry_through(app, grace_s=0.3)
    assert status == 503 and body == b"Request dropped due to backpressure"
    assert 0.25 <= took < 0.8 and 3 <= len(calls) <= 10, (took, len(calls))


@pytest.mark.parametrize("kind", ["json-503", "503-without-retry-after", "500"])
def test_other_errors_are_not_retried(kind):
    app, calls = {"json-503": lambda: _flaky(1, content_type=b"application/json"),
                  "503-without-retry-after": lambda: _flaky(1, retry_after=False),
                  "500": lambda: _flaky(1, status=500)}[kind]()
    status, _, took = _retry_through(app, grace_s=1.0)
    assert status == (500 if kind == "500" else 503) and len(calls) == 1 and took < 0.2
