"""lcm-export: LCM-LoRA fusion, ONNX export, engine building and a lean runtime.

The runtime (``lcm_export.runtime``) needs only the base install (numpy, tokenizers, Pillow,
onnxruntime); everything else needs the ``build`` extra.
"""

__version__ = "0.1.0"
