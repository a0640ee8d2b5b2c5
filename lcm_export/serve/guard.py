"""ASGI middleware that keeps every HTTP answer one shape and no client able to hold a replica.

Used twice (Starlette only, no Ray import):

- in each replica, around the FastAPI app (``deployment.py``): ``BodyLimit``;
- in Ray Serve's HTTP proxy, in front of the routing to replicas (``proxy_middlewares``, which Ray
  calls when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names it; ``server.init_ray`` sets that for
  the Ray it starts): ``BodyLimit``, ``JsonErrors`` and ``RetryBackpressure``.

Why in the proxy: the proxy hands a request to a replica as soon as its headers arrive, and the replica
then waits for the body. A client that sends headers and half a body and stalls held one of the
replica's ``max_ongoing_requests`` slots for as long as it kept the socket open: 8 such sockets made
``/health`` time out, 30 made every request a 503. Read in the proxy, a body arrives completely
(bounded in size and time) before any replica is involved, and a stalled one gets a 408 after
``BODY_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import json

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted; a prompt is a few hundred bytes (CLIP reads 77 tokens)."""
BODY_TIMEOUT_S = 10.0
"""Longest a request body may take to arrive, from the end of the headers: 64 KiB in 10 s is 6.5 KB/s,
far below any working link, and a stalled client is cut off long before it matters."""
BACKPRESSURE_GRACE_S = 1.0
"""Longest the proxy retries a request that Ray Serve's router turned away as over its queue (see
``RetryBackpressure``) before the client gets the 503; the same as the 503's Retry-After."""
PROXY_CALLBACK = "lcm_export.serve.guard.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """A body over ``limit`` bytes gets a 400, one that takes longer than ``timeout_s`` to arrive a 408
    (and the connection is closed), before the app sees either. Content-Length is checked up front; the
    body is read, counting, then replayed to the app (bodies here are a few hundred bytes)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                slow = error(408, f"the request body did not arrive within {self.timeout_s:g} s; send the whole body "
                                  "right after the headers", headers={"Connection": "close"})
                return await slow(scope, receive, send)
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


class JsonErrors:
    """Ray Serve's own error answers (503 backpressure, 408, 404 for an unknown route, 500 when a replica
    fails mid-request) are plain text: rewritten as ``{"error": "<text>"}``, their other headers
    (``Retry-After``) kept. Answers that are JSON already, and every success, pass untouched; a request
    that ends with no answer at all gets a JSON 500 instead of the server's plain-text one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}
        parts: list[bytes] = []
        started = False

        async def wrapped(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                headers = dict(msg.get("headers", []))
                if msg["status"] >= 400 and b"json" not in headers.get(b"content-type", b""):
                    held.update(msg)  # rewrite once the whole body is here
                    return
            elif msg["type"] == "http.response.body" and held:
                parts.append(msg.get("body", b""))
                if msg.get("more_body", False):
                    return
                text = b"".join(parts).decode("utf-8", "replace").strip().replace("\n", " ") or "error"
                body = json.dumps({"error": text}).encode()
                keep = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
                await send({**held, "headers": keep + [(b"content-type", b"application/json"),
                                                      (b"content-length", str(len(body)).encode())]})
                held.clear()
                return await send({"type": "http.response.body", "body": body})
            await send(msg)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:  # noqa: BLE001 - the proxy failed before answering: still one JSON line
            if started:
                raise
        if not started:
            await error(500, "internal error: the request failed inside Ray Serve (see its logs)")(scope, receive, send)


class RetryBackpressure:
    """Ray Serve's router counts a request as queued until it has placed it on a replica, and places queued
    requests with a backoff: when a request ends and its client sends the next one at once, the router can
    still count the requests it has not yet moved onto the freed slot, and turns the new one away with a
    503 although the deployment holds fewer than ``max_ongoing_requests`` + ``max_queued_requests`` (issue
    26: 8 closed-loop clients against 4 ongoing + 4 queued got 8-9 503s out of 32). A backpressure 503
    (status 503 with a Retry-After, from Ray, not JSON) means the request reached no replica, so it is sent
    again here, after 10, 20, 40 ... 200 ms, for up to ``grace_s``; only then does the client see the 503.
    A request over the limit therefore waits up to ``grace_s`` for room before its 503."""

    def __init__(self, app, grace_s: float = BACKPRESSURE_GRACE_S):
        self.app, self.grace_s = app, grace_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        seen: list = []  # the request's messages, replayed to each retry
        wait = 0.01
        while True:
            last = loop.time() >= deadline  # the last try: its answer, whatever it is, goes to the client
            if not await self._attempt(scope, receive, send, seen, last):
                return
            await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
            wait = min(2 * wait, 0.2)

    async def _attempt(self, scope, receive, send, seen: list, last: bool) -> bool:
        """One pass through the proxy's app with the request replayed; True when Ray turned it away
        (its answer then went nowhere). Each attempt has its own closures: a task the proxy left behind
        cannot take the next attempt's messages."""
        replay = list(seen)
        rejected = False

        async def recv():
            if replay:
                return replay.pop(0)
            msg = await receive()
            if msg["type"] == "http.request":
                seen.append(msg)
            return msg

        async def watch(msg):
            nonlocal rejected
            if msg["type"] == "http.response.start" and not last and _backpressure(msg):
                rejected = True
            if not rejected:
                await send(msg)

        await self.app(dict(scope), recv, watch)
        return rejected


def _backpressure(start: dict) -> bool:
    """Ray Serve's backpressure answer: 503 with a Retry-After header and a plain-text body (this
    package's own errors are JSON, and Ray's 503 for a deployment with no replica has no Retry-After)."""
    headers = {k.lower(): v for k, v in start.get("headers", [])}
    return start["status"] == 503 and b"retry-after" in headers and b"json" not in headers.get(b"content-type", b"")


def proxy_middlewares() -> list:
    """What Ray Serve's HTTP proxy wraps its app in (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``):
    bodies read whole, bounded, before routing; every error answer JSON; a backpressure 503 retried
    for up to ``BACKPRESSURE_GRACE_S`` before the client sees it. Ray wraps its app in list order, so the
    last is the outermost: JsonErrors sees every answer, RetryBackpressure sees Ray's own (not yet JSON)."""
    from starlette.middleware import Middleware

    return [Middleware(RetryBackpressure), Middleware(BodyLimit), Middleware(JsonErrors)]
