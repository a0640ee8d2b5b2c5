"""Preparation steps of `competitors.py` for the competitors' fastest modes (issue 29), each one command:

- ``taesd OUT --source demo:taesd|FOLDER``: the tiny decoder as a diffusers AutoencoderTiny folder (config.json +
  diffusion_pytorch_model.safetensors; sd.cpp's ``taesd_path`` reads that file as it is). Project venv.
- ``taesd-ir TAESD OUT``: its decoder as an OpenVINO IR the way optimum-intel exports a ``vae_decoder``
  (input ``latent_sample`` [N, 4, H/8, W/8] dynamic, output ``sample`` in [-1, 1], fp32 weights) + a config.json.
  Project venv (torch, diffusers, openvino).
- ``swap-decoder IR TAESD_IR OUT``: a copy of an optimum-intel IR folder (every file hard-linked, so it costs no
  disk) with ``vae_decoder/`` replaced by the TAESD IR — what FastSD CPU does with optimum-intel's pipeline, and
  what a user of OpenVINO GenAI would do for speed. The decoder's config keeps the VAE's fields (GenAI and
  optimum-intel read block_out_channels, latent_channels) with ``scaling_factor`` 1.0: TAESD decodes the
  UNet's latents as they are. Standard library only.
- ``hybrid FUSED OUT --num-samples N``: optimum-intel's hybrid int8 (FastSD CPU's path): the UNet quantized
  weights and activations (NNCF, calibrated on N UNet inputs collected from the pipeline on a list of prompts:
  no dataset download), the other models int8 weights — ``OVWeightQuantizationConfig(bits=8, dataset=PROMPTS,
  quant_method="hybrid")``. optimum-intel's venv. optimum-cli's ``--dataset`` takes only hub dataset names, so
  the Python API is used.

Usage: python benchmarks/competitors_prep.py STEP ...  (competitors.py calls it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Calibration prompts for hybrid quantization (optimum-intel takes a list of strings as the dataset).
CALIBRATION_PROMPTS = [
    "a photo of an astronaut riding a horse on mars", "a cozy cabin in a snowy forest at night, warm light in the windows",
    "portrait of an old fisherman, dramatic lighting, 85mm", "a bowl of ramen on a wooden table, top view",
    "a futuristic city skyline at sunset, flying cars", "a watercolor painting of a fox in a meadow",
    "a red sports car on a mountain road, motion blur", "a cat sleeping on a stack of books",
    "an oil painting of a lighthouse in a storm", "a macro photo of a dewdrop on a leaf",
    "a medieval castle on a cliff above the sea", "a bustling street market in marrakech",
    "a minimalist living room with large windows", "a dragon flying over a volcano, fantasy art",
    "a bouquet of sunflowers in a blue vase", "a robot playing chess in a park",
    "a snowy mountain peak under the milky way", "a vintage train crossing a stone bridge",
    "a plate of sushi, studio lighting", "a child flying a kite on a beach",
]


def taesd(out: Path, source: str) -> dict:
    if source.startswith("demo:"):
        from lcm_export.sources.demo import build_demo_tiny_vae

        vae = build_demo_tiny_vae(source.split(":", 1)[1])
    else:
        from diffusers import AutoencoderTiny

        vae = AutoencoderTiny.from_pretrained(source, use_safetensors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {"source": source, "path": str(out), "bytes": (out / "diffusion_pytorch_model.safetensors").stat().st_size}


def taesd_ir(taesd_dir: Path, out: Path, vae_config: Path | None = None) -> dict:
    import openvino as ov
    import torch
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(str(taesd_dir), use_safetensors=True).eval()

    class Decode(torch.nn.Module):  # optimum-intel's vae_decoder export: decode(latent_sample).sample
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, latent_sample):
            return self.v.decode(latent_sample, return_dict=False)[0]

    c = int(vae.config.latent_channels)
    with torch.no_grad():
        m = ov.convert_model(Decode(vae), example_input=torch.randn(1, c, 32, 32),
                             input=[("latent_sample", ov.PartialShape([-1, c, -1, -1]), ov.Type.f32)])
    m.outputs[0].get_tensor().set_names({"sample"})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(m, str(tmp / "openvino_model.xml"), compress_to_fp16=False)
    cfg = json.loads(vae_config.read_text()) if vae_config else {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                                                                 "latent_channels": c, "block_out_channels": [64] * 4}
    cfg.update(scaling_factor=1.0, shift_factor=None, tiny_decoder=str(taesd_dir))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir())}


def swap_decoder(ir: Path, taesd_ir_dir: Path, out: Path) -> dict:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ir, tmp, copy_function=os.link, ignore=shutil.ignore_patterns("vae_decoder", "vae_encoder", "export.done"))
    dec = tmp / "vae_decoder"
    dec.mkdir()
    for f in ("openvino_model.xml", "openvino_model.bin"):
        os.link(taesd_ir_dir / f, dec / f)
    cfg = json.loads((ir / "vae_decoder" / "config.json").read_text())
    cfg.update(scaling_factor=1.0, shift_factor=None, tiny_decoder=json.loads((taesd_ir_dir / "config.json").read_text()).get("tiny_decoder"))
    (dec / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {"path": str(out), "from": str(ir), "decoder": str(taesd_ir_dir)}


def hybrid(fused: Path, out: Path, num_samples: int) -> dict:
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    t0 = time.perf_counter()
    q = OVWeightQuantizationConfig(bits=8, dataset=list(CALIBRATION_PROMPTS), quant_method="hybrid", num_samples=num_samples)
    pipe = OVStableDiffusionPipeline.from_pretrained(str(fused), export=True, quantization_config=q, compile=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    from optimum.exporters.openvino.__main__ import maybe_convert_tokenizers

    maybe_convert_tokenizers("diffusers", tmp, model=pipe)  # what optimum-cli adds: GenAI reads openvino_tokenizer.xml
    if not (tmp / "tokenizer" / "openvino_tokenizer.xml").is_file():
        raise SystemExit("hybrid: the OpenVINO tokenizer was not written (openvino-tokenizers missing in optimum-intel's venv?)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {"path": str(out), "num_samples": num_samples, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("taesd")
    p.add_argument("out")
    p.add_argument("--source", default="demo:taesd")
    p = sub.add_parser("taesd-ir")
    p.add_argument("taesd")
    p.add_argument("out")
    p.add_argument("--vae-config", default=None, help="the fused folder's vae/config.json (its fields, scaling_factor 1.0)")
    p = sub.add_parser("swap-decoder")
    p.add_argument("ir")
    p.add_argument("taesd_ir")
    p.add_argument("out")
    p = sub.add_parser("hybrid")
    p.add_argument("fused")
    p.add_argument("out")
    p.add_argument("--num-samples", type=int, default=200)
    a = ap.parse_args(argv)
    if a.cmd == "taesd":
        rec = taesd(Path(a.out), a.source)
    elif a.cmd == "taesd-ir":
        rec = taesd_ir(Path(a.taesd), Path(a.out), Path(a.vae_config) if a.vae_config else None)
    elif a.cmd == "swap-decoder":
        rec = swap_decoder(Path(a.ir), Path(a.taesd_ir), Path(a.out))
    else:
        rec = hybrid(Path(a.fused), Path(a.out), a.num_samples)
    print(json.dumps(rec))


if __name__ == "__main__":
    sys.exit(main())
