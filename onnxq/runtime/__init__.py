"""Execution backends: ONNX Runtime (reference everywhere) and TensorRT (through polygraphy)."""
