"""The LCM step as a small ONNX graph, so that a GPU engine can run it next to the UNet and the
latents never leave the device between steps (TensorRT builds it like any other graph).

One call of the graph is one step of ``runtime/scheduler.py``'s ``LCMScheduler.step``, with the
classifier-free-guidance combine before it and the VAE decoder's input affine after it:

    eps      = model_output                                  (cfg: uncond + g·(cond − uncond))
    x̂_0      = min(max((k_s·sample − k_e·eps) / k_d, lo), hi)   (prediction type, clipping)
    denoised = c_out·x̂_0 + c_skip·sample
    prev     = √ᾱ_prev·denoised + √(1−ᾱ_prev)·noise          (last step: 1·denoised + 0·0)
    next_sample = prev, or [prev, prev] with cfg (the UNet's next input)
    latent   = denoised / div · mul + add                     (the VAE decoder's input)
    nonfinite = max(nonfinite_in, steps_left if model_output holds NaN/inf else 0)

``nonfinite`` carries across steps (the loop feeds each step's flag to the next), so one 4-byte copy
after the last step says whether the UNet ever produced NaN/inf — which the clipping and the
boundary scalings could otherwise hide in a finite latent — and at which step first: ``steps_left``
is n − i at step i of n, so the first bad step is n − flag (0-based).

Every per-step number arrives in ``coef`` (``LCMScheduler.step_coefficients``) and the VAE affine in
``vae_affine`` [3, C, 1, 1] (``runtime/device_loop.py``'s ``decoder_affine``), so one graph serves every model, step count and
size. The operations and their order are the numpy scheduler's, so in fp32 the results agree to the
last bit on CPU (``tests/test_step_graph.py`` runs the graph in ONNX Runtime against the numpy
scheduler and against diffusers' ``LCMScheduler``).
"""

from __future__ import annotations

import numpy as np

COEF = ("k_sample", "k_eps", "k_div", "clip_lo", "clip_hi", "c_out", "c_skip", "sqrt_alpha_prev", "sqrt_beta_prev",
        "guidance", "steps_left")
"""The layout of the ``coef`` input (float32 [len(COEF)])."""
INPUTS = ("sample", "model_output", "noise", "coef", "vae_affine", "nonfinite_in")
OUTPUTS = ("next_sample", "latent", "nonfinite")
OPSET = 17


def lcm_step_onnx(cfg: bool):
    """The step graph (``onnx.ModelProto``, fp32, dynamic batch and size). ``cfg``: ``model_output``
    holds [uncond; cond] (2B rows) and ``next_sample`` is [prev; prev], the next UNet batch."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, ins, [out], name=out, **attrs))
        return out

    coef = {}
    for i, name in enumerate(COEF):
        coef[name] = op("Gather", ["coef", const(f"i_{name}", np.int64(i))], name, axis=0)  # rank-0 scalars
    vae = [op("Gather", ["vae_affine", const(f"i_vae{i}", np.int64(i))], f"vae_{n}", axis=0)
           for i, n in enumerate(("div", "mul", "add"))]

    eps = "model_output"
    if cfg:  # diffusers: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        nodes.append(helper.make_node("Split", ["model_output"], ["eps_uncond", "eps_cond"], name="split", axis=0))
        diff = op("Sub", ["eps_cond", "eps_uncond"], "eps_diff")
        eps = op("Add", ["eps_uncond", op("Mul", [coef["guidance"], diff], "eps_guided")], "eps")
    # x̂_0 from the model's parameterization, then optional clipping (±inf when off)
    num = op("Sub", [op("Mul", [coef["k_sample"], "sample"], "ks_x"), op("Mul", [coef["k_eps"], eps], "ke_eps")], "x0_num")
    x0 = op("Div", [num, coef["k_div"]], "x0_raw")
    x0 = op("Min", [op("Max", [x0, coef["clip_lo"]], "x0_lo"), coef["clip_hi"]], "x0")
    # f(x_t, t) = c_out·x̂_0 + c_skip·x_t
    denoised = op("Add", [op("Mul", [coef["c_out"], x0], "cout_x0"), op("Mul", [coef["c_skip"], "sample"], "cskip_x")],
                  "denoised")
    # re-noise to the next timestep
    prev = op("Add", [op("Mul", [coef["sqrt_alpha_prev"], denoised], "sa_d"), op("Mul", [coef["sqrt_beta_prev"], "noise"], "sb_n")],
              "prev")
    if cfg:
        nodes.append(helper.make_node("Concat", [prev, prev], ["next_sample"], name="next_sample", axis=0))
    else:
        nodes.append(helper.make_node("Identity", [prev], ["next_sample"], name="next_sample"))
    scaled = op("Mul", [op("Div", [denoised, vae[0]], "d_div"), vae[1]], "d_mul")
    nodes.append(helper.make_node("Add", [scaled, vae[2]], ["latent"], name="latent"))
    # NaN/inf anywhere in the UNet's output (both halves with cfg), carried over from earlier steps
    bad = op("Or", [op("IsNaN", ["model_output"], "is_nan"), op("IsInf", ["model_output"], "is_inf")], "is_bad")
    worst = op("ReduceMax", [op("Cast", [bad], "bad_f", to=TensorProto.FLOAT)], "bad_any", keepdims=0)
    worst = op("Mul", [worst, coef["steps_left"]], "bad_at")
    nodes.append(helper.make_node("Max", ["nonfinite_in", worst], ["nonfinite"], name="nonfinite"))

    f32 = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("sample", f32, ["B", "C", "H", "W"]),
           helper.make_tensor_value_info("model_output", f32, ["N", "C", "H", "W"]),
           helper.make_tensor_value_info("noise", f32, ["B", "C", "H", "W"]),
           helper.make_tensor_value_info("coef", f32, [len(COEF)]),
           helper.make_tensor_value_info("vae_affine", f32, [3, "C", 1, 1]),
           helper.make_tensor_value_info("nonfinite_in", f32, [1])]
    outs = [helper.make_tensor_value_info("next_sample", f32, ["N", "C", "H", "W"]),
            helper.make_tensor_value_info("latent", f32, ["B", "C", "H", "W"]),
            helper.make_tensor_value_info("nonfinite", f32, [1])]
    graph = helper.make_graph(nodes, "lcm_step_cfg" if cfg else "lcm_step", ins, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lcm-export")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_lcm_step_onnx(path, cfg: bool):
    """Save the step graph to ``path`` (temp file, then rename) and return the path."""
    import os

    import onnx

    tmp = f"{path}.tmp"
    onnx.save_model(lcm_step_onnx(cfg), tmp)
    os.replace(tmp, path)
    return path
