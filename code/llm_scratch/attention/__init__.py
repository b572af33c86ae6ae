"""Attention mechanisms: scaled dot-product attention and its multi-head forms."""

from llm_scratch.attention.mha import MultiHeadAttention
from llm_scratch.attention.sdpa import (
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    stable_softmax,
)

__all__ = [
    "MultiHeadAttention",
    "attention_weights",
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "stable_softmax",
]
