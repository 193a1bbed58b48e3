"""Training and ONNX export; the only part of the package that imports torch."""
