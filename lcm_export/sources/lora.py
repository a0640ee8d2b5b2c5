"""LoRA files: formats (diffusers/PEFT, legacy diffusers, kohya, kohya SGM, LoCon), inspection without
loading them into a model (finite values, ranks, alphas, layers per component, sha256), and the
paper's default λ. safetensors only: pickle files are refused. No torch at import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .._util import sha256_file
from ..errors import UserError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DEFAULT_LCM_WEIGHT = 1.0  # the LCM-LoRA paper's λ for the acceleration vector
DEFAULT_STYLE_WEIGHT = 0.8  # and for style LoRAs (eq. 5-6)


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:WEIGHT]``."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        path, sep, tail = text.rpartition(":")
        if not sep:
            return cls(Path(text), 1.0)
        try:
            weight = float(tail)
        except ValueError:
            raise UserError(f"--lora {text}: WEIGHT {tail!r} is not a number (use PATH or PATH:WEIGHT, e.g. style.safetensors:0.8)") from None
        if not math.isfinite(weight):
            raise UserError(f"--lora {text}: WEIGHT must be a finite number")
        return cls(Path(path), weight)


@dataclass
class LoraInfo:
    """What a LoRA file holds, read without loading it into a model."""

    path: Path
    format: str
    ranks: list[int]
    n_layers: dict[str, int]
    sha256: str
    has_metadata: bool = False
    alphas: list[float] = field(default_factory=list)
    sgm: bool = False
    prefixed: bool = True  # diffusers/PEFT keys start with unet. / text_encoder.


def lora_has_bias(path: Path) -> bool:
    """Whether a LoRA file trains biases too (PEFT ``lora_B.bias``): diffusers then fuses into the bias."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return any(k.endswith(("lora_B.bias", "lora_up.bias")) for k in f.keys())


def inspect_lora(path: Path) -> LoraInfo:
    """Validate a LoRA file and detect its format; raises UserError naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise UserError(f"LoRA file {path}: not found")
    if not path.is_file():
        raise UserError(f"LoRA file {path}: not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"LoRA file {path}: pickle-based {path.suffix} files are refused (loading them can run code); convert it to .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: str(f.get_slice(k).get_dtype()) for k in keys}
            _check_dtypes_and_alphas(path, keys, shapes, dtypes)  # before any tensor is read
            alpha_of = {k: float(f.get_tensor(k).item()) for k in keys if k.endswith(".alpha")}
            alphas = list(alpha_of.values())
            bad = next((k for k in keys if not finite_tensor(f.get_tensor(k))), None)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"LoRA file {path}: not a valid safetensors file (truncated or corrupt?): {str(exc).splitlines()[0]}") from None

    if not keys:
        raise UserError(f"LoRA file {path}: holds no tensors")
    if 0.0 in alphas:  # one rule with rank 0 and all-zero up factors (below): a layer that changes nothing
        zero = next(k for k, a in alpha_of.items() if a == 0.0)
        raise UserError(f"LoRA file {path}: an alpha is 0 (e.g. {zero}), so its layer changes nothing; a LoRA layer "
                        "has a positive alpha and rank (a damaged file?)")
    if bad is not None:
        raise UserError(f"LoRA file {path}: tensor {bad} holds NaN or inf values (a diverged training run or a corrupt "
                        "file); it cannot be fused")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        sgm = any(p in k for k in keys for p in ("input_blocks", "middle_block", "output_blocks"))
        fmt = "kohya-sgm" if sgm else "kohya"
        down = [k for k in keys if k.endswith(".lora_down.weight")]
        comp = lambda k: "unet" if k.startswith("lora_unet_") else ("text_encoder_2" if k.startswith("lora_te2_") else "text_encoder")
    elif any(".lora_A." in k for k in keys):
        sgm = False
        fmt = "peft"
        down = [k for k in keys if k.endswith(".lora_A.weight")]
        comp = lambda k: k.split(".", 1)[0] if k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") else "unet"
    elif any(".lora.down." in k or ".lora_linear_layer.down." in k for k in keys):
        sgm = False
        fmt = "diffusers-legacy"
        down = [k for k in keys if k.endswith((".lora.down.weight", ".lora_linear_layer.down.weight"))]
        comp = lambda k: k.split(".", 1)[0] if k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") else "unet"
    else:
        raise UserError(f"LoRA file {path}: no LoRA weights recognised (expected diffusers/PEFT lora_A/lora_B or kohya lora_down/lora_up keys)")
    if any(len(shapes[k]) == 4 for k in down):
        fmt += "+locon"
    up_of = lambda k: k.replace("lora_down", "lora_up").replace("lora_A", "lora_B").replace(".down.", ".up.")
    n_layers: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in down:  # a layer whose up/B factor is all zero changes nothing: not counted
            if up_of(k) in keys and bool(f.get_tensor(up_of(k)).any()):
                n_layers[comp(k)] = n_layers.get(comp(k), 0) + 1
    if not n_layers:
        raise UserError(f"LoRA file {path}: every layer's up/B factor is zero (or rank 0), so it changes nothing; a "
                        "LoRA layer has a positive alpha and rank (a damaged file?)")
    return LoraInfo(
        path=path, format=fmt, ranks=sorted({shapes[k][0] for k in down}), n_layers=n_layers,
        sha256=sha256_file(path), has_metadata="lora_adapter_metadata" in meta,
        alphas=sorted(set(alphas)), sgm=sgm,
        prefixed=fmt.startswith("kohya") or all(k.split(".", 1)[0] in LORA_COMPONENTS for k in down),
    )


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""The dtypes a LoRA's factors come in (safetensors' names); an alpha may be a whole number too."""
INT_DTYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
              "U32": "uint32", "U64": "uint64"}


def _check_dtypes_and_alphas(path: Path, keys: list[str], shapes: dict, dtypes: dict) -> None:
    """One line for a tensor no LoRA holds: factors that are not floating point (int32, bool: a file of another kind,
    or a broken conversion), an alpha that is not one number (kohya: a scalar per layer)."""
    for k in keys:
        d = dtypes[k]
        if k.endswith(".alpha"):
            if d not in FLOAT_DTYPES and d not in INT_DTYPES:
                raise UserError(f"LoRA file {path}: its alpha {k} is {d.lower()}, not a number; an alpha is one float or "
                                "integer per layer (a damaged or non-LoRA file?)")
            if math.prod(shapes[k]) != 1:
                raise UserError(f"LoRA file {path}: its alpha {k} has shape {list(shapes[k])}, not one number; an alpha is "
                                "one value per layer (a damaged or non-LoRA file?)")
        elif d not in FLOAT_DTYPES:
            name = INT_DTYPES.get(d, d.lower())
            raise UserError(f"LoRA file {path}: tensor {k} is {name}; LoRA factors are floating point "
                            f"({', '.join(FLOAT_DTYPES.values())}): a damaged file, or not a LoRA")


def finite_tensor(t) -> bool:
    import torch

    return not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())
