"""Attention mechanisms and the key-value cache for decoding.

Scaled dot-product attention, its multi-head, grouped-query and multi-query
layers, rotary position embeddings, DeepSeek-V2's multi-head latent attention,
and the caches that store keys and values between decoding steps.
"""

from llm_scratch.attention.base import repeat_kv
from llm_scratch.attention.gqa import GroupedQueryAttention, MultiQueryAttention
from llm_scratch.attention.kv_cache import KVCache, ModelKVCache, kv_cache_bytes_per_token
from llm_scratch.attention.mha import MultiHeadAttention
from llm_scratch.attention.mla import (
    MLAKVCache,
    MultiHeadLatentAttention,
    state_dict_from_hf,
    state_dict_to_hf,
)
from llm_scratch.attention.mla_config import MLAConfig, kv_cache_elements_per_token
from llm_scratch.attention.rope import (
    apply_rope,
    convert_rope_weight,
    rope_cos_sin,
    rope_frequencies,
    rope_permutation,
    rotate_half,
    rotate_interleaved,
)
from llm_scratch.attention.sdpa import (
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    stable_softmax,
)

__all__ = [
    "GroupedQueryAttention",
    "KVCache",
    "MLAConfig",
    "MLAKVCache",
    "ModelKVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "MultiQueryAttention",
    "apply_rope",
    "attention_weights",
    "causal_mask",
    "convert_rope_weight",
    "kv_cache_bytes_per_token",
    "kv_cache_elements_per_token",
    "padding_mask",
    "repeat_kv",
    "rope_cos_sin",
    "rope_frequencies",
    "rope_permutation",
    "rotate_half",
    "rotate_interleaved",
    "scaled_dot_product_attention",
    "stable_softmax",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
