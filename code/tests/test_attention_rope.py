"""RoPE inside MultiHeadAttention, GroupedQueryAttention and MultiQueryAttention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from llm_scratch.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    apply_rope,
    attention_weights,
    convert_rope_weight,
    repeat_kv,
    rope_cos_sin,
)

BACKENDS = ["explicit", "torch"]
LAYOUTS = ["split_halves", "interleaved"]
TIGHT = dict(atol=1e-12, rtol=1e-10)
# LlamaAttention (transformers 5.25.0) builds its RoPE tables and its softmax in
# float32 even for float64 inputs, so float64 outputs agree to float32 precision.
HF_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
# d_model, n_heads, n_kv_heads: head_dim 4, groups of 3 query heads.
SIZES = (24, 6, 2)


def inputs(batch, seq_len, d_model=SIZES[0], seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, d_model, dtype=torch.float64, generator=generator)


def make_layer(sizes=SIZES, *, bias=True, seed=0, **kwargs):
    """Build a float64 GroupedQueryAttention with non-zero biases, so a misplaced bias shows."""
    torch.manual_seed(seed)
    layer = GroupedQueryAttention(*sizes, bias=bias, **kwargs).double().eval()
    if bias:
        for projection in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            nn.init.normal_(projection.bias)
    return layer


def split_heads(projected, n_heads):
    batch, seq_len, features = projected.shape
    # (B, T, n_heads * head_dim) -> (B, n_heads, T, head_dim)
    return projected.view(batch, seq_len, n_heads, features // n_heads).transpose(1, 2)


def rotated_projections(layer, x, positions):
    """Return the rotated queries and keys and the values, computed outside the layer."""
    query = split_heads(layer.q_proj(x), layer.n_heads)
    key = split_heads(layer.k_proj(x), layer.n_kv_heads)
    value = split_heads(layer.v_proj(x), layer.n_kv_heads)
    cos, sin = rope_cos_sin(
        positions, layer.head_dim, layer.rope_base, layout=layer.rope_layout, dtype=x.dtype
    )
    query = apply_rope(query, cos, sin, layout=layer.rope_layout)
    key = apply_rope(key, cos, sin, layout=layer.rope_layout)
    return query, key, value


def reference_forward(layer, x, positions, is_causal=True):
    """Compute the layer's output from its projections, apply_rope and PyTorch's attention."""
    query, key, value = rotated_projections(layer, x, positions)
    attended = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=True)
    # (B, n_heads, T, head_dim) -> (B, T, d_model)
    return layer.o_proj(attended.transpose(1, 2).flatten(2))


def additive_causal_mask(seq_len):
    """Hugging Face's additive causal mask, (1, 1, seq_len, seq_len)."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = torch.zeros(seq_len, seq_len, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_layer_matches_reference(backend, layout, is_causal):
    layer = make_layer(rope_base=10000.0, rope_layout=layout, backend=backend)
    x = inputs(2, 9)

    with torch.no_grad():
        actual = layer(x, is_causal=is_causal)
        expected = reference_forward(layer, x, torch.arange(9), is_causal=is_causal)

    torch.testing.assert_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_rope_layer_matches_llama_attention(rope_theta):
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = LlamaAttention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)
    ours = GroupedQueryAttention(32, 4, 2, bias=True, rope_base=rope_theta).double().eval()
    ours.load_state_dict(reference.state_dict())
    x = inputs(2, 7, d_model=32)
    # A different run of positions per sequence, as in a batch with left padding.
    position_ids = torch.stack((torch.arange(7), torch.arange(30, 37)))

    position_embeddings = LlamaRotaryEmbedding(config)(x, position_ids)
    with torch.no_grad():
        expected, _ = reference(
            x, position_embeddings=position_embeddings, attention_mask=additive_causal_mask(7)
        )
        actual = ours(x, positions=position_ids)

    torch.testing.assert_close(actual, expected, **HF_TOLERANCE)


