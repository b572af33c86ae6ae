"""MultiHeadAttention checked against torch.nn.MultiheadAttention with copied weights."""

import pytest
import torch
from torch import nn

from llm_scratch.attention import MultiHeadAttention, padding_mask

# (d_model, n_heads): one head, head_dim 1, and widths that are not powers of two.
CONFIGS = [(8, 1), (12, 3), (24, 4), (30, 5), (16, 16), (48, 6)]


def make_pair(d_model, n_heads, bias, seed=0):
    """Build our module and PyTorch's with identical weights, both in float64."""
    torch.manual_seed(seed)
    ours = MultiHeadAttention(d_model, n_heads, bias=bias).double().eval()
    if bias:
        # Non-zero biases, so a bias that is dropped or misplaced changes the output.
        for layer in (ours.q_proj, ours.k_proj, ours.v_proj, ours.o_proj):
            nn.init.normal_(layer.bias)

    reference = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True).double().eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight], dim=0)
        )
        reference.out_proj.weight.copy_(ours.o_proj.weight)
        if bias:
            reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
            reference.out_proj.bias.copy_(ours.o_proj.bias)
    return ours, reference


def inputs(batch, seq_len, d_model, seed=1):
    return torch.randn(batch, seq_len, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_model, n_heads", CONFIGS)
def test_mha_matches_torch_without_mask(d_model, n_heads, bias):
    ours, reference = make_pair(d_model, n_heads, bias)
    x = inputs(3, 7, d_model)

    expected, _ = reference(x, x, x, need_weights=False)
    actual = ours(x, is_causal=False)

    assert actual.shape == (3, 7, d_model)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_model, n_heads", CONFIGS)
def test_mha_matches_torch_causal(d_model, n_heads, bias):
    ours, reference = make_pair(d_model, n_heads, bias)
    x = inputs(2, 9, d_model)
    # nn.MultiheadAttention's boolean mask marks the positions that may NOT be attended.
    blocked = torch.ones(9, 9, dtype=torch.bool).triu(diagonal=1)

    expected, _ = reference(x, x, x, attn_mask=blocked, need_weights=False)
    actual = ours(x)

    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("d_model, n_heads", CONFIGS)
def test_mha_matches_torch_with_padding(d_model, n_heads):
    ours, reference = make_pair(d_model, n_heads, bias=True)
    x = inputs(3, 6, d_model)
    lengths = torch.tensor([6, 2, 4])
    keep = padding_mask(lengths, 6)  # (3, 1, 1, 6), True = may attend

    expected, _ = reference(x, x, x, key_padding_mask=~keep[:, 0, 0], need_weights=False)
    actual = ours(x, attn_mask=keep, is_causal=False)

    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


def test_mha_padding_and_causal_combined_matches_torch():
    ours, reference = make_pair(20, 4, bias=False)
    x = inputs(2, 6, 20)
    keep = padding_mask(torch.tensor([6, 4]), 6)
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)

    expected, _ = reference(
        x, x, x, attn_mask=blocked, key_padding_mask=~keep[:, 0, 0], need_weights=False
    )
    actual = ours(x, attn_mask=keep, is_causal=True)

    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


def test_mha_additive_mask_combined_with_causal():
    ours, _ = make_pair(20, 4, bias=False)
    x = inputs(2, 6, 20)
    keep = padding_mask(torch.tensor([6, 4]), 6)
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))

    from_bool = ours(x, attn_mask=keep, is_causal=True)
    from_additive = ours(x, attn_mask=additive, is_causal=True)

    torch.testing.assert_close(from_additive, from_bool, atol=1e-12, rtol=0)


def test_mha_weights_match_torch_average():
    ours, reference = make_pair(24, 4, bias=True)
    x = inputs(2, 5, 24)

    _, expected = reference(x, x, x, need_weights=True, average_attn_weights=False)
    actual = ours.attention_weights(x, is_causal=False)

    assert actual.shape == (2, 4, 5, 5)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


