"""The entry as an OpenVINO GenAI model folder: what ``openvino_genai.Text2ImagePipeline(entry, "CPU")`` reads,
written beside what our runtime reads, with no second copy of any weight (the IR is the one copy).

What GenAI 2026.4 reads for a Stable Diffusion folder (src/cpp/src/image_generation/: text2image_pipeline.cpp,
stable_diffusion_pipeline.hpp, models/*.cpp), and where it comes from here:

- ``model_index.json``: ``_class_name`` picks the pipeline (``LatentConsistencyModelPipeline``: 4 steps by
  default; GenAI's class for SD 1.5 architectures with an LCM scheduler) and ``text_encoder``, ``unet``,
  ``vae`` name their classes, which must be ``CLIPTextModel``, ``UNet2DConditionModel``, ``AutoencoderKL``.
- ``<component>/openvino_model.xml`` + ``.bin``: the backend's IR (``backends/openvino.py``, ``IR_NAME``).
  GenAI sets the UNet's ``sample``, ``timestep`` (i64, shape [1]) and ``encoder_hidden_states`` by name (the
  IR takes an i64 timestep: ``GENAI_INPUT_TYPES``), the text encoder's and VAE decoder's first input and
  output by index; it scales the decoder's input by ``1/scaling_factor`` itself, as our graph expects.
- ``<component>/config.json``: the module's config at build time (GenAI reads ``sample_size``, ``in_channels``,
  ``time_cond_proj_dim`` (absent/null: classifier-free guidance when guidance_scale > 1, on a batch-2 UNet),
  ``max_position_embeddings``, ``scaling_factor``, ``shift_factor``, ``block_out_channels``, ...).
- ``tokenizer/openvino_tokenizer.xml`` (+ detokenizer): the tokenizer converted by openvino-tokenizers, i32
  ids (our text encoder takes int32; GenAI copies the tokenizer's ids into the encoder's input as its type),
  truncated at 77 tokens as ours.
- ``scheduler/scheduler_config.json``: already the entry's (LCMScheduler).

The manifest's ``genai`` section lists these files (the store's file checks cover them) or says why an entry
is not a GenAI folder. A refit changes only weights (the IR), none of these files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._util import write_json
from ..sources.tiny_vae import TINY_CLASS as TINY

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "LatentConsistencyModelPipeline"
CLASSES = {"text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
"""model_index.json's component classes GenAI's Stable Diffusion pipeline opens (anything else: it refuses)."""
# A tiny decoder (``--preset fast``, ``--vae-decoder``, class TINY): GenAI runs any decoder IR that takes latents /
# scaling_factor and gives an image in [-1, 1], as TAESD's does; its config.json is written in AutoencoderKL's shape.
TOKENIZERS_HINT = "pip install 'openvino-tokenizers==<your openvino version>' (part of lcm-export's [build] extra)"


def genai_blocker(mod, family: str, pipe, tiny_decoder: bool, adapters: bool) -> str | None:
    """Why an entry of backend module ``mod`` cannot also be a GenAI folder, or None when it can."""
    if not getattr(mod, "GENAI", False):
        return f"a {mod.NAME} entry: OpenVINO GenAI runs OpenVINO IR (build with --backend openvino)"
    if family != "sd15":
        return (f"a {family} entry: GenAI's SDXL pipeline reads every hidden state of both text encoders, and our "
                "export keeps the one SDXL uses")
    if adapters:
        return "run-time adapter branches (--adapters) add UNet and text-encoder inputs GenAI does not feed"
    have = {"text_encoder": type(pipe.text_encoder).__name__, "unet": type(pipe.unet).__name__, "vae": type(pipe.vae).__name__}
    odd = [f"{k} {v}" for k, v in have.items() if v != CLASSES[k] and not (k == "vae" and tiny_decoder and v == TINY)]
    if odd:
        return f"GenAI opens {', '.join(CLASSES.values())} only, and this model has {', '.join(odd)}"
    return None


def write_genai_layout(pipe, entry: Path, tokenizer_max_length: int) -> dict:
    """Write the GenAI-only files into ``entry`` (the IR is already there); return the manifest's ``genai``
    section: {"pipeline", "files", "openvino_tokenizers"} or, when openvino-tokenizers is missing, {"why"}."""
    try:
        import openvino as ov
        import openvino_tokenizers
        from openvino_tokenizers import convert_tokenizer
    except Exception as exc:  # noqa: BLE001 - not installed, or built for another OpenVINO (it raises on import)
        return {"why": f"openvino-tokenizers is not usable here ({type(exc).__name__}): {TOKENIZERS_HINT}"}
    import diffusers

    files = [MODEL_INDEX]
    write_json(entry / MODEL_INDEX, {
        "_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", CLASSES["text_encoder"]], "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
        "unet": ["diffusers", CLASSES["unet"]], "vae": ["diffusers", CLASSES["vae"]],
        "scheduler": ["diffusers", "LCMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False})
    for comp, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae_decoder", pipe.vae)):
        write_json(entry / comp / "config.json", _tiny_as_kl(module) if type(module).__name__ == TINY else _config(module))
        files.append(f"{comp}/config.json")
    tok, detok = convert_tokenizer(pipe.tokenizer, with_detokenizer=True, tokenizer_output_type=ov.Type.i32,
                                   truncation=True, max_length=int(tokenizer_max_length))
    for name, model in (("openvino_tokenizer", tok), ("openvino_detokenizer", detok)):
        ov.save_model(model, str(entry / "tokenizer" / f"{name}.xml"))
        files += [f"tokenizer/{name}.xml", f"tokenizer/{name}.bin"]
    return {"pipeline": PIPELINE_CLASS, "files": files, "openvino_tokenizers": openvino_tokenizers.__version__}


def _config(module) -> dict:
    """A module's full config as JSON (transformers and diffusers configs alike), with its ``_class_name``."""
    cfg = module.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps({"_class_name": type(module).__name__, **cfg}, default=list))


def _tiny_as_kl(module) -> dict:
    """A tiny decoder's config in the shape GenAI reads for its decoder (``AutoencoderKL``): ``latent_channels``,
    ``block_out_channels`` (GenAI's latent-to-image factor is 2^(len - 1): TAESD upsamples by 8, 2^3), its
    ``scaling_factor`` (1.0 for TAESD: the decoder takes the latents as they are) and no ``shift_factor`` (diffusers'
    SD 1.5 / SDXL pipelines do not apply a tiny decoder's); the decoder's own config is kept under ``tiny_decoder``."""
    own = _config(module)
    factor = int(own.get("upsampling_scaling_factor", 2)) ** (len(own.get("decoder_block_out_channels", [0] * 4)) - 1)
    ups = 1 + max(0, factor.bit_length() - 1)  # TAESD / TAESDXL: 2^3 = 8, four entries
    return {"_class_name": "AutoencoderKL", "in_channels": int(own.get("in_channels", 3)), "out_channels": int(own.get("out_channels", 3)),
            "latent_channels": int(own["latent_channels"]), "block_out_channels": [64] * ups,
            "scaling_factor": float(own.get("scaling_factor", 1.0)), "shift_factor": None, "tiny_decoder": own}
