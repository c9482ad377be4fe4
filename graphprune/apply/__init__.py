"""Apply a plan to a model (PyTorch; ONNX comes later)."""
