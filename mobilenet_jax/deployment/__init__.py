"""Deployment: the folded model exported to LiteRT (float32, int8), StableHLO and ONNX, and their runtimes."""
