"""Small models assembled from the package's parts, for tests and chapter demonstrations."""

from llm_scratch.models.tiny import TinyDecoder, TinyDecoderConfig

__all__ = ["TinyDecoder", "TinyDecoderConfig"]
