"""fp16 graphs for ONNX Runtime's CUDA provider, made the way ONNX Runtime's own Stable Diffusion tooling
makes them (``onnxruntime/python/tools/transformers/models/stable_diffusion``: ``optimize_pipeline.py``,
``ort_optimizer.py``, ``diffusion_models.py``). Pure graph work: no GPU and no execution provider needed,
so it runs (and is tested) on any machine.

1. Fusion: ``onnxruntime.transformers.optimizer.optimize_model(model_type="unet" | "clip" | "vae",
   opt_level=0, use_gpu=True)`` with its ``FusionOptions`` for that model type: attention into
   ``MultiHeadAttention`` (UNet: packed QKV for self-attention, packed KV for cross-attention), GroupNorm
   and SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv, (Skip)LayerNormalization, QuickGelu. These are
   ONNX Runtime contrib ops; GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv and the packed
   attention layouts have CUDA kernels only (``CUDA_ONLY_FUSIONS``).
2. fp16: ``convert_float_to_float16(keep_io_types=True, op_block_list=FP32 ops, node_block_list=islands)``:
   weights and activations fp16, inputs and outputs fp32 (casts at the graph's edges), ONNX Runtime's own
   list of ops kept fp32 (``float16.DEFAULT_OP_BLOCK_LIST``), and the fp32 islands below.

fp32 islands (``fp32_island``): the UNet's timestep embedding, and SDXL's time-ids embedding — every node
from the ``timestep`` / ``time_ids`` input up to the first MatMul/Gemm, with the constants they read. It
computes sin/cos of t·freq for t up to 999 (sizes up to 1024); fp16 spaces numbers in [512, 1024) 0.5
apart, so in fp16 the phases would be off by up to 0.25 rad, and frequencies rounded to fp16's 11
significant bits add up to 0.5 rad more at t = 999. diffusers computes this embedding in fp32 in its fp16 pipelines too. Measured on the demo UNet
(ORT CPU, CPU-capable fusions, against PyTorch fp32 at t = 999 and 259): rel-L2 8e-4 with the island,
3.7e-3 without.

Where we differ from ONNX Runtime's tool: it converts with ``keep_io_types=False`` (fp16 inputs and
outputs); we keep fp32 I/O, because the lean runtime, the LCM step graph (``step_graph.py``) and the
device loop exchange fp32 with every engine, and the casts at the edges are a few elementwise kernels.
No ONNX Runtime graph pass is stored (their tool optionally stores one made with the CUDA provider):
the runtime applies ``ORT_ENABLE_ALL`` when it opens a session, which it must do anyway for the
fixed-shape sessions of CUDA graphs (``onnxruntime_runtime.py``). The VAE decoder stays fp32 where the
VAE overflows in fp16 (diffusers' ``force_upcast``; ONNX Runtime's tool keeps SDXL's VAE fp32 for the
same reason) — fused, not converted.

Two things in ONNX Runtime 1.32's fusion are worked around (as ``benchmarks/attention_ab.py`` does):
``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a 1-element array, which numpy >= 2.4 rejects
(nothing would fuse), so the class is swapped for one that reads the element, during the call only.

Measured on the tiny demo models (ONNX Runtime 1.32): the UNet gets MultiHeadAttention (12), GroupNorm
and SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv, SkipLayerNormalization; the VAE decoder GroupNorm,
SkipGroupNorm and NhwcConv but not its attention (the fusion matches the pre-SDPA diffusers pattern); the
CLIP text encoder SkipLayerNormalization and QuickGelu but not its attention (same reason). What each
component got is recorded in the manifest (``fused_ops``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

import numpy as np

MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_decoder": "vae"}
"""The optimizer's model type for each component (ONNX Runtime's tool maps them the same way)."""
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
"""FusionOptions whose ops (or layouts) have CUDA kernels only: off with ``cuda_fusions=False``."""
ISLAND_INPUTS = ("timestep", "time_ids")
ISLAND_END = ("MatMul", "Gemm")
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv",
             "SkipLayerNormalization", "LayerNormalization", "QuickGelu", "BiasGelu", "Gelu", "FastGelu")
"""ONNX Runtime's fused ops we count and record per component."""