def test_mha_gradients_match_torch():
    ours, reference = make_pair(12, 3, bias=True)
    x = inputs(2, 5, 12)
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(diagonal=1)

    ours(x).pow(2).sum().backward()
    reference(x, x, x, attn_mask=blocked, need_weights=False)[0].pow(2).sum().backward()

    expected_q, expected_k, expected_v = reference.in_proj_weight.grad.chunk(3)
    torch.testing.assert_close(ours.q_proj.weight.grad, expected_q, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours.k_proj.weight.grad, expected_k, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours.v_proj.weight.grad, expected_v, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours.o_proj.weight.grad, reference.out_proj.weight.grad, atol=1e-10, rtol=1e-8)


def test_mha_state_dict_uses_checkpoint_names():
    module = MultiHeadAttention(16, 4, bias=True)

    assert set(module.state_dict()) == {
        f"{name}.{kind}" for name in ("q_proj", "k_proj", "v_proj", "o_proj") for kind in ("weight", "bias")
    }
    assert module.head_dim == 4


def test_mha_parameter_count():
    without_bias = MultiHeadAttention(48, 6)
    with_bias = MultiHeadAttention(48, 6, bias=True)

    assert sum(p.numel() for p in without_bias.parameters()) == 4 * 48 * 48
    assert sum(p.numel() for p in with_bias.parameters()) == 4 * 48 * 48 + 4 * 48


def test_mha_future_token_leaves_past_outputs_bit_identical():
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 8, 16)
    changed = x.clone()
    changed[:, 5] = torch.randn(2, 16)

    before = module(x)
    after = module(changed)

    assert torch.equal(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_mha_padding_leaves_real_tokens_unchanged():
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2).double().eval()
    short = torch.randn(1, 4, 16, dtype=torch.float64)
    padded = torch.cat([short, torch.randn(1, 3, 16, dtype=torch.float64)], dim=1)
    keep = padding_mask(torch.tensor([4]), 7)

    expected = module(short, is_causal=False)
    actual = module(padded, attn_mask=keep, is_causal=False)[:, :4]

    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    with_dropout = MultiHeadAttention(16, 4, dropout=0.5)
    without_dropout = MultiHeadAttention(16, 4)
    without_dropout.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 6, 16)

    with_dropout.eval()
    assert torch.equal(with_dropout(x), without_dropout(x))

    with_dropout.train()
    torch.manual_seed(1)
    first = with_dropout(x)
    torch.manual_seed(1)
    second = with_dropout(x)
    assert torch.equal(first, second)
    assert not torch.allclose(first, without_dropout(x))


def test_mha_half_precision_stays_finite():
    torch.manual_seed(0)
    module = MultiHeadAttention(32, 4)
    with torch.no_grad():
        for layer in (module.q_proj, module.k_proj):
            layer.weight.fill_(0.5)
    x = torch.full((1, 5, 32), 8.0)

    reference = module(x)
    low = module.half()(x.half())

    assert torch.isfinite(reference).all()
    assert torch.isfinite(low).all()


# Invalid input: each case names the offending value in the message.


def test_mha_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="d_model=50 is not divisible by n_heads=6"):
        MultiHeadAttention(50, 6)


@pytest.mark.parametrize("d_model, n_heads", [(0, 1), (16, 0), (-8, 2)])
def test_mha_rejects_non_positive_sizes(d_model, n_heads):
    with pytest.raises(ValueError, match="is invalid; expected a positive int"):
        MultiHeadAttention(d_model, n_heads)


def test_mha_rejects_invalid_dropout():
    with pytest.raises(ValueError, match="dropout=1.0 is invalid"):
        MultiHeadAttention(16, 4, dropout=1.0)


def test_mha_rejects_rank_two_input():
    module = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"x has shape \(5, 16\) \(rank 2\); expected rank 3"):
        module(torch.randn(5, 16))


def test_mha_rejects_wrong_width():
    module = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match="x has 12 features in its last dimension; expected d_model=16"):
        module(torch.randn(2, 5, 12))


def test_mha_rejects_mask_that_does_not_broadcast():
    module = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 1, 4\) does not broadcast"):
        module(torch.randn(2, 5, 16), attn_mask=torch.ones(2, 1, 1, 4, dtype=torch.bool))


def test_mha_rejects_mask_for_wrong_batch():
    module = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 1, 1, 5\) does not broadcast"):
        module(torch.randn(2, 5, 16), attn_mask=torch.ones(3, 1, 1, 5, dtype=torch.bool))
