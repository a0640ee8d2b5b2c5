"""``lcm-export serve``: the lean runtime behind Ray Serve (needs the ``[serve]`` extra).

    from lcm_export.serve import ServeOptions, start, stop
    start(ServeOptions("engines/demo-sd15", replicas=2, port=8000))   # returns once deployed
    # POST http://127.0.0.1:8000/generate {"prompt": "..."} -> PNG
    stop()

Modules: ``server`` (options, start/stop), ``deployment`` (the Ray Serve replica), ``api`` (HTTP
shapes and error mapping), ``batching`` (merging requests with per-request seeds; no Ray),
``client`` (a stdlib HTTP client for tests and benchmarks). Importing this package imports no Ray.
"""

from .server import ServeOptions, serve_forever, start, stop

__all__ = ["ServeOptions", "serve_forever", "start", "stop"]
