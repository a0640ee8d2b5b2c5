"""Engine building: shape plans (pure), ONNX Runtime and TensorRT backends, and the build chain."""