@pytest.mark.parametrize("chunks", [(6, 1, 1, 1), (4, 3, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_continues_positions(backend, layout, chunks):
    layer = make_layer(rope_base=10000.0, rope_layout=layout, backend=backend)
    x = inputs(2, sum(chunks))
    cache = layer.make_kv_cache(batch=2, max_seq_len=sum(chunks))

    with torch.no_grad():
        full = layer(x)
        pieces, start = [], 0
        for length in chunks:
            pieces.append(layer(x[:, start : start + length], kv_cache=cache))
            start += length
        _, expected_keys, _ = rotated_projections(layer, x, torch.arange(sum(chunks)))

    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TIGHT)
    torch.testing.assert_close(cache.keys, expected_keys, **TIGHT)


def test_positions_restarting_at_zero_change_decoding():
    layer = make_layer(rope_base=10000.0)
    x = inputs(1, 8)
    cache = layer.make_kv_cache(batch=1, max_seq_len=8)

    with torch.no_grad():
        full = layer(x)
        layer(x[:, :7], kv_cache=cache)
        restarted = layer(x[:, 7:], kv_cache=cache, positions=torch.tensor([0]))

    assert not torch.allclose(restarted, full[:, 7:])


def test_position_zero_equals_layer_without_rope():
    layer = make_layer(rope_base=10000.0)
    plain = make_layer()
    plain.load_state_dict(layer.state_dict())
    x = inputs(2, 6)

    with torch.no_grad():
        actual = layer(x, positions=torch.zeros(6, dtype=torch.long))

    torch.testing.assert_close(actual, plain(x), **TIGHT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shifted_positions_leave_output_unchanged(layout):
    layer = make_layer(rope_base=10000.0, rope_layout=layout)
    x = inputs(2, 9)

    with torch.no_grad():
        shifted = layer(x, positions=torch.arange(100, 109))

    torch.testing.assert_close(shifted, layer(x), **TIGHT)


def test_rope_breaks_permutation_equivariance():
    layer = make_layer(rope_base=10000.0)
    plain = make_layer()
    plain.load_state_dict(layer.state_dict())
    x = inputs(1, 7)
    order = [6, 2, 0, 5, 1, 4, 3]

    with torch.no_grad():
        plain_permuted = plain(x[:, order], is_causal=False)
        rope_permuted = layer(x[:, order], is_causal=False)

        torch.testing.assert_close(plain_permuted, plain(x, is_causal=False)[:, order], **TIGHT)
        assert not torch.allclose(rope_permuted, layer(x, is_causal=False)[:, order])


def test_layouts_agree_after_converting_weights():
    halves = make_layer(rope_base=10000.0, rope_layout="split_halves")
    interleaved = make_layer(rope_base=10000.0, rope_layout="interleaved")
    state = halves.state_dict()
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"):
        state[name] = convert_rope_weight(
            state[name], halves.head_dim, source="split_halves", target="interleaved"
        )
    interleaved.load_state_dict(state)
    x = inputs(2, 9)

    with torch.no_grad():
        torch.testing.assert_close(interleaved(x), halves(x), **TIGHT)
        assert not torch.allclose(make_layer(rope_base=10000.0, rope_layout="interleaved")(x), halves(x))


def test_attention_weights_apply_rope():
    layer = make_layer(rope_base=10000.0)
    x = inputs(2, 8)

    weights = layer.attention_weights(x)
    with torch.no_grad():
        query, key, _ = rotated_projections(layer, x, torch.arange(8))
        expected = attention_weights(query, repeat_kv(key, layer.group_size), is_causal=True)

    torch.testing.assert_close(weights, expected, **TIGHT)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, layer.n_heads, 8, dtype=torch.float64))


def test_attention_weights_take_positions():
    layer = make_layer(rope_base=10000.0)
    x = inputs(2, 5)
    positions = torch.stack((torch.arange(5), torch.arange(20, 25)))

    weights = layer.attention_weights(x, positions=positions)
    with torch.no_grad():
        query, key, _ = rotated_projections(layer, x, positions)
        expected = attention_weights(query, repeat_kv(key, layer.group_size), is_causal=True)

    torch.testing.assert_close(weights, expected, **TIGHT)


def test_float32_layer_keeps_far_positions_exact():
    # head_dim 16, so several frequencies are not exact in float32. An angle
    # of a million radians computed in float32 would be off by up to 0.03.
    sizes = (32, 2, 1)
    layer = make_layer(sizes, rope_base=10000.0)
    layer32 = make_layer(sizes, rope_base=10000.0).float()
    layer32.load_state_dict({name: tensor.float() for name, tensor in layer.state_dict().items()})
    x = inputs(2, 6, d_model=32)
    far = torch.arange(1_000_000, 1_000_006)

    with torch.no_grad():
        expected = layer(x, positions=far)
        actual = layer32(x.float(), positions=far)

    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4)


