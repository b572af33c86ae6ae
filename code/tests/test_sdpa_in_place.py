"""The in-place steps inside scaled_dot_product_attention leave inputs and gradients intact."""

import torch
import torch.nn.functional as F

from llm_scratch.attention import attention_weights, scaled_dot_product_attention, stable_softmax


def make_qkv(seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)
    key = torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=generator)
    value = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=generator)
    return query, key, value


def test_stable_softmax_leaves_input_unchanged():
    scores = torch.randn(3, 8, dtype=torch.float64)
    before = scores.clone()

    stable_softmax(scores)

    assert torch.equal(scores, before)


def test_attention_leaves_inputs_and_mask_unchanged():
    query, key, value = make_qkv()
    mask = torch.zeros(5, 6, dtype=torch.float64)
    mask[:, 2] = float("-inf")
    copies = [tensor.clone() for tensor in (query, key, value, mask)]

    scaled_dot_product_attention(query, key, value, attn_mask=mask)
    attention_weights(query, key, is_causal=True)

    for original, copy in zip((query, key, value, mask), copies):
        assert torch.equal(original, copy)


def test_mask_with_batch_dims_of_value_only():
    # query and key have no batch dimension; value and the mask have one of size 2.
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    key = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    value = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 3, 5, generator=generator) > 0.3
    mask[..., 0] = True

    expected = F.scaled_dot_product_attention(query.expand(2, 3, 4), key.expand(2, 5, 4), value, attn_mask=mask)
    actual = scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


def test_gradcheck_with_additive_mask():
    query, key, value = (tensor[:1, :1].clone().requires_grad_(True) for tensor in make_qkv())
    mask = torch.zeros(5, 6, dtype=torch.float64)
    mask[:, 3] = float("-inf")
    mask[1] = 0.5

    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask), (query, key, value)
    )


def test_no_grad_result_equals_grad_result():
    query, key, value = make_qkv()
    with_grad = [tensor.clone().requires_grad_(True) for tensor in (query, key, value)]

    tracked = scaled_dot_product_attention(*with_grad, is_causal=True)
    with torch.no_grad():
        untracked = scaled_dot_product_attention(query, key, value, is_causal=True)

    assert torch.equal(tracked.detach(), untracked)
