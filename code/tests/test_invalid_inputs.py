"""Invalid arguments raise ValueError with a message naming the value, and edge cases that are valid work."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_scratch.attention import (
    GroupedQueryAttention,
    KVCache,
    MLAConfig,
    MLAKVCache,
    ModelKVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    MultiQueryAttention,
    apply_rope,
    attention_weights,
    causal_mask,
    convert_rope_weight,
    kv_cache_bytes_per_token,
    padding_mask,
    repeat_kv,
    rope_cos_sin,
    rotate_half,
    rotate_interleaved,
    scaled_dot_product_attention,
    stable_softmax,
    state_dict_to_hf,
)
from llm_scratch.attention.sdpa import check_mask
from llm_scratch.models import TinyDecoder, TinyDecoderConfig
from llm_scratch.tokenizer import EXAMPLE_SENTENCE, WordTokenizer, split_words

LAYER_CLASSES = {
    "mha": lambda: MultiHeadAttention(32, 4),
    "gqa": lambda: GroupedQueryAttention(32, 4, 2),
    "mqa": lambda: MultiQueryAttention(32, 4),
}


def small_mla_config(**overrides) -> MLAConfig:
    sizes = dict(
        d_model=16, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
    )
    return MLAConfig(**{**sizes, **overrides})


def qkv(seq_len: int = 3, key_len: int = 3, features: int = 4):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 2, seq_len, features, generator=generator)
    key = torch.randn(2, 2, key_len, features, generator=generator)
    value = torch.randn(2, 2, key_len, 5, generator=generator)
    return query, key, value


# Scaled dot-product attention: empty inputs, feature size 0, argument types.


def test_stable_softmax_empty_dim_returns_empty():
    weights = stable_softmax(torch.randn(2, 3, 0))

    assert weights.shape == (2, 3, 0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_without_keys_returns_zeros(is_causal):
    query, key, value = qkv(key_len=0)

    output = scaled_dot_product_attention(query, key, value, is_causal=is_causal)

    assert output.shape == (2, 2, 3, 5)
    assert torch.equal(output, torch.zeros(2, 2, 3, 5))
    assert torch.equal(output, F.scaled_dot_product_attention(query, key, value))


def test_attention_weights_without_keys_is_empty():
    query, key, _ = qkv(key_len=0)

    weights = attention_weights(query, key, is_causal=True)

    assert weights.shape == (2, 2, 3, 0)


def test_sdpa_without_queries_is_empty():
    query, key, value = qkv(seq_len=0)

    output = scaled_dot_product_attention(query, key, value, is_causal=True)

    assert output.shape == (2, 2, 0, 5)


def test_sdpa_zero_features_rejected():
    query, key, value = qkv(features=0)

    with pytest.raises(ValueError, match="query feature size 0 .*expected at least 1"):
        scaled_dot_product_attention(query, key, value)


def test_sdpa_zero_features_with_scale_accepted():
    query, key, value = qkv(features=0)

    output = scaled_dot_product_attention(query, key, value, scale=1.0)

    # Every score is 0, so each query averages the values.
    torch.testing.assert_close(output, value.mean(dim=-2, keepdim=True).expand_as(output))


def test_sdpa_mask_on_other_device_rejected():
    query, key, value = qkv()
    mask = torch.ones(3, 3, dtype=torch.bool, device="meta")

    with pytest.raises(ValueError, match="attn_mask is on device meta, but the query is on cpu"):
        scaled_dot_product_attention(query, key, value, attn_mask=mask)


def test_attention_weights_mask_on_other_device_rejected():
    query, key, _ = qkv()
    mask = torch.ones(3, 3, dtype=torch.bool, device="meta")

    with pytest.raises(ValueError, match="attn_mask is on device meta"):
        attention_weights(query, key, attn_mask=mask)


def test_check_mask_keeps_two_argument_form():
    check_mask(torch.ones(3, dtype=torch.bool, device="meta"), (2, 3))


def test_check_mask_same_device_accepted():
    check_mask(torch.ones(3, dtype=torch.bool), (2, 3), device="cpu")


@pytest.mark.parametrize("is_causal", ["no", 1, None])
def test_sdpa_non_bool_is_causal_rejected(is_causal):
    query, key, value = qkv()

    with pytest.raises(ValueError, match=re.escape(f"is_causal={is_causal!r} is invalid; expected True or False")):
        scaled_dot_product_attention(query, key, value, is_causal=is_causal)


def test_attention_weights_non_bool_is_causal_rejected():
    query, key, _ = qkv()

    with pytest.raises(ValueError, match="is_causal='no' is invalid"):
        attention_weights(query, key, is_causal="no")


@pytest.mark.parametrize("scale", ["0.5", math.nan, math.inf, -math.inf, True, torch.tensor(0.5)])
def test_sdpa_invalid_scale_rejected(scale):
    query, key, value = qkv()

    with pytest.raises(ValueError, match=r"scale=.* is invalid; expected a finite float"):
        scaled_dot_product_attention(query, key, value, scale=scale)


def test_attention_weights_nan_scale_rejected():
    query, key, _ = qkv()

    with pytest.raises(ValueError, match="scale=nan is invalid"):
        attention_weights(query, key, scale=math.nan)


def test_sdpa_numpy_scale_accepted():
    query, key, value = qkv()

    output = scaled_dot_product_attention(query, key, value, scale=np.float64(0.3))

    torch.testing.assert_close(output, scaled_dot_product_attention(query, key, value, scale=0.3))


@pytest.mark.parametrize("dropout_p", ["0.1", None, True])
def test_sdpa_non_numeric_dropout_rejected(dropout_p):
    query, key, value = qkv()

    with pytest.raises(ValueError, match=r"dropout_p=.* is invalid; expected a float with 0 <= dropout_p < 1"):
        scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)


def test_sdpa_nan_dropout_rejected():
    query, key, value = qkv()

    with pytest.raises(ValueError, match="dropout_p=nan is invalid"):
        scaled_dot_product_attention(query, key, value, dropout_p=math.nan)


@pytest.mark.parametrize("query_len", [2.5, True, None, "3"])
def test_causal_mask_non_int_query_len_rejected(query_len):
    with pytest.raises(ValueError, match=re.escape(f"query_len={query_len!r} is invalid; expected a positive int")):
        causal_mask(query_len, 3)


def test_causal_mask_non_int_key_len_rejected():
    with pytest.raises(ValueError, match=re.escape("key_len=3.0 is invalid; expected a positive int")):
        causal_mask(3, 3.0)


def test_causal_mask_numpy_int_accepted():
    assert torch.equal(causal_mask(np.int64(3), 3), causal_mask(3, 3))


@pytest.mark.parametrize("seq_len", [2.5, None, -1, True])
def test_padding_mask_invalid_seq_len_rejected(seq_len):
    with pytest.raises(ValueError, match=re.escape(f"seq_len={seq_len!r} is invalid; expected an int >= 0")):
        padding_mask(torch.tensor([1, 2]), seq_len)


def test_padding_mask_zero_seq_len_accepted():
    assert padding_mask(torch.tensor([0, 0]), 0).shape == (2, 1, 1, 0)


# Attention layers: input checks.


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
@pytest.mark.parametrize("is_causal", [True, False])
def test_layer_zero_length_input_rejected(kind, is_causal):
    layer = LAYER_CLASSES[kind]()

    with pytest.raises(ValueError, match=re.escape("x has shape (2, 0, 32), seq_len 0; expected at least 1 token")):
        layer(torch.randn(2, 0, 32), is_causal=is_causal)


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_layer_attention_weights_zero_length_rejected(kind):
    layer = LAYER_CLASSES[kind]()

    with pytest.raises(ValueError, match="seq_len 0; expected at least 1 token"):
        layer.attention_weights(torch.randn(2, 0, 32))


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_layer_dtype_mismatch_rejected(kind):
    layer = LAYER_CLASSES[kind]()
    x = torch.randn(2, 3, 32, dtype=torch.float64)

    with pytest.raises(
        ValueError,
        match=re.escape(
            "x has dtype torch.float64, but the layer's weights have dtype torch.float32; convert the "
            "input with x.to(torch.float32) or the module with .to(torch.float64)"
        ),
    ):
        layer(x)


def test_layer_integer_input_rejected():
    layer = MultiHeadAttention(32, 4)

    with pytest.raises(ValueError, match=re.escape("x has dtype torch.int64, but the layer's weights have dtype")):
        layer(torch.ones(2, 3, 32, dtype=torch.long))


def test_layer_dtype_mismatch_allowed_under_autocast():
    layer = MultiHeadAttention(32, 4).eval()
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)

    assert output.shape == (2, 3, 32)


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_layer_non_bool_is_causal_rejected(kind):
    layer = LAYER_CLASSES[kind]()

    with pytest.raises(ValueError, match="is_causal='no' is invalid; expected True or False"):
        layer(torch.randn(2, 3, 32), is_causal="no")


def test_layer_attention_weights_non_bool_is_causal_rejected():
    layer = MultiHeadAttention(32, 4)

    with pytest.raises(ValueError, match="is_causal='no' is invalid"):
        layer.attention_weights(torch.randn(2, 3, 32), is_causal="no")


@pytest.mark.parametrize("dropout", ["0.1", None, True])
def test_layer_non_numeric_dropout_rejected(dropout):
    with pytest.raises(ValueError, match=r"dropout=.* is invalid; expected a float with 0 <= dropout < 1"):
        MultiHeadAttention(32, 4, dropout=dropout)


def test_layer_mask_on_other_device_rejected():
    layer = MultiHeadAttention(32, 4)
    mask = torch.ones(3, dtype=torch.bool, device="meta")

    with pytest.raises(ValueError, match="attn_mask is on device meta, but the query is on cpu"):
        layer(torch.randn(2, 3, 32), attn_mask=mask, is_causal=False)


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_layer_positions_list_rejected(kind):
    layer = GroupedQueryAttention(32, 4, {"mha": 4, "gqa": 2, "mqa": 1}[kind], rope_base=10000.0)

    with pytest.raises(ValueError, match="positions must be a torch.Tensor .*got list"):
        layer(torch.randn(2, 3, 32), positions=[0, 1, 2])


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
@pytest.mark.parametrize("mask_shape", [(3,), (), (1, 3)])
def test_torch_backend_accepts_low_rank_mask(kind, mask_shape):
    layer = LAYER_CLASSES[kind]().double().eval()
    x = torch.randn(2, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, True, False]) if mask_shape != () else torch.tensor(True)
    mask = keep.reshape(mask_shape)

    explicit = layer(x, attn_mask=mask, is_causal=False)
    layer.backend = "torch"
    fused = layer(x, attn_mask=mask, is_causal=False)

    torch.testing.assert_close(fused, explicit)


@pytest.mark.parametrize("value", [True, 2.0, "4", None])
def test_layer_non_int_n_heads_rejected(value):
    with pytest.raises(ValueError, match=re.escape(f"n_heads={value!r} is invalid; expected a positive int")):
        MultiHeadAttention(64, value)


def test_layer_bool_d_model_rejected():
    with pytest.raises(ValueError, match="d_model=True is invalid; expected a positive int"):
        MultiHeadAttention(True, 1)


def test_gqa_bool_n_kv_heads_rejected():
    with pytest.raises(ValueError, match="n_kv_heads=True is invalid; expected a positive int"):
        GroupedQueryAttention(64, 4, True)


def test_layer_numpy_sizes_accepted():
    layer = GroupedQueryAttention(np.int64(64), np.int64(4), np.int32(2))

    assert (layer.d_model, layer.n_heads, layer.n_kv_heads) == (64, 4, 2)
    assert type(layer.n_heads) is int


def test_repeat_kv_bool_group_size_rejected():
    with pytest.raises(ValueError, match="group_size=True is invalid; expected a positive int"):
        repeat_kv(torch.randn(1, 2, 3, 4), True)


def test_repeat_kv_numpy_group_size_accepted():
    kv = torch.randn(1, 2, 3, 4)

    assert torch.equal(repeat_kv(kv, np.int64(2)), torch.repeat_interleave(kv, 2, dim=1))


# Key-value caches.


def test_kv_cache_crop_bool_rejected():
    cache = KVCache(1, 2, 4, 8)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))

    with pytest.raises(ValueError, match="seq_len=True is invalid; expected an int between 0 and the 3"):
        cache.crop(True)


def test_kv_cache_crop_numpy_int_accepted():
    cache = KVCache(1, 2, 4, 8)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))

    cache.crop(np.int64(2))

    assert cache.seq_len == 2
    assert type(cache.seq_len) is int


def test_kv_cache_append_zero_positions_rejected():
    cache = KVCache(1, 2, 4, 8)
    empty = torch.randn(1, 2, 0, 4)

    with pytest.raises(ValueError, match="keys and values hold 0 positions; expected at least 1"):
        cache.append(empty, empty)


def test_kv_cache_bool_size_rejected():
    with pytest.raises(ValueError, match="max_seq_len=True is invalid; expected a positive int"):
        KVCache(1, 2, 4, True)


def test_kv_cache_numpy_sizes_accepted():
    cache = KVCache(np.int64(1), np.int64(2), np.int64(4), np.int64(8))

    assert cache.max_seq_len == 8


def test_model_kv_cache_bool_layers_rejected():
    with pytest.raises(ValueError, match="n_layers=True is invalid; expected a positive int"):
        ModelKVCache(True, 1, 2, 4, 8)


def test_mla_kv_cache_odd_rope_dim_rejected():
    with pytest.raises(ValueError, match="qk_rope_head_dim=3 is odd"):
        MLAKVCache(1, 8, 3, 8)


def test_mla_kv_cache_numpy_sizes_accepted():
    cache = MLAKVCache(np.int64(1), np.int64(8), np.int64(4), np.int64(8))

    assert cache.elements_per_token == 12


@pytest.mark.parametrize("dtype", ["float32", torch.float32.itemsize, None])
def test_kv_cache_bytes_non_dtype_rejected(dtype):
    with pytest.raises(ValueError, match=re.escape(f"dtype={dtype!r} is invalid; expected a torch.dtype")):
        kv_cache_bytes_per_token(1, 2, 4, dtype)


def test_kv_cache_bytes_bool_size_rejected():
    with pytest.raises(ValueError, match="n_layers=True is invalid"):
        kv_cache_bytes_per_token(True, 2, 4, torch.float16)


def test_kv_cache_bytes_numpy_sizes_give_int():
    size = kv_cache_bytes_per_token(np.int64(2), 2, 4, torch.float16)

    assert size == 2 * 2 * 2 * 4 * 2  # key and value, layers, heads, head_dim, bytes
    assert type(size) is int


# RoPE.


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_rope_cos_sin_non_float_dtype_rejected(dtype):
    with pytest.raises(ValueError, match=re.escape(f"dtype={dtype!r} is invalid; expected a floating-point")):
        rope_cos_sin(torch.arange(3), 4, dtype=dtype)


def test_rope_cos_sin_string_dtype_rejected():
    with pytest.raises(ValueError, match="dtype='float32' is invalid"):
        rope_cos_sin(torch.arange(3), 4, dtype="float32")


@pytest.mark.parametrize("rotate", [rotate_half, rotate_interleaved])
@pytest.mark.parametrize("shape", [(3, 5), (3, 0), ()])
def test_rotate_bad_last_dim_rejected(rotate, shape):
    with pytest.raises(ValueError, match="expected a last dimension of positive even size"):
        rotate(torch.randn(shape))


@pytest.mark.parametrize("rotate", [rotate_half, rotate_interleaved])
def test_rotate_list_rejected(rotate):
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got list"):
        rotate([1.0, 2.0])


def test_apply_rope_integer_x_rejected():
    cos, sin = rope_cos_sin(torch.arange(3), 4)

    with pytest.raises(ValueError, match="x has dtype torch.int64; expected a floating-point dtype"):
        apply_rope(torch.ones(1, 1, 3, 4, dtype=torch.long), cos, sin)


def test_apply_rope_list_x_rejected():
    cos, sin = rope_cos_sin(torch.arange(3), 4)

    with pytest.raises(ValueError, match="x must be a torch.Tensor .*got list"):
        apply_rope([[[[0.0] * 4] * 3]], cos, sin)


@pytest.mark.parametrize("name", ["cos", "sin"])
def test_apply_rope_list_table_rejected(name):
    tables = dict(zip(("cos", "sin"), rope_cos_sin(torch.arange(3), 4)))
    tables[name] = tables[name].tolist()

    with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor from rope_cos_sin, got list"):
        apply_rope(torch.randn(1, 1, 3, 4), tables["cos"], tables["sin"])


def test_apply_rope_integer_table_rejected():
    cos, sin = rope_cos_sin(torch.arange(3), 4)

    with pytest.raises(ValueError, match="cos has dtype torch.int64; expected a floating-point dtype"):
        apply_rope(torch.randn(1, 1, 3, 4), cos.long(), sin)


def test_convert_rope_weight_list_rejected():
    with pytest.raises(ValueError, match="weight must be a torch.Tensor, got list"):
        convert_rope_weight([[1.0] * 4] * 4, 4)


# Tokenizer.


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer.from_texts([EXAMPLE_SENTENCE])


def test_encode_batch_single_string_rejected(tokenizer):
    with pytest.raises(ValueError, match="texts must be a list of strings, got str; wrap a single text in a list"):
        tokenizer.encode_batch("the cat")


def test_encode_batch_non_iterable_rejected(tokenizer):
    with pytest.raises(ValueError, match="texts must be a list of strings, got int"):
        tokenizer.encode_batch(5)


def test_encode_batch_tuple_and_generator_accepted(tokenizer):
    _, tuple_lengths = tokenizer.encode_batch(("the cat", "the"))
    _, generator_lengths = tokenizer.encode_batch(text for text in ["the cat", "the"])

    assert tuple_lengths.tolist() == [2, 1]
    assert generator_lengths.tolist() == [2, 1]


def test_decode_string_rejected(tokenizer):
    with pytest.raises(ValueError, match="ids must be a sequence of int token ids, got str '23'"):
        tokenizer.decode("23")


@pytest.mark.parametrize("index", [2.9, "2", True, torch.tensor(2.0), torch.tensor([2, 3])])
def test_decode_non_integer_id_rejected(tokenizer, index):
    with pytest.raises(ValueError, match=r"token id .* is invalid; expected an int"):
        tokenizer.decode([index])


def test_decode_tensor_and_numpy_ids_accepted(tokenizer):
    ids = tokenizer.encode("the cat sat")

    assert tokenizer.decode(torch.tensor(ids)) == "the cat sat"
    assert tokenizer.decode(np.array(ids)) == "the cat sat"


@pytest.mark.parametrize("vocab", [None, "<pad><unk>", 5])
def test_tokenizer_non_sequence_vocab_rejected(vocab):
    with pytest.raises(ValueError, match=f"vocab must be a list of token strings .*got {type(vocab).__name__}"):
        WordTokenizer(vocab)


def test_tokenizer_non_str_token_rejected():
    with pytest.raises(ValueError, match="vocab contains 3 of type int; expected str tokens"):
        WordTokenizer(["<pad>", "<unk>", 3])


def test_tokenizer_tuple_vocab_accepted():
    tokenizer = WordTokenizer(("<pad>", "<unk>", "cat"))

    assert tokenizer.vocab == ["<pad>", "<unk>", "cat"]
    assert tokenizer.encode("cat dog") == [2, 1]


@pytest.mark.parametrize("text", [None, 5, b""])
def test_encode_non_str_rejected(tokenizer, text):
    with pytest.raises(ValueError, match=f"text must be a str, got {type(text).__name__}"):
        tokenizer.encode(text)


def test_tokenize_non_str_rejected(tokenizer):
    with pytest.raises(ValueError, match="text must be a str, got NoneType"):
        tokenizer.tokenize(None)


def test_from_texts_non_str_text_rejected():
    with pytest.raises(ValueError, match="text must be a str, got int"):
        WordTokenizer.from_texts(["the cat", 5])


def test_split_words_keeps_unicode_words():
    assert split_words("Café naïve, Ünïcode 東京") == ["café", "naïve", ",", "ünïcode", "東京"]


def test_split_words_ascii_unchanged():
    assert split_words("Don't re-use x_y #1!") == ["don't", "re", "-", "use", "x", "_", "y", "#", "1", "!"]


# Multi-head latent attention.


def test_state_dict_to_hf_missing_keys_rejected():
    config = small_mla_config()

    with pytest.raises(ValueError, match=r"state_dict is missing the MultiHeadLatentAttention weights \['q_nope"):
        state_dict_to_hf({}, config)


def test_state_dict_to_hf_lists_only_missing_keys():
    config = small_mla_config()
    state = MultiHeadLatentAttention(config).state_dict()
    del state["kv_norm.weight"]

    with pytest.raises(ValueError, match=re.escape("weights ['kv_norm.weight']")):
        state_dict_to_hf(state, config)


def test_state_dict_to_hf_non_mapping_rejected():
    with pytest.raises(ValueError, match="state_dict must be a mapping of names to tensors, got list"):
        state_dict_to_hf([], small_mla_config())


def test_from_hf_config_missing_attribute_rejected():
    with pytest.raises(ValueError, match="hf_config of type object is missing the attributes hidden_size"):
        MLAConfig.from_hf_config(object())


def test_mla_config_numpy_sizes_stored_as_int():
    config = small_mla_config(d_model=np.int64(16), q_lora_rank=np.int64(8))

    assert type(config.d_model) is int
    assert type(config.q_lora_rank) is int


def test_mla_config_bool_size_rejected():
    with pytest.raises(ValueError, match="n_heads=True is invalid; expected a positive int"):
        small_mla_config(n_heads=True)


def test_mla_positions_list_rejected():
    mla = MultiHeadLatentAttention(small_mla_config())

    with pytest.raises(ValueError, match="positions must be a torch.Tensor .*got list"):
        mla(torch.randn(1, 2, 16), positions=[0, 1])


@pytest.mark.parametrize("absorb", ["yes", 1, None])
def test_mla_non_bool_absorb_rejected(absorb):
    mla = MultiHeadLatentAttention(small_mla_config())

    with pytest.raises(ValueError, match=re.escape(f"absorb={absorb!r} is invalid; expected True or False")):
        mla(torch.randn(1, 2, 16), absorb=absorb)


def test_mla_non_bool_is_causal_rejected():
    mla = MultiHeadLatentAttention(small_mla_config())

    with pytest.raises(ValueError, match="is_causal='no' is invalid"):
        mla(torch.randn(1, 2, 16), is_causal="no")


@pytest.mark.parametrize("absorb", [False, True])
def test_mla_zero_length_input_rejected(absorb):
    mla = MultiHeadLatentAttention(small_mla_config())

    with pytest.raises(ValueError, match=re.escape("x has shape (1, 0, 16), seq_len 0; expected at least 1 token")):
        mla(torch.randn(1, 0, 16), absorb=absorb)


def test_mla_dtype_mismatch_rejected():
    mla = MultiHeadLatentAttention(small_mla_config())

    with pytest.raises(ValueError, match=re.escape("x has dtype torch.float64, but the layer's weights have dtype")):
        mla(torch.randn(1, 2, 16, dtype=torch.float64))


def test_mla_mask_on_other_device_rejected():
    mla = MultiHeadLatentAttention(small_mla_config())
    mask = torch.ones(2, dtype=torch.bool, device="meta")

    with pytest.raises(ValueError, match="attn_mask is on device meta"):
        mla(torch.randn(1, 2, 16), attn_mask=mask, is_causal=False)


# Tiny decoder.


@pytest.fixture
def tiny_model() -> TinyDecoder:
    return TinyDecoder(TinyDecoderConfig()).eval()


def test_tiny_empty_tokens_rejected(tiny_model):
    with pytest.raises(ValueError, match=re.escape("tokens has shape (1, 0), seq_len 0; expected at least 1 token")):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))


def test_tiny_one_dimensional_tokens_rejected(tiny_model):
    with pytest.raises(ValueError, match=re.escape("tokens has shape (3,); expected (batch, seq_len)")):
        tiny_model(torch.zeros(3, dtype=torch.long))


def test_tiny_list_tokens_rejected(tiny_model):
    with pytest.raises(ValueError, match="tokens must be a torch.Tensor of token ids, got list"):
        tiny_model([[1, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_tiny_non_integer_tokens_rejected(tiny_model, dtype):
    with pytest.raises(ValueError, match=re.escape(f"tokens has dtype {dtype}; expected an integer dtype")):
        tiny_model(torch.zeros(1, 3, dtype=dtype))


@pytest.mark.parametrize("bad_id", [-1, 97])
def test_tiny_out_of_vocab_tokens_rejected(tiny_model, bad_id):
    tokens = torch.tensor([[0, bad_id, 1]])

    with pytest.raises(ValueError, match=r"tokens contains ids from .*; expected ids in \[0, vocab_size=97\)"):
        tiny_model(tokens)


def test_tiny_generate_one_dimensional_prompt_rejected(tiny_model):
    with pytest.raises(ValueError, match=re.escape("prompt has shape (3,); expected (batch, seq_len)")):
        tiny_model.generate(torch.zeros(3, dtype=torch.long), 2)


def test_tiny_generate_bool_max_new_tokens_rejected(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens=True is invalid; expected an int >= 0"):
        tiny_model.generate(torch.zeros(1, 2, dtype=torch.long), True)


def test_tiny_generate_numpy_max_new_tokens_accepted(tiny_model):
    tokens = tiny_model.generate(torch.zeros(1, 2, dtype=torch.long), np.int64(3))

    assert tokens.shape == (1, 5)


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"])
def test_tiny_config_bool_field_rejected(field):
    with pytest.raises(ValueError, match=f"{field}=True is invalid; expected a positive int"):
        TinyDecoderConfig(**{field: True})


def test_tiny_config_numpy_field_stored_as_int():
    config = TinyDecoderConfig(vocab_size=np.int64(50))

    assert type(config.vocab_size) is int


@pytest.mark.parametrize("built_for, applied_as", [("interleaved", "split_halves"), ("split_halves", "interleaved")])
def test_apply_rope_rejects_tables_of_other_layout(built_for, applied_as):
    from llm_scratch.attention import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(3), 8, 1e4, layout=built_for)
    with pytest.raises(ValueError, match=f"cos does not pair its features as layout='{applied_as}'"):
        apply_rope(torch.randn(1, 2, 3, 8), cos, sin, layout=applied_as)


@pytest.mark.parametrize("base", [0.5, 1.0])
def test_rope_frequencies_rejects_base_not_above_one(base):
    from llm_scratch.attention import rope_frequencies

    with pytest.raises(ValueError, match=f"base={base} is invalid; expected a number greater than 1"):
        rope_frequencies(8, base)


def test_tokenizer_duplicate_message_names_token():
    from llm_scratch.tokenizer import WordTokenizer

    with pytest.raises(ValueError, match=r"vocab contains duplicate tokens \['a'\]"):
        WordTokenizer(["<pad>", "<unk>", "a", "a"])


def test_apply_rope_accepts_meta_tables():
    from llm_scratch.attention import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(3), 8, 1e4)
    x = torch.empty(1, 2, 3, 8, device="meta")

    rotated = apply_rope(x, cos.to("meta"), sin.to("meta"))

    assert rotated.shape == (1, 2, 3, 8)
