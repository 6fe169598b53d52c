"""Edge engine: int8 ONNX models on ONNX Runtime. Imports no torch and no transformers."""
