"""One build, as stages in order: ``presets`` (build options) → ``components`` (what each exported component
is) → ``fuse`` (LoRAs into the weights) → ``export`` (torch → ONNX) → ``verify`` (every check against PyTorch)
→ ``quantize`` (int8 calibration) → ``refit`` (a weights-only update) → ``build_engine`` (the orchestrator).
Not named ``build``: tools and ignore files skip folders of that name."""
