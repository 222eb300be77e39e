"""Compression: AMC-style channel pruning by channel groups, and knowledge distillation."""
