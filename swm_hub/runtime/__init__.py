"""Running a model: whole or one layer at a time, tracing calibration, loading and saving checkpoints,
ONNX Runtime and onnxruntime-genai."""
