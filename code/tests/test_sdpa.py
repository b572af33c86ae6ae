"""scaled_dot_product_attention checked against PyTorch's fused kernel."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from llm_scratch.attention import (
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    stable_softmax,
)

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}

# (batch shape, L, S, E, Ev): query and key lengths differ, and so do the key
# and value feature sizes, so a transposed axis cannot go unnoticed.
SHAPES = [
    ((), 3, 5, 4, 6),
    ((2,), 7, 4, 8, 3),
    ((2, 3), 5, 9, 16, 12),
    ((2, 3, 2), 4, 6, 5, 7),
    ((1,), 1, 11, 8, 8),
]


def make_qkv(batch_shape, query_len, key_len, key_dim, value_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(*batch_shape, query_len, key_dim, dtype=dtype, generator=generator)
    key = torch.randn(*batch_shape, key_len, key_dim, dtype=dtype, generator=generator)
    value = torch.randn(*batch_shape, key_len, value_dim, dtype=dtype, generator=generator)
    return query, key, value


def random_bool_mask(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) > 0.3
    # Keep at least one key per row so PyTorch's reference stays well defined.
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_torch_without_mask(shape, dtype):
    query, key, value = make_qkv(*shape, dtype)

    expected = F.scaled_dot_product_attention(query, key, value)
    actual = scaled_dot_product_attention(query, key, value)

    assert actual.shape == expected.shape
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_torch_with_bool_mask(shape, dtype):
    batch_shape, query_len, key_len, _, _ = shape
    query, key, value = make_qkv(*shape, dtype)
    mask = random_bool_mask((*batch_shape, query_len, key_len))

    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    actual = scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_torch_with_float_mask(shape, dtype):
    batch_shape, query_len, key_len, _, _ = shape
    query, key, value = make_qkv(*shape, dtype)
    generator = torch.Generator().manual_seed(2)
    additive = torch.randn(*batch_shape, query_len, key_len, dtype=dtype, generator=generator)
    additive[..., 1:2] = float("-inf")

    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=additive)
    actual = scaled_dot_product_attention(query, key, value, attn_mask=additive)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_broadcast_mask_matches_torch(dtype):
    query, key, value = make_qkv((2, 3), 5, 7, 4, 6, dtype)
    lengths = torch.tensor([7, 4])
    mask = padding_mask(lengths, 7)  # (2, 1, 1, 7) broadcasts over heads and queries

    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    actual = scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_bool_and_additive_masks_agree():
    query, key, value = make_qkv((2,), 5, 8, 4, 3, torch.float64)
    mask = random_bool_mask((2, 5, 8))
    additive = torch.zeros(2, 5, 8, dtype=torch.float64).masked_fill(~mask, float("-inf"))

    from_bool = scaled_dot_product_attention(query, key, value, attn_mask=mask)
    from_additive = scaled_dot_product_attention(query, key, value, attn_mask=additive)

    assert torch.equal(from_bool, from_additive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 4, 9])
def test_square_causal_matches_torch(length, dtype):
    query, key, value = make_qkv((2, 3), length, length, 8, 5, dtype)

    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    actual = scaled_dot_product_attention(query, key, value, is_causal=True)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("query_len, key_len", [(1, 6), (3, 7), (5, 12)])
def test_short_query_causal_aligns_bottom_right(query_len, key_len, dtype):
    query, key, value = make_qkv((2, 2), query_len, key_len, 6, 4, dtype)
    bottom_right = causal_lower_right(query_len, key_len)

    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bottom_right)
    actual = scaled_dot_product_attention(query, key, value, is_causal=True)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_short_query_causal_differs_from_top_left():
    query, key, value = make_qkv((2,), 3, 7, 6, 4, torch.float64)

    top_left = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    ours = scaled_dot_product_attention(query, key, value, is_causal=True)

    assert not torch.allclose(ours, top_left)


def test_causal_mask_bottom_right_layout():
    expected = torch.tensor(
        [
            [True, True, True, False, False],
            [True, True, True, True, False],
            [True, True, True, True, True],
        ]
    )

    assert torch.equal(causal_mask(3, 5), expected)


def test_causal_mask_square_is_lower_triangle():
    expected = torch.ones(4, 4, dtype=torch.bool).tril()

    assert torch.equal(causal_mask(4, 4), expected)


def test_causal_mask_longer_query_has_empty_rows():
    mask = causal_mask(5, 3)

    assert not mask[:2].any()
    assert torch.equal(mask[2:], torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.1, 1.0, 2.5])
def test_custom_scale_matches_torch(scale, dtype):
    query, key, value = make_qkv((2, 4), 6, 3, 5, 7, dtype)

    expected = F.scaled_dot_product_attention(query, key, value, scale=scale)
    actual = scaled_dot_product_attention(query, key, value, scale=scale)

    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_default_scale_is_inverse_sqrt_key_dim():
    query, key, value = make_qkv((2,), 4, 6, 9, 3, torch.float64)

    default = scaled_dot_product_attention(query, key, value)
    explicit = scaled_dot_product_attention(query, key, value, scale=1 / math.sqrt(9))

    assert torch.equal(default, explicit)


def test_last_query_alone_equals_last_causal_row():
    query, key, value = make_qkv((2, 3), 8, 8, 6, 5, torch.float64)

    full = scaled_dot_product_attention(query, key, value, is_causal=True)
    last_only = scaled_dot_product_attention(query[..., -1:, :], key, value, is_causal=True)

    torch.testing.assert_close(last_only, full[..., -1:, :], atol=1e-12, rtol=0)


def test_future_token_leaves_past_outputs_bit_identical():
    query, key, value = make_qkv((2,), 9, 9, 8, 4, torch.float32)
    changed_position = 6
    key2, value2, query2 = key.clone(), value.clone(), query.clone()
    key2[:, changed_position] += 10.0
    value2[:, changed_position] -= 3.0
    query2[:, changed_position] *= -1.0

    before = scaled_dot_product_attention(query, key, value, is_causal=True)
    after = scaled_dot_product_attention(query2, key2, value2, is_causal=True)

    assert torch.equal(before[:, :changed_position], after[:, :changed_position])
    assert not torch.allclose(before[:, changed_position:], after[:, changed_position:])


def test_permuting_keys_and_queries_permutes_output():
    query, key, value = make_qkv((2, 3), 7, 7, 6, 5, torch.float64)
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(3))

    output = scaled_dot_product_attention(query, key, value)
    permuted = scaled_dot_product_attention(
        query[..., permutation, :], key[..., permutation, :], value[..., permutation, :]
    )

    torch.testing.assert_close(permuted, output[..., permutation, :], atol=1e-12, rtol=0)


def test_permuting_keys_alone_leaves_output_unchanged():
    query, key, value = make_qkv((2,), 4, 9, 6, 5, torch.float64)
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(4))

    output = scaled_dot_product_attention(query, key, value)
    permuted = scaled_dot_product_attention(query, key[:, permutation], value[:, permutation])

    torch.testing.assert_close(permuted, output, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_row_returns_zeros(mask_kind):
    query, key, value = make_qkv((2,), 4, 6, 5, 3, torch.float64)
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[0, 2] = False
    if mask_kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(2, 4, 6, dtype=torch.float64).masked_fill(~keep, float("-inf"))

    output = scaled_dot_product_attention(query, key, value, attn_mask=mask)
    unmasked = scaled_dot_product_attention(query, key, value)

    assert torch.equal(output[0, 2], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(output[0, :2], unmasked[0, :2])
    assert torch.equal(output[1], unmasked[1])


def test_fully_masked_row_has_finite_gradients():
    query, key, value = make_qkv((2,), 4, 6, 5, 3, torch.float64)
    for tensor in (query, key, value):
        tensor.requires_grad_(True)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1] = False

    output = scaled_dot_product_attention(query, key, value, attn_mask=keep)
    output.sum().backward()

    assert torch.isfinite(query.grad).all()
    assert torch.isfinite(key.grad).all()
    assert torch.isfinite(value.grad).all()
    assert torch.equal(query.grad[:, 1], torch.zeros(2, 5, dtype=torch.float64))


def test_gradients_match_torch():
    tensors = make_qkv((2, 3), 5, 7, 4, 6, torch.float64)
    ours = [tensor.clone().requires_grad_(True) for tensor in tensors]
    reference = [tensor.clone().requires_grad_(True) for tensor in tensors]
    mask = random_bool_mask((5, 7))

    scaled_dot_product_attention(*ours, attn_mask=mask).pow(2).sum().backward()
    F.scaled_dot_product_attention(*reference, attn_mask=mask).pow(2).sum().backward()

    for name, mine, theirs in zip(("query", "key", "value"), ours, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_gradcheck_passes():
    query, key, value = make_qkv((2,), 3, 4, 3, 2, torch.float64)
    for tensor in (query, key, value):
        tensor.requires_grad_(True)

    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True), (query, key, value)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite_with_large_scores(dtype):
    # Entries of 200 in 64 dimensions give scores near 200 * 200 * 64 / 8 = 320,000,
    # past float16's maximum of 65,504.
    query = torch.full((1, 4, 64), 200.0)
    key = torch.full((1, 6, 64), 200.0)
    value = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))

    reference = scaled_dot_product_attention(query, key, value, is_causal=True)
    low = scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype), is_causal=True)

    assert torch.isfinite(reference).all()
    assert torch.isfinite(low).all()
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32_on_random_inputs(dtype):
    query, key, value = make_qkv((2, 2), 5, 7, 16, 8, torch.float32)

    reference = scaled_dot_product_attention(query, key, value)
    low = scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype))

    torch.testing.assert_close(low.float(), reference, atol=3e-2, rtol=3e-2)


def test_dropout_zeroes_weights_and_rescales():
    query, key, value = make_qkv((4, 4), 16, 16, 8, 8, torch.float64)

    torch.manual_seed(0)
    first = scaled_dot_product_attention(query, key, value, dropout_p=0.5)
    torch.manual_seed(0)
    second = scaled_dot_product_attention(query, key, value, dropout_p=0.5)
    without = scaled_dot_product_attention(query, key, value)

    assert torch.equal(first, second)
    assert not torch.allclose(first, without)


def test_dropout_zero_is_deterministic():
    query, key, value = make_qkv((2,), 4, 5, 3, 2, torch.float64)

    assert torch.equal(
        scaled_dot_product_attention(query, key, value, dropout_p=0.0),
        scaled_dot_product_attention(query, key, value),
    )


def test_attention_weights_rows_sum_to_one():
    query, key, _ = make_qkv((2, 3), 5, 7, 4, 1, torch.float64)

    weights = attention_weights(query, key, is_causal=True)

    assert weights.shape == (2, 3, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_attention_weights_times_value_is_output():
    query, key, value = make_qkv((2,), 5, 7, 4, 6, torch.float64)
    mask = random_bool_mask((2, 5, 7))

    weights = attention_weights(query, key, attn_mask=mask)
    output = scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.testing.assert_close(weights @ value, output, atol=1e-12, rtol=0)


def test_stable_softmax_matches_torch():
    scores = torch.randn(3, 4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(stable_softmax(scores), torch.softmax(scores, dim=-1))
    torch.testing.assert_close(stable_softmax(scores, dim=1), torch.softmax(scores, dim=1))


def test_stable_softmax_survives_huge_scores():
    scores = torch.tensor([[1000.0, 999.0, -1000.0]])

    naive = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    stable = stable_softmax(scores)

    assert torch.isnan(naive).any()
    torch.testing.assert_close(stable, torch.softmax(scores, dim=-1))


def test_stable_softmax_all_negative_infinity_row_is_zero():
    scores = torch.tensor([[0.5, float("-inf")], [float("-inf"), float("-inf")]])

    result = stable_softmax(scores)

    assert torch.equal(result[1], torch.zeros(2))
    assert torch.equal(result[0], torch.tensor([1.0, 0.0]))


def test_padding_mask_layout():
    mask = padding_mask(torch.tensor([3, 1, 4]), 4)

    assert mask.shape == (3, 1, 1, 4)
    assert torch.equal(mask[:, 0, 0], torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool())


def test_padded_keys_do_not_change_output():
    query, key, value = make_qkv((1,), 3, 4, 5, 2, torch.float64)
    padded_key = torch.cat([key, torch.randn(1, 2, 5, dtype=torch.float64)], dim=1)
    padded_value = torch.cat([value, torch.randn(1, 2, 2, dtype=torch.float64)], dim=1)
    mask = padding_mask(torch.tensor([4]), 6)[:, 0]  # (1, 1, 6)

    short = scaled_dot_product_attention(query, key, value)
    padded = scaled_dot_product_attention(query, padded_key, padded_value, attn_mask=mask)

    torch.testing.assert_close(padded, short, atol=1e-12, rtol=0)


# Invalid input: each case names the offending value in the message.


def test_rejects_rank_one_query():
    with pytest.raises(ValueError, match=r"query has shape \(4,\) \(rank 1\)"):
        scaled_dot_product_attention(torch.randn(4), torch.randn(3, 4), torch.randn(3, 2))


def test_rejects_mismatched_key_value_lengths():
    with pytest.raises(ValueError, match="key length 5 does not match value length 6"):
        scaled_dot_product_attention(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 6, 4))


def test_rejects_mismatched_query_key_features():
    with pytest.raises(ValueError, match="query feature size 4 does not match key feature size 8"):
        scaled_dot_product_attention(torch.randn(3, 4), torch.randn(5, 8), torch.randn(5, 2))


def test_rejects_mask_that_does_not_broadcast():
    query, key, value = make_qkv((2,), 3, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 4\) does not broadcast"):
        scaled_dot_product_attention(query, key, value, attn_mask=torch.ones(3, 4, dtype=torch.bool))


def test_rejects_mask_that_would_grow_the_output():
    query, key, value = make_qkv((2,), 3, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 2, 3, 5\) does not broadcast"):
        scaled_dot_product_attention(query, key, value, attn_mask=torch.ones(4, 2, 3, 5, dtype=torch.bool))


def test_rejects_integer_mask():
    query, key, value = make_qkv((), 3, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="attn_mask has dtype torch.int64"):
        scaled_dot_product_attention(query, key, value, attn_mask=torch.ones(3, 5, dtype=torch.long))


def test_rejects_mask_with_is_causal():
    query, key, value = make_qkv((), 3, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="attn_mask and is_causal=True were both given"):
        scaled_dot_product_attention(
            query, key, value, attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True
        )


def test_rejects_batch_dims_that_do_not_broadcast():
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        scaled_dot_product_attention(torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4))


def test_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="expected one dtype"):
        scaled_dot_product_attention(
            torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2)
        )


def test_rejects_integer_tensors():
    with pytest.raises(ValueError, match="query has dtype torch.int64"):
        scaled_dot_product_attention(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4), torch.randn(5, 2))


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5])
def test_rejects_invalid_dropout(dropout_p):
    with pytest.raises(ValueError, match=f"dropout_p={dropout_p} is invalid"):
        scaled_dot_product_attention(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2), dropout_p=dropout_p)


def test_causal_mask_rejects_zero_length():
    with pytest.raises(ValueError, match="query_len=0"):
        causal_mask(0, 3)


def test_padding_mask_rejects_length_beyond_seq_len():
    with pytest.raises(ValueError, match="must lie between 0 and seq_len=4"):
        padding_mask(torch.tensor([2, 5]), 4)
