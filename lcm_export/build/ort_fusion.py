"""Attention fusion for ONNX Runtime CPU engines (ONNX Runtime's own transformer optimizer).

The exported UNet spells each attention out (MatMul, Softmax, MatMul, reshapes and transposes).
``onnxruntime.transformers.optimizer`` with ``model_type="unet"`` rewrites the self-attentions
into ``com.microsoft.Attention`` (packed QKV weights) and the cross-attentions into
``com.microsoft.MultiHeadAttention``, whose CPU kernels skip the transposes and keep the
scores in cache-sized blocks; it also fuses residual + LayerNorm (``SkipLayerNormalization``).
Measured on the SD 1.5 UNet config, 2 cores: see benchmarks/reports/ort-attention. The fused
graph then goes through ORT's own ``ORT_ENABLE_ALL`` pass as before.

Only the CPU-capable fusions are turned on: NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu,
BiasAdd and packed-QKV/KV MultiHeadAttention are CUDA kernels. Two things in ORT 1.32 need handling here, both checked by
tests/build/test_ort_fusion.py so an ORT upgrade that changes them fails loudly:
- ``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a 1-element array, which numpy >= 2.4
  rejects, so no attention is ever fused; the fusion class is swapped for one that reads the
  element, for the duration of the call only.
- the optimizer imports its modules as top-level names (it puts its folder on ``sys.path``).

Output changes are within float rounding (rel-L2 ~1e-6 against PyTorch, checked at build like
every engine).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

FUSED_OPS = ("Attention", "MultiHeadAttention")


@contextlib.contextmanager
def _numpy2_safe_num_heads():
    import numpy as np
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path)

    unet_mod = sys.modules.get("onnx_model_unet")
    if unet_mod is None:
        import onnx_model_unet as unet_mod  # type: ignore[import-not-found]
    base = unet_mod.FusionAttentionUnet

    class FusionAttentionUnetNumpy2(base):
        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            if not is_torch2:
                return super().get_num_heads(reshape_q, is_torch2)
            parent = self.model.get_parent(reshape_q, 1)
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.shape == (1,) and int(value[0]) > 0:
                return int(value[0])
            return 0

    unet_mod.FusionAttentionUnet = FusionAttentionUnetNumpy2
    try:
        yield
    finally:
        unet_mod.FusionAttentionUnet = base


def fusion_options():
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("unet")
    for cuda_only in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                      "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(opts, cuda_only, False)
    return opts


def fuse_attention(src: Path, dst_name: str = "model.fused.onnx", quiet: bool = True) -> tuple[Path, dict[str, int]]:
    """Write ``src`` with attention fused beside it; return its path and the count of each fused op.

    The weights are never loaded as a whole: the graph is read without external data, the
    fusion reads only the Q/K/V weights it packs (from ``src``'s data file), and the fused graph
    keeps pointing at that file for every other weight; new packed weights are stored inline
    (~0.15 GB for SD 1.5, ~1.2 GB for SDXL, under protobuf's 2 GB). So the fusion costs the
    packed weights in memory, not a copy of the model (the optimizer's own loader peaks at ~14 GB
    for the SD 1.5 UNet).
    """
    import contextlib as _cl
    import io
    import logging
    import os

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    folder = src.parent.resolve()
    model = onnx.load(str(src), load_external_data=False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    mute = _cl.redirect_stderr(io.StringIO()) if quiet else _cl.nullcontext()  # its own tqdm bar
    cwd = os.getcwd()
    # the fusion reads the Q/K/V weights with onnx.numpy_helper.to_array, which resolves external
    # data against the working directory (absolute locations fail onnx's checker in shape inference)
    os.chdir(folder)
    try:
        with _numpy2_safe_num_heads(), mute:
            fused = optimize_model(model, model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=fusion_options(), use_gpu=False, only_onnxruntime=False)
    finally:
        os.chdir(cwd)
    fused.topological_sort()
    counts = {op: sum(1 for n in fused.model.graph.node if n.op_type == op) for op in FUSED_OPS}
    dst = folder / dst_name
    onnx.save(fused.model, str(dst))
    return dst, counts
