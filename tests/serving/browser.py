"""Headless Chromium driven over the Chrome DevTools Protocol (a websocket; `websockets`, which Ray Serve
installs, is the only library): start it, load a page, type, click, read the DOM, intercept requests,
take screenshots. Just enough for tests/serving/test_page.py; every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def find_chromium() -> tuple[str | None, str]:
    """(the executable, "") or (None, why not): $LCM_EXPORT_CHROMIUM, else chromium / chromium-browser on PATH."""
    exe = os.environ.get("LCM_EXPORT_CHROMIUM")
    if exe and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return None, f"LCM_EXPORT_CHROMIUM={exe} is not an executable file"
    exe = exe or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        return None, ("no Chromium: install Debian's `chromium` package (apt-get install chromium; .ci/run does) "
                      "or set LCM_EXPORT_CHROMIUM to a Chromium/Chrome executable")
    try:
        import websockets.sync.client  # noqa: F401
    except ImportError:
        return None, "the `websockets` package is missing (pip install 'lcm-export[dev]')"
    return exe, ""


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one tab. ``events`` collects the protocol's events (console, errors, ...)."""

    def __init__(self, exe: str, width: int = 1280, height: int = 860, timeout_s: float = 30.0):
        from websockets.sync.client import connect

        self.profile = Path(tempfile.mkdtemp(prefix="lcm-chromium-"))
        args = [exe, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server", "--mute-audio",
                "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.log = self.profile / "chromium.log"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), start_new_session=True)
        self.events: list[dict] = []
        self._id = 0
        self.ws = None
        try:
            port = self._port(timeout_s)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            deadline = time.monotonic() + timeout_s
            while True:
                targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if not pages:
                raise CDPError("Chromium started but shows no page")
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s)
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                             "mobile": False})
        except BaseException:
            self.close()
            raise

    def _port(self, timeout_s: float) -> int:
        f = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited with {self.proc.returncode}: {self.log.read_text(errors='replace')[-800:]}")
            if f.exists() and f.read_text().strip():
                return int(f.read_text().split()[0])
            time.sleep(0.05)
        raise CDPError(f"Chromium did not open its DevTools port within {timeout_s:g} s")

    # -- the protocol ------------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, timeout_s: float = 30.0) -> dict:
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._recv(deadline, method)
            if msg.get("id") == my:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            self._event(msg)

    def _recv(self, deadline: float, what: str) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer to {what} in time")
        try:
            return json.loads(self.ws.recv(timeout=left))
        except TimeoutError:
            raise TimeoutError(f"no answer to {what} in time") from None

    def _event(self, msg: dict) -> None:
        if "method" not in msg:
            return
        self.events.append(msg)
        if msg["method"] == "Fetch.requestPaused" and self.on_request is not None:
            self.on_request(msg["params"])

    on_request = None
    """Called with each paused request's params while ``Fetch`` is enabled (``intercept``)."""

    def pump(self, seconds: float) -> None:
        """Handle events for ``seconds`` (intercepted requests are answered from here)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = json.loads(self.ws.recv(timeout=max(0.001, deadline - time.monotonic())))
            except TimeoutError:
                return
            self._event(msg)

    # -- what tests do -------------------------------------------------------------------------------

    def evaluate(self, expression: str, timeout_s: float = 30.0):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      timeout_s)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, poll_s: float = 0.05):
        """Poll until the expression is truthy; its value. Events (intercepts) are handled meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout_s:g} s: {expression}")
            self.pump(poll_s)

    def goto(self, url: str, ready: str = "document.readyState === 'complete'", timeout_s: float = 30.0) -> None:
        """Load ``url`` (redirects followed: ``/play`` -> ``/play/``) and wait until ``ready`` is true there."""
        self.send("Page.navigate", {"url": url})
        self.wait_for(f"(() => {{ try {{ return location.href.startsWith({json.dumps(url)}) && ({ready}); }} "
                      "catch (e) { return false; } })()", timeout_s)  # false while the old or new document is half there

    def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it, and type ``text`` as keyboard input would insert it."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.value = ''; "
                      "e.dispatchEvent(new Event('input', {bubbles: true})); return true; })()")
        if text:
            self.send("Input.insertText", {"text": text})

    def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select> by its value (as a user's choice fires change)."""
        ok = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                           f"if (![...e.options].some(o => o.value === {json.dumps(value)})) return false; "
                           f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()")
        if not ok:
            raise CDPError(f"{selector} has no option {value!r}")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}}); "
                            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport, scrolled to the top of the page."""
        self.evaluate("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur(); true")
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def intercept(self, url_patterns: list[str], handler) -> None:
        """Answer requests matching ``url_patterns`` (CDP wildcards) with ``handler(params) -> (status, headers, body)``
        instead of the network."""
        def on_request(params):
            status, headers, body = handler(params)
            self.ws.send(json.dumps({"id": 0, "method": "Fetch.fulfillRequest", "params": {
                "requestId": params["requestId"], "responseCode": status,
                "responseHeaders": [{"name": k, "value": v} for k, v in headers.items()],
                "body": base64.b64encode(body).decode()}}))

        self.on_request = on_request
        self.send("Fetch.enable", {"patterns": [{"urlPattern": p, "requestStage": "Request"} for p in url_patterns]})

    def stop_intercepting(self) -> None:
        self.send("Fetch.disable")
        self.on_request = None

    def page_errors(self) -> list[str]:
        """Script exceptions and console / browser errors other than network ones (a 400 answer logs one)."""
        out = []
        for e in self.events:
            if e["method"] == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif e["method"] == "Log.entryAdded":
                entry = e["params"]["entry"]
                if entry.get("level") == "error" and entry.get("source") != "network":
                    out.append(f"{entry.get('source')}: {entry.get('text')}")
            elif e["method"] == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"]))
        return out

    def close(self) -> None:
        try:
            if self.ws is not None:
                self.ws.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        # Chromium's helpers (zygote, renderers, GPU, network) share its process group (its own session)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.profile, ignore_errors=True)
