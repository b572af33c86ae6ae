"""RoPE checked for its defining properties and against Hugging Face's Llama rotary embedding."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llm_scratch.attention.rope import (
    apply_rope,
    convert_rope_weight,
    rope_cos_sin,
    rope_frequencies,
    rope_permutation,
    rotate_half,
    rotate_interleaved,
)

LAYOUTS = ["interleaved", "split_halves"]


def random(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def rotate(x, positions, layout, base=10000.0):
    cos, sin = rope_cos_sin(positions, x.size(-1), base, layout=layout, dtype=x.dtype)
    return apply_rope(x, cos, sin, layout=layout)


def test_frequencies_follow_definition():
    frequencies = rope_frequencies(8, base=100.0)

    expected = torch.tensor([100.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(frequencies, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tables_pair_features_by_layout(layout):
    cos, _ = rope_cos_sin(torch.tensor([1]), 6, base=10.0, layout=layout, dtype=torch.float64)
    angles = [10.0 ** (-2 * i / 6) for i in range(3)]

    if layout == "interleaved":
        expected = [math.cos(a) for a in angles for _ in range(2)]
    else:
        expected = [math.cos(a) for a in angles] * 2
    torch.testing.assert_close(cos[0], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_position_zero_is_identity(layout):
    x = random(2, 3, 1, 16)

    rotated = rotate(x, torch.zeros(1, dtype=torch.long), layout)

    torch.testing.assert_close(rotated, x, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotation_preserves_norm(layout):
    x = random(2, 3, 50, 16)

    rotated = rotate(x, torch.arange(1000, 1050), layout)

    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    assert not torch.allclose(rotated, x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_depend_on_offset_only(layout):
    query = random(1, 1, 1, 32, seed=1)
    key = random(1, 1, 1, 32, seed=2)

    def score(m, n):
        q = rotate(query, torch.tensor([m]), layout)
        k = rotate(key, torch.tensor([n]), layout)
        return (q * k).sum().item()

    for m, n in [(0, 0), (5, 2), (2, 5), (17, 3), (100, 99)]:
        reference = score(m, n)
        for shift in (1, 7, 250, 4096):
            shifted = score(m + shift, n + shift)
            assert shifted == pytest.approx(reference, rel=1e-11, abs=1e-11), (m, n, shift)
    assert score(5, 2) != pytest.approx(score(2, 5), rel=1e-6)


@pytest.mark.parametrize("dim", [7, 1, 0, -2])
def test_invalid_dim_rejected(dim):
    with pytest.raises(ValueError, match=f"dim={dim}"):
        rope_cos_sin(torch.arange(4), dim)
    with pytest.raises(ValueError, match=f"dim={dim}"):
        rope_frequencies(dim)


@pytest.mark.parametrize("base", [0.0, -10000.0, float("inf"), float("nan")])
def test_invalid_base_rejected(base):
    with pytest.raises(ValueError, match="base="):
        rope_cos_sin(torch.arange(4), 8, base)


def test_invalid_layout_rejected():
    with pytest.raises(ValueError, match="layout='gptj'"):
        rope_cos_sin(torch.arange(4), 8, layout="gptj")


def test_table_shape_mismatch_rejected():
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    with pytest.raises(ValueError, match="seq_len=4"):
        apply_rope(torch.zeros(1, 2, 4, 8), cos, sin)


def test_rotations_turn_each_pair_a_quarter():
    x = torch.arange(1.0, 7.0)  # features 1 .. 6

    assert rotate_interleaved(x).tolist() == [-2.0, 1.0, -4.0, 3.0, -6.0, 5.0]
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]


def test_permutation_maps_pairs_and_inverts():
    to_halves = rope_permutation(8, source="interleaved", target="split_halves")
    to_interleaved = rope_permutation(8, source="split_halves", target="interleaved")

    assert to_halves.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert to_halves[to_interleaved].tolist() == list(range(8))
    assert rope_permutation(8, source="split_halves", target="split_halves").tolist() == list(range(8))


def test_layouts_agree_after_permuting_weights():
    d_model, n_heads, head_dim, seq_len = 24, 3, 8, 11
    w_query = random(n_heads * head_dim, d_model, seed=3)
    w_key = random(n_heads * head_dim, d_model, seed=4)
    x = random(2, seq_len, d_model, seed=5)
    positions = torch.arange(seq_len)

    def rotated_heads(weight, layout):
        projected = (x @ weight.T).view(2, seq_len, n_heads, head_dim).transpose(1, 2)
        return rotate(projected, positions, layout)

    query_interleaved = rotated_heads(w_query, "interleaved")
    key_interleaved = rotated_heads(w_key, "interleaved")
    query_halves = rotated_heads(convert_rope_weight(w_query, head_dim), "split_halves")
    key_halves = rotated_heads(convert_rope_weight(w_key, head_dim), "split_halves")

    scores_interleaved = query_interleaved @ key_interleaved.transpose(-2, -1)
    scores_halves = query_halves @ key_halves.transpose(-2, -1)
    torch.testing.assert_close(scores_halves, scores_interleaved, rtol=1e-12, atol=1e-12)

    # The rotated vectors themselves differ by the same permutation.
    perm = rope_permutation(head_dim)
    torch.testing.assert_close(query_halves, query_interleaved[..., perm], rtol=1e-12, atol=1e-12)


def test_weight_conversion_round_trips():
    weight = random(4 * 6, 10)
    bias = random(4 * 6)

    there = convert_rope_weight(weight, 6, source="interleaved", target="split_halves")
    back = convert_rope_weight(there, 6, source="split_halves", target="interleaved")

    assert not torch.equal(there, weight)
    assert torch.equal(back, weight)
    assert convert_rope_weight(bias, 6)[:6].tolist() == bias[[0, 2, 4, 1, 3, 5]].tolist()
    with pytest.raises(ValueError, match="head_dim=5 is odd"):
        convert_rope_weight(weight, 5)
    with pytest.raises(ValueError, match="head_dim=10"):
        convert_rope_weight(weight, 10)


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_split_halves_matches_llama(rope_theta):
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    rotary = LlamaRotaryEmbedding(config)
    query = random(2, 4, 9, 16, dtype=torch.float32, seed=6)
    key = random(2, 2, 9, 16, dtype=torch.float32, seed=7)
    # A different run of positions per sequence, as in a batch with left padding.
    position_ids = torch.stack((torch.arange(9), torch.arange(30, 39)))

    hf_cos, hf_sin = rotary(query, position_ids)
    expected_query, expected_key = apply_rotary_pos_emb(query, key, hf_cos, hf_sin)
    cos, sin = rope_cos_sin(position_ids, 16, rope_theta, layout="split_halves")

    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-5)
    actual_query = apply_rope(query, cos, sin, layout="split_halves")
    actual_key = apply_rope(key, cos, sin, layout="split_halves")
    torch.testing.assert_close(actual_query, expected_query, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual_key, expected_key, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoding_positions_continue_from_offset(layout):
    x = random(2, 3, 9, 12)
    full = rotate(x, torch.arange(9), layout)

    prefill = rotate(x[:, :, :6], torch.arange(6), layout)
    decoded = rotate(x[:, :, 6:], torch.arange(6, 9), layout)

    torch.testing.assert_close(torch.cat((prefill, decoded), dim=2), full, rtol=0, atol=0)
