"""What the backends, the runtime and the build agree on, below all of them: shape plans (``shapes``),
the LCM step as an ONNX graph (``step_graph``), weight maps and ONNX weight patching (``onnx_weights``).
numpy, onnx (lazily) and the standard library only: the lean runtime imports this package."""
