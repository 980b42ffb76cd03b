"""Running a model: whole or layer by layer, calibration traces, checkpoints, ONNX Runtime, onnxruntime-genai."""