def fp32_op_types() -> list[str]:
    """Op types kept fp32: ONNX Runtime's own default block list (passing a list replaces its default)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def fusion_options(model_type: str, cuda_fusions: bool = True, fp16: bool = True):
    """ONNX Runtime's FusionOptions for a Stable Diffusion model type. Without ``cuda_fusions`` the
    fusions with CUDA-only kernels are off (the graph then runs on ORT's CPU provider too); an fp32 UNet
    gets no packed QKV/KV (ORT's tool does the same: no fp32 kernels for those layouts)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    if not cuda_fusions:
        for name in CUDA_ONLY_FUSIONS:
            setattr(opts, name, False)
    if model_type == "unet" and not fp16:
        opts.enable_packed_qkv = opts.enable_packed_kv = False
    return opts


def fp32_island(model, inputs=ISLAND_INPUTS, end=ISLAND_END) -> list[str]:
    """Names of the nodes from the graph inputs ``inputs`` up to (not including) the first MatMul/Gemm on
    each path, with the Constant nodes they read: the timestep (and time-ids) sinusoidal embedding."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    island, front = [], [i for i in inputs if i in graph_inputs]
    seen: set[str] = set()
    while front:
        for node in consumers.get(front.pop(), []):
            if node.op_type in end or node.name in seen:
                continue
            seen.add(node.name)
            island.append(node.name)
            front.extend(node.output)
    by_name = {n.name: n for n in model.graph.node}
    for name in list(island):
        for i in by_name[name].input:
            p = producer.get(i)
            if p is not None and p.op_type == "Constant" and p.name not in seen:
                seen.add(p.name)
                island.append(p.name)
    return island


@contextlib.contextmanager
def _numpy2_safe_num_heads():
    """ORT 1.32's FusionAttentionUnet.get_num_heads calls int() on a 1-element array (numpy >= 2.4 raises):
    swap in a subclass that reads the element, for the duration of the fusion only."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path: its modules import each other bare)

    mod = sys.modules.get("onnx_model_unet")
    if mod is None:
        import onnx_model_unet as mod  # type: ignore[import-not-found]
    base = mod.FusionAttentionUnet

    class FusionAttentionUnetNumpy2(base):
        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            if not is_torch2:
                return super().get_num_heads(reshape_q, is_torch2)
            parent = self.model.get_parent(reshape_q, 1)
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(-1)[0]) > 0:
                return int(value.reshape(-1)[0])
            return 0

    mod.FusionAttentionUnet = FusionAttentionUnetNumpy2
    try:
        yield
    finally:
        mod.FusionAttentionUnet = base


def fused_op_counts(model) -> dict[str, int]:
    counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in FUSED_OPS}
    return {op: c for op, c in counts.items() if c}


def convert(src: Path, dst: Path, component: str, fp16: bool = True, cuda_fusions: bool = True, quiet: bool = True) -> dict:
    """Write ``src`` (the exported fp32 graph) fused for ONNX Runtime and, with ``fp16``, converted to
    fp16 (fp32 I/O, fp32 islands) to ``dst`` (weights in ``dst.data`` when over 2 GB). Returns the record
    stored in the manifest."""
    import onnx
    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    for name in ("fusion_base", "fusion_utils", "onnx_model", "float16", "symbolic_shape_infer", "shape_infer_helper"):
        logging.getLogger(name).setLevel(logging.ERROR)
    mute = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()  # its own tqdm bar
    with _numpy2_safe_num_heads(), mute:
        model = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=fusion_options(model_type, cuda_fusions, fp16), use_gpu=True,
                               only_onnxruntime=False)
        island = fp32_island(model.model) if fp16 else []
        ops = fp32_op_types()
        if fp16:
            model.convert_float_to_float16(keep_io_types=True, op_block_list=ops, node_block_list=island)
    size = model.model.ByteSize()
    external = size <= 0 or size >= onnx.checker.MAXIMUM_PROTOBUF
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=external)
    rec = {"recipe": "onnxruntime.transformers optimize_model (fusions) + convert_float_to_float16" if fp16 else
           "onnxruntime.transformers optimize_model (fusions), kept fp32",
           "model_type": model_type, "fusions": "cuda" if cuda_fusions else "cpu-capable",
           "fused_ops": fused_op_counts(model.model), "precision": "fp16" if fp16 else "fp32",
           "onnxruntime": onnxruntime.__version__}
    if fp16:
        rec.update({"keep_io_types": True, "fp32_op_types": ops, "fp32_nodes": island})
    return rec
