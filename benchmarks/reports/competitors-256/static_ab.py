"""A/B: our quality entry's UNet IR (fp16-compressed weights, dynamic H/W) against GenAI's fp32 IR, bf16 compute,
2 threads, 256², static or not: interleaved rounds, median step."""
import sys, time, statistics, numpy as np, openvino as ov
core = ov.Core()
cfg = {"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "2", "PERFORMANCE_HINT": "LATENCY"}
side = int(sys.argv[1]) if len(sys.argv) > 1 else 256
paths = {"ours (fp16 IR)": "/work/scratch/compet/store/quality/unet/openvino_model.xml",
}
models = {}
for name, p in paths.items():
    for static in (False, True, "hw"):
        m = core.read_model(p)
        if static:
            shapes = {}
            for i in m.inputs:
                n = next(x for x in i.get_names() if x in ("sample", "timestep", "encoder_hidden_states"))
                b = -1 if static == "hw" else 1
                shapes[i] = {"sample": [b, 4, side // 8, side // 8], "timestep": [b], "encoder_hidden_states": [b, 77, 768]}[n]
            m.reshape(shapes)
        c = core.compile_model(m, "CPU", cfg)
        r = c.create_infer_request()
        feeds = {}
        for i in c.inputs:
            n = next(x for x in i.get_names() if x in ("sample", "timestep", "encoder_hidden_states")); dt = i.get_element_type().to_dtype()
            shp = {"sample": [1, 4, side // 8, side // 8], "timestep": [1], "encoder_hidden_states": [1, 77, 768]}[n]
            feeds[n] = np.full(shp, 500, dt) if n == "timestep" else np.random.default_rng(0).standard_normal(shp).astype(dt)
        r.infer(feeds); r.infer(feeds)
        models[f"{name}, {'dynamic' if static is False else 'static' if static is True else 'H/W static, batch dynamic'}"] = (r, feeds, [])
for rnd in range(5):
    for k, (r, f, ts) in models.items():
        t0 = time.perf_counter(); r.infer(f); ts.append(time.perf_counter() - t0)
for k, (r, f, ts) in models.items():
    print(f"{k:35s} median {statistics.median(ts):.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
