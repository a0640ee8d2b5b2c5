"""The exported components of a pipeline: which there are, their I/O, the PyTorch module each one is
(the wrapper that export traces and every check runs), and seeded sample inputs for them.

Export, verification, fusion's finiteness check, refit and bench all take components from here, so
the module a graph was traced from is the module it is checked against.

I/O (B batch, H x W image, h = H/8, w = W/8, D text width: 768 for SD 1.5, 2048 for SDXL):

    SD 1.5
    text_encoder    input_ids int32 [B,77]                    -> last_hidden_state float32 [B,77,D]
    unet            sample float32 [B,4,h,w], timestep float32 [B],
                    encoder_hidden_states float32 [B,77,D]    -> out_sample float32 [B,4,h,w] (noise prediction)
    vae_decoder     latent float32 [B,4,h,w] (already / scaling_factor) -> images float32 [B,3,H,W] in ~[-1,1]

    SDXL / SSD-1B (D = D1 + D2; the penultimate hidden states, as SDXL uses them)
    text_encoder    input_ids int32 [B,77]                    -> hidden_states float32 [B,77,D1]
    text_encoder_2  input_ids int32 [B,77]                    -> hidden_states float32 [B,77,D2], text_embeds float32 [B,P]
    unet            as SD 1.5, plus text_embeds float32 [B,P] (pooled) and time_ids float32 [B,6]
                    (original H, W, crop top, left, target H, W)
    vae_decoder     as SD 1.5

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import numpy as np

from ..core.shapes import LATENT_FACTOR, TEXT_LEN

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
XL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
PIPE_ATTR = {"vae_decoder": "vae"}
"""Pipeline attribute of each component (the rest are named alike)."""


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def components_for(pipe) -> tuple[str, ...]:
    return XL_COMPONENTS if is_xl(pipe) else COMPONENTS


def pipe_module(pipe, comp: str):
    """The pipeline's module behind ``comp`` (the VAE for ``vae_decoder``)."""
    return getattr(pipe, PIPE_ATTR.get(comp, comp))


def component_parameters(pipe, comp: str) -> int:
    """How many weights the exported ``comp`` holds (the VAE decoder: its decoder and post-quant convolution,
    not the encoder the graph never runs)."""
    module = pipe_module(pipe, comp)
    parts = [module.decoder, getattr(module, "post_quant_conv", None)] if comp == "vae_decoder" else [module]
    return int(sum(p.numel() for m in parts if m is not None for p in m.parameters()))


def model_dims(pipe) -> dict:
    """Widths the ONNX I/O depends on: UNet text width D, each text encoder's width, pooled width P."""
    dims = {"text_dim": int(pipe.unet.config.cross_attention_dim), "latent_channels": int(pipe.unet.config.in_channels),
            "te_dims": {"text_encoder": int(pipe.text_encoder.config.hidden_size)}, "pooled_dim": None, "xl": is_xl(pipe)}
    if dims["xl"]:
        dims["te_dims"]["text_encoder_2"] = int(pipe.text_encoder_2.config.hidden_size)
        dims["pooled_dim"] = int(pipe.text_encoder_2.config.projection_dim)
    return dims


def component_io(comp: str, dims: dict) -> dict:
    """Input/output names, dtypes and symbolic dims of one exported component (documented above)."""
    lat = ["B", dims["latent_channels"], "H/8", "W/8"]
    ids = [["input_ids", "int32", ["B", TEXT_LEN]]]
    if comp == "text_encoder" and not dims["xl"]:
        return {"inputs": ids, "outputs": [["last_hidden_state", "float32", ["B", TEXT_LEN, dims["text_dim"]]]]}
    if comp == "text_encoder":
        return {"inputs": ids, "outputs": [["hidden_states", "float32", ["B", TEXT_LEN, dims["te_dims"]["text_encoder"]]]]}
    if comp == "text_encoder_2":
        return {"inputs": ids, "outputs": [["hidden_states", "float32", ["B", TEXT_LEN, dims["te_dims"]["text_encoder_2"]]],
                                           ["text_embeds", "float32", ["B", dims["pooled_dim"]]]]}
    if comp == "unet":
        ins = [["sample", "float32", lat], ["timestep", "float32", ["B"]],
               ["encoder_hidden_states", "float32", ["B", TEXT_LEN, dims["text_dim"]]]]
        if dims["xl"]:
            ins += [["text_embeds", "float32", ["B", dims["pooled_dim"]]], ["time_ids", "float32", ["B", 6]]]
        return {"inputs": ins, "outputs": [["out_sample", "float32", lat]]}
    if comp == "vae_decoder":
        return {"inputs": [["latent", "float32", lat]], "outputs": [["images", "float32", ["B", 3, "H", "W"]]]}
    raise KeyError(comp)


