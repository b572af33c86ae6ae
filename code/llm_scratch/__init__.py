"""LLM Scratch: the parts of modern language models, built from scratch in PyTorch."""

__version__ = "0.1.0"
