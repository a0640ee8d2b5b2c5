"""One fresh-process memory/time probe of loading one OpenVINO component. argv: mode xml [extra]"""
import json, os, resource, sys, time
from pathlib import Path
import numpy as np

def mem():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            d[k] = int(v.split()[0]) / 1e6  # GB (kB units)
    d["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {k: round(v, 3) for k, v in d.items()}

mode, xml = sys.argv[1], Path(sys.argv[2])
prec = sys.argv[3] if len(sys.argv) > 3 else "f32"
RES = int(os.environ.get("RES", "256"))
import openvino as ov
core = ov.Core()
cfg = {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 2}
out = {"mode": mode, "xml": str(xml), "prec": prec, "start": mem()}
t0 = time.perf_counter()
keep = None
if mode == "blob":
    keep = np.memmap(xml.with_suffix(".blob"), dtype=np.uint8, mode="c")
    cm = core.import_model(ov.Tensor(keep, shared_memory=True), "CPU", cfg)
elif mode == "blobmine":
    import mmap, threading
    mm = keep = np.memmap(xml.with_suffix(".blob"), dtype=np.uint8, mode="c")
    def drop():
        mm._mmap.madvise(mmap.MADV_DONTNEED)
    stop = threading.Event()
    def loop():
        while not stop.wait(0.05):
            drop()
    threading.Thread(target=loop, daemon=True).start()
    cm = core.import_model(ov.Tensor(keep, shared_memory=True), "CPU", cfg)
    mode = "mine:blob"
elif mode == "blobstream":  # import from a file object
    with open(xml.with_suffix(".blob"), "rb") as f:
        import io
        cm = core.import_model(f.read(), "CPU", cfg)
elif mode == "ir":
    cm = core.compile_model(str(xml), "CPU", cfg)
elif mode == "readdel":
    m = core.read_model(str(xml))
    cm = core.compile_model(m, "CPU", cfg)
    del m
elif mode == "ir_nommap":
    core.set_property({"ENABLE_MMAP": False})
    cm = core.compile_model(str(xml), "CPU", cfg)
elif mode.startswith("cache"):  # cache:<dir>[:weightless]
    parts = mode.split(":")
    c = dict(cfg, CACHE_DIR=parts[1])
    if "weightless" in parts:
        c["ENABLE_WEIGHTLESS"] = True
    if "sizemode" in parts:
        c["CACHE_MODE"] = ov.properties.CacheMode.OPTIMIZE_SIZE
    cm = core.compile_model(str(xml), "CPU", c)
elif mode.startswith("wlmodel"):  # wlmodel:<blob> weightless blob + MODEL_PTR = our model over our map
    import mmap, threading
    blob = mode.split(":", 1)[1]
    mm = np.memmap(xml.with_suffix(".bin"), dtype=np.uint8, mode="c")
    def drop():
        mm._mmap.madvise(mmap.MADV_DONTNEED)
    stop = threading.Event()
    def loop():
        while not stop.wait(0.05):
            drop()
    threading.Thread(target=loop, daemon=True).start()
    m = core.read_model(xml.read_bytes(), ov.Tensor(mm, shared_memory=True))
    keep = np.memmap(blob, dtype=np.uint8, mode="c")
    cm = core.import_model(ov.Tensor(keep, shared_memory=True), "CPU", dict(cfg, MODEL_PTR=m))
    del m
    mode = "mine:wl"
elif mode.startswith("wlblob"):  # wlblob:<blobpath> import a weightless blob with WEIGHTS_PATH
    blob = mode.split(":", 1)[1]
    keep = np.memmap(blob, dtype=np.uint8, mode="c")
    cm = core.import_model(ov.Tensor(keep, shared_memory=True), "CPU", dict(cfg, WEIGHTS_PATH=str(xml.with_suffix(".bin"))))
elif mode.startswith("wlexport"):  # wlexport:<blobpath>: compile with weightless, export
    blob = mode.split(":", 1)[1]
    cm = core.compile_model(str(xml), "CPU", dict(cfg, ENABLE_WEIGHTLESS=True))
    s = cm.export_model()
    Path(blob).write_bytes(s.getbuffer() if hasattr(s, "getbuffer") else s)
    out["blob_bytes"] = Path(blob).stat().st_size
elif mode.startswith("mine"):  # mine[:thread][:c] read_model(xml text, Tensor over our own memmap of .bin)
    import mmap, threading
    mm = np.memmap(xml.with_suffix(".bin"), dtype=np.uint8, mode="c" if ":c" in mode else "r")
    keep = mm
    def drop():
        mm._mmap.madvise(mmap.MADV_DONTNEED)
    stop = threading.Event()
    if ":thread" in mode:
        def loop():
            while not stop.wait(0.05):
                drop()
        th = threading.Thread(target=loop, daemon=True); th.start()
    m = core.read_model(xml.read_bytes(), ov.Tensor(mm, shared_memory=True))
    out["after_read"] = mem()
    cm = core.compile_model(m, "CPU", cfg)
    del m
    out["after_compile_before_drop"] = mem()
    if ":first" not in mode:
        stop.set()
    drop()
out["load_s"] = round(time.perf_counter() - t0, 2)
out["loaded"] = mem()
req = cm.create_infer_request()
feeds = {}
for i in cm.inputs:
    ps = i.get_partial_shape()
    shape = [d.get_length() if d.is_static else 1 for d in ps]
    if len(shape) == 4:
        shape = [1, 4, RES // 8, RES // 8]
    et = i.get_element_type().to_dtype()
    name = i.get_any_name()
    if np.issubdtype(et, np.integer):
        feeds[name] = np.ones(shape, dtype=et)
    else:
        feeds[name] = np.random.default_rng(0).standard_normal(shape).astype(et)
t1 = time.perf_counter()
req.infer(feeds)
out["first_s"] = round(time.perf_counter() - t1, 2)
out["after_first"] = mem()
if mode.startswith("mine"):
    stop.set(); drop(); out["after_first_drop"] = mem()
t1 = time.perf_counter()
req.infer(feeds)
out["second_s"] = round(time.perf_counter() - t1, 2)
out["after_second"] = mem()
print(json.dumps(out))
