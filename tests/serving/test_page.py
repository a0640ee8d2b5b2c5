"""The playground page (``GET /``, lcm_export/serve/page/) in a real browser: headless Chromium driven over the
DevTools Protocol (tests/serving/browser.py) loads it from a local server, fills the form, clicks Generate and
reads the image, the timings and the errors. One Ray + Serve for the module: the batch-4 entry with two style
adapters ("a", "b"), served under the route prefix /play (relative URLs must resolve under any prefix).
Screenshots are kept in each test's output folder (pytest's tmp_path). About a minute on 2 cores.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from lcm_export.serve.client import Client, wait_ready

from .browser import Browser, find_chromium
from .conftest import free_port, generate_png

ray = pytest.importorskip("ray", reason="the [serve] extra (Ray Serve) is not installed")
pytestmark = [pytest.mark.serve, pytest.mark.slow]

PAGE = Path(__file__).resolve().parents[2] / "lcm_export" / "serve" / "page"
MARKUP = '<img src=x onerror="window.__pwned=1"></dd><script>window.__pwned=2</script>'


# ------------------------------------------------------------------------------------------------
# the files themselves (no server): offline, no markup built from data

def test_page_files_are_package_data_that_work_offline():
    from lcm_export.serve.playground import PAGE_FILES, page_file

    assert sorted(p.name for p in PAGE.iterdir()) == sorted(PAGE_FILES)
    text = {name: page_file(name) for name in PAGE_FILES}
    for name, t in text.items():  # nothing fetched from elsewhere: no URL with a scheme or host, no CSS imports
        assert not re.search(r"\b(https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]", t, re.I) and "@import" not in t, name
    assert "url(" not in text["page.css"]
    html = text["index.html"]
    assert set(re.findall(r'(?:src|href)="([^"]*)"', html)) == {"{{ROOT}}", "page.css", "page.js", "docs"}
    assert "<style" not in html and not re.search(r"\son[a-z]+=", html), "no inline style or handlers (the CSP)"
    assert re.findall(r"<script[^>]*>", html) == ['<script src="page.js" defer>']
    js = text["page.js"]
    for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert bad not in js, bad
    pyproject = (PAGE.parents[2] / "pyproject.toml").read_text()
    assert '"serve/page/*"' in pyproject


def test_entry_summary_holds_no_paths(adapter_entry):
    from lcm_export.runtime.adapters import Adapters
    from lcm_export.serve.deployment import entry_precision
    from lcm_export.serve.playground import EntryResponse, entry_summary
    from lcm_export.store.manifest import read_manifest

    m = read_manifest(adapter_entry)
    s = entry_summary(m, entry_precision(m), Adapters(adapter_entry, m))
    EntryResponse.model_validate(s)
    assert (s["family"], s["backend"], s["precision"], s["preset"]) == ("sd15", "onnxruntime", "fp32", "quality")
    assert s["resolutions"] == ["64x64"] and s["default_resolution"] == "64x64" and s["adapters"] == ["a", "b"]
    text = json.dumps(s)
    assert str(adapter_entry) not in text and "/tmp" not in text and ".safetensors" not in text


# ------------------------------------------------------------------------------------------------
# in the browser

@pytest.fixture(scope="module")
def chromium():
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(why)
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(adapter_entry):
    from lcm_export.serve import ServeOptions, start, stop
    from lcm_export.serve.server import init_ray

    port = free_port()
    init_ray(ServeOptions(str(adapter_entry), port=port), num_cpus=2)
    try:
        start(ServeOptions(str(adapter_entry), port=port, replicas=1, threads=1, replica_cpus=0), name="page",
              route_prefix="/play")
        url = f"http://127.0.0.1:{port}/play"
        wait_ready(url, 120)
        yield url
    finally:
        stop(shutdown_ray=True)


def _open(b: Browser, url: str) -> None:
    b.events.clear()
    b.goto(url, ready="document.body && (document.body.dataset.ready === '1' || !document.getElementById('error').hidden)")


def _texts(b: Browser, selector: str) -> list[str]:
    return b.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")


def _fill(b: Browser, **fields) -> None:
    for name, value in fields.items():
        if name == "size":
            b.choose("#size", value)
        elif name.startswith("adapter_"):
            b.type(f'#adapter-list input[data-adapter="{name[len("adapter_"):]}"]', value)
        else:
            b.type(f"#{name}", value)


def _click_and_wait(b: Browser, count_before: int, timeout_s: float = 60.0) -> None:
    b.click("#generate")
    b.wait_for(f"Number(document.body.dataset.generated || 0) > {count_before} || !document.getElementById('error').hidden",
               timeout_s)


def test_the_page_generates_the_image_generate_writes(chromium, server, adapter_entry, tmp_path):
    b = chromium
    _open(b, server + "/")
    assert b.evaluate("document.getElementById('error').hidden"), _texts(b, "#error")
    summary = dict(zip(_texts(b, "#summary dt"), _texts(b, "#summary dd")))
    assert summary["family"] == "sd15" and summary["backend"] == "onnxruntime (cpu)" and summary["precision"] == "fp32"
    assert summary["preset"] == "quality" and summary["sizes (HxW)"] == "64x64"
    assert b.evaluate("[...document.getElementById('size').options].map(o => o.value)") == ["64x64"]
    assert _texts(b, "#adapter-list label") == ["a", "b"]

    _fill(b, prompt="a red cube, paper-cut style", negative_prompt="blurry", seed="7", steps="2", guidance="1.5",
          size="64x64", adapter_a="0.8")
    _click_and_wait(b, 0)
    assert b.evaluate("document.getElementById('error').hidden"), _texts(b, "#error")
    assert b.evaluate("[document.getElementById('image').naturalWidth, document.getElementById('image').naturalHeight]") == [64, 64]
    rows = _texts(b, "#timings th")
    for want in ("text encoder", "UNet step 1", "UNet step 2", "VAE decoder", "runtime total", "engine call (server)",
                 "round trip (this browser)"):
        assert want in rows, rows
    assert "UNet step 3" not in rows
    assert all(re.fullmatch(r"\d+\.\d+", t) for t in _texts(b, "#timings td")), _texts(b, "#timings td")
    assert "seed 7" in _texts(b, "#caption")[0]
    shot = b.screenshot(tmp_path / "page.png")
    print(f"screenshot: {shot}")

    # the values typed are the values sent: the PNG is the one `lcm-export generate` writes for them
    src = b.evaluate("document.getElementById('image').src")
    assert src.startswith("data:image/png;base64,")
    want = generate_png(adapter_entry, tmp_path / "ref.png", "a red cube, paper-cut style", 7, steps=2, guidance=1.5,
                        negative_prompt="blurry", adapters={"a": 0.8})[0]
    assert base64.b64decode(src.split(",", 1)[1]) == want
    assert b.page_errors() == []  # no script error, no Content-Security-Policy violation


@pytest.mark.parametrize("fields, body", [
    ({"steps": "0"}, {"steps": 0}),
    ({"guidance": "31"}, {"guidance": 31}),
    ({"adapter_b": "9"}, {"adapters": {"b": 9}}),
])
def test_bad_input_shows_the_servers_one_line_error(chromium, server, tmp_path, fields, body):
    b = chromium
    _open(b, server)  # no trailing slash: the page's relative URLs still resolve under /play
    _fill(b, prompt="a bowl of fruit", **fields)
    _click_and_wait(b, 0)
    message = _texts(b, "#error")[0]
    expected = Client(server).generate(prompt="a bowl of fruit", **body)
    assert expected.status == 400
    assert message == expected.json()["error"] and "\n" not in message and message
    assert b.evaluate("document.getElementById('error').dataset.status") == "400"
    assert b.evaluate("document.getElementById('figure').hidden")
    b.screenshot(tmp_path / "page-error.png")


def test_data_from_the_server_stays_text(chromium, server):
    """An entry (its files are untrusted) whose name, preset and adapter names hold markup, and an error
    message that does: the page shows them as text and runs nothing (answers faked with the DevTools Fetch
    domain, so the real server stays as it is)."""
    b = chromium
    fake = {"name": MARKUP, "family": "sd15", "backend": MARKUP, "device": "cpu", "precision": "fp32", "preset": MARKUP,
            "preset_trades": MARKUP, "demo": False, "resolutions": ["64x64"], "default_resolution": "64x64", "batch": 1,
            "guidance": "auto", "adapters": [MARKUP, "b"], "adapter_branches": True, "limits": {}}
    sent = []

    def answer(params):
        req = params["request"]
        if req["url"].endswith("/entry"):
            return 200, {"Content-Type": "application/json"}, json.dumps(fake).encode()
        sent.append(req.get("postData", ""))
        return 400, {"Content-Type": "application/json"}, json.dumps({"error": MARKUP}).encode()

    b.intercept(["*/play/entry", "*/play/generate"], answer)
    try:
        _open(b, server + "/")
        assert _texts(b, "#adapter-list label") == [MARKUP, "b"]
        assert MARKUP in _texts(b, "#summary dd") and MARKUP in b.evaluate("document.getElementById('headline').textContent")
        _fill(b, prompt=MARKUP)
        b.type('#adapter-list input[data-adapter="b"]', "0.5")
        b.evaluate("document.querySelector('#adapter-list input').value = '0.25'")
        _click_and_wait(b, 0)
        assert _texts(b, "#error") == [MARKUP]
        assert json.loads(sent[-1]) == {"prompt": MARKUP, "seed": 0, "steps": 4, "guidance": 1, "height": 64, "width": 64,
                                        "adapters": {MARKUP: 0.25, "b": 0.5}, "response_format": "json"}
        assert b.evaluate("typeof window.__pwned") == "undefined"
        assert b.evaluate("document.querySelectorAll('img').length") == 1  # the page's own <img id=image>
        assert b.evaluate("document.querySelectorAll('script').length") == 1
    finally:
        b.stop_intercepting()


def test_served_with_a_strict_policy_and_no_paths_or_cors(server, adapter_entry, request):
    c = Client(server)
    page = c.request("GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for part in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert part in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert '<base href="/play/">' in page.body.decode()
    for path, kind in (("/page.js", "text/javascript"), ("/page.css", "text/css")):
        r = c.request("GET", path)
        assert r.status == 200 and r.headers["content-type"].startswith(kind), path
    assert c.request("GET", "/page.py").status == 404 and c.request("GET", "/../pyproject.toml").status == 404
    entry = c.request("GET", "/entry", headers={"Origin": "http://evil.example"})
    assert entry.status == 200 and str(adapter_entry) not in entry.body.decode() and "/tmp" not in entry.body.decode()
    assert "access-control-allow-origin" not in entry.headers
    # the per-stage times the page shows: the runtime's own, in the JSON reply
    r = c.generate(prompt="x", steps=3, response_format="json")
    stages = r.json()["stages_ms"]
    assert len(stages["unet_steps"]) == 3 and 0 < stages["total"] <= r.json()["runtime_ms"]
    # another origin's script cannot read the API: the browser blocks the answer (no CORS headers)
    b = request.getfixturevalue("chromium")  # skips here, after the checks above, where there is no Chromium
    b.goto("about:blank")
    got = b.evaluate(f"fetch({json.dumps(server + '/entry')}).then(r => 'read ' + r.status, e => 'blocked')")
    assert got == "blocked"
