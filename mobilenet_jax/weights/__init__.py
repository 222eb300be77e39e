"""Weights on disk and from other frameworks: model directories and train checkpoints, the layout
registry, and the PyTorch/timm and Keras converters (with the design notes' PyTorch reference)."""