def test_mha_and_mqa_accept_rope():
    x = inputs(2, 7)
    mha = MultiHeadAttention(24, 6, rope_base=500000.0, rope_layout="interleaved").double().eval()
    gqa_all_heads = make_layer((24, 6, 6), bias=False, rope_base=500000.0, rope_layout="interleaved")
    gqa_all_heads.load_state_dict(mha.state_dict())
    mqa = MultiQueryAttention(24, 6, rope_base=500000.0).double().eval()
    gqa_one_head = make_layer((24, 6, 1), bias=False, rope_base=500000.0)
    gqa_one_head.load_state_dict(mqa.state_dict())

    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa_all_heads(x), **TIGHT)
        torch.testing.assert_close(mqa(x), gqa_one_head(x), **TIGHT)


def test_from_mha_copies_rope_settings():
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 6, rope_base=500000.0, rope_layout="interleaved").double().eval()
    x = inputs(2, 7)

    same = GroupedQueryAttention.from_mha(mha, 6)
    pooled = GroupedQueryAttention.from_mha(mha, 2)
    single = MultiQueryAttention.from_mha(mha)

    for converted in (same, pooled, single):
        assert converted.rope_base == 500000.0
        assert converted.rope_layout == "interleaved"
    with torch.no_grad():
        torch.testing.assert_close(same(x), mha(x), **TIGHT)


def test_repr_names_rope_settings():
    assert "rope_base=10000, rope_layout='split_halves'" in repr(make_layer(rope_base=10000.0))
    assert "rope_base=500000, rope_layout='interleaved'" in repr(
        MultiHeadAttention(24, 6, rope_base=500000.0, rope_layout="interleaved")
    )
    assert "rope" not in repr(make_layer())


def test_odd_head_dim_allowed_without_rope():
    layer = GroupedQueryAttention(20, 4, 2)

    assert layer.head_dim == 5
    assert layer.rope_base is None


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim = d_model / n_heads = 5 is odd"):
        GroupedQueryAttention(20, 4, 2, rope_base=10000.0)


@pytest.mark.parametrize("rope_base", [0.0, -10000.0, float("inf"), float("nan"), "10000"])
def test_rope_rejects_invalid_base(rope_base):
    with pytest.raises(ValueError, match="base="):
        GroupedQueryAttention(*SIZES, rope_base=rope_base)


def test_rope_rejects_unknown_layout():
    with pytest.raises(ValueError, match="rope_layout='gptj'"):
        GroupedQueryAttention(*SIZES, rope_base=10000.0, rope_layout="gptj")


def test_positions_without_rope_rejected():
    layer = make_layer()

    with pytest.raises(ValueError, match="no RoPE"):
        layer(inputs(2, 5), positions=torch.arange(5))
    with pytest.raises(ValueError, match="no RoPE"):
        layer.attention_weights(inputs(2, 5), positions=torch.arange(5))


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 5, 1)])
def test_positions_of_wrong_shape_rejected(shape):
    layer = make_layer(rope_base=10000.0)

    with pytest.raises(ValueError, match="positions has shape"):
        layer(inputs(2, 5), positions=torch.zeros(shape, dtype=torch.long))


def test_invalid_positions_leave_cache_unchanged():
    layer = make_layer(rope_base=10000.0)
    x = inputs(2, 6)
    cache = layer.make_kv_cache(batch=2, max_seq_len=6)
    with torch.no_grad():
        layer(x[:, :4], kv_cache=cache)
    keys_before = cache.keys.clone()

    with pytest.raises(ValueError, match="positions has shape"):
        layer(x[:, 4:], kv_cache=cache, positions=torch.arange(3))

    assert cache.seq_len == 4
    assert torch.equal(cache.keys, keys_before)