def wrappers(pipe) -> dict:
    """{component: torch module} with the exported I/O: what export traces and every check runs."""
    import torch

    class TextEncoder(torch.nn.Module):
        """SD 1.5: the last hidden state. SDXL: the penultimate one (+ the pooled projection for encoder 2)."""

        def __init__(self, te, penultimate: bool, pooled: bool):
            super().__init__()
            self.te, self.penultimate, self.pooled = te, penultimate, pooled

        def forward(self, input_ids):
            out = self.te(input_ids.to(torch.int64), output_hidden_states=self.penultimate, return_dict=True)
            hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
            return (hidden, out.text_embeds) if self.pooled else hidden

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    xl = is_xl(pipe)
    out = {"text_encoder": TextEncoder(pipe.text_encoder, xl, False).eval(), "unet": UNet(pipe.unet).eval(),
           "vae_decoder": VaeDecoder(pipe.vae).eval()}
    if xl:
        out["text_encoder_2"] = TextEncoder(pipe.text_encoder_2, True, True).eval()
    return out


def text_dim(pipe) -> int:
    return int(pipe.unet.config.cross_attention_dim)


def sample_inputs(comp: str, pipe, batch: int, hw: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for one component at one shape (parity checks and tracing)."""
    rng = np.random.default_rng(seed)
    h, w = hw[0] // LATENT_FACTOR, hw[1] // LATENT_FACTOR
    c = int(pipe.unet.config.in_channels)
    if comp in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, comp)
        ids = rng.integers(0, int(te.config.vocab_size), size=(batch, TEXT_LEN), dtype=np.int32)
        ids[:, 0] = te.config.bos_token_id if te.config.bos_token_id is not None else 0
        return {"input_ids": ids}
    if comp == "unet":
        feeds = {"sample": rng.standard_normal((batch, c, h, w), dtype=np.float32),
                 "timestep": rng.integers(0, 1000, size=(batch,)).astype(np.float32),
                 "encoder_hidden_states": rng.standard_normal((batch, TEXT_LEN, text_dim(pipe)), dtype=np.float32)}
        if is_xl(pipe):
            feeds["text_embeds"] = rng.standard_normal((batch, int(pipe.text_encoder_2.config.projection_dim)), dtype=np.float32)
            feeds["time_ids"] = np.tile(np.array([hw[0], hw[1], 0, 0, hw[0], hw[1]], np.float32), (batch, 1))
        return feeds
    if comp == "vae_decoder":
        lc = int(pipe.vae.config.latent_channels)
        return {"latent": rng.standard_normal((batch, lc, h, w), dtype=np.float32)}
    raise KeyError(comp)


def decoder_probe_inputs(pipe, batch: int, hw: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """VAE decoder inputs at the scale it sees in a pipeline: latents / scaling_factor (~5.5x N(0,1) for SD 1.5)."""
    feeds = sample_inputs("vae_decoder", pipe, batch, hw, seed)
    feeds["latent"] *= 1.0 / float(pipe.vae.config.scaling_factor)  # in place: stays float32
    return feeds


def run_module(module, feeds: dict[str, np.ndarray], dtype=None) -> list[np.ndarray]:
    """Run a wrapper on numpy feeds (float inputs cast to ``dtype`` when given); every output as numpy."""
    import torch

    args = [torch.from_numpy(v) for v in feeds.values()]
    if dtype is not None:
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    with torch.no_grad():
        out = module(*args)
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
