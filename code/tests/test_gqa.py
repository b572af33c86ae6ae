"""GroupedQueryAttention and MultiQueryAttention checked against MultiHeadAttention and PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    padding_mask,
    repeat_kv,
    scaled_dot_product_attention,
)

# (d_model, n_heads, n_kv_heads): group sizes 1, 2, 3, 4 and 8, one head of
# width 1, and widths that are not powers of two.
CONFIGS = [(24, 6, 2), (24, 6, 3), (30, 10, 5), (32, 8, 1), (16, 4, 4), (8, 8, 1), (36, 12, 3)]
BACKENDS = ["explicit", "torch"]
TIGHT = dict(atol=1e-12, rtol=1e-10)


def inputs(batch, seq_len, d_model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, d_model, dtype=torch.float64, generator=generator)


def make_gqa(d_model, n_heads, n_kv_heads, bias=True, seed=0, backend="explicit"):
    """Build a float64 GroupedQueryAttention with non-zero biases, so a misplaced bias shows."""
    torch.manual_seed(seed)
    module = GroupedQueryAttention(d_model, n_heads, n_kv_heads, bias=bias, backend=backend)
    module = module.double().eval()
    if bias:
        for layer in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
            nn.init.normal_(layer.bias)
    return module


def split_heads(projected, n_heads):
    batch, seq_len, features = projected.shape
    # (B, T, n_heads * head_dim) -> (B, n_heads, T, head_dim)
    return projected.view(batch, seq_len, n_heads, features // n_heads).transpose(1, 2)


def repeat_kv_weights(module):
    """Return an MHA state dict in which key-value head j is copied to query heads j*G .. j*G + G - 1."""
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        if name in state:
            rows = state[name].view(module.n_kv_heads, module.head_dim, *state[name].shape[1:])
            state[name] = rows.repeat_interleave(module.group_size, dim=0).flatten(0, 1)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_model, n_heads", [(24, 6), (30, 5), (16, 16)])
def test_gqa_with_all_kv_heads_equals_mha(d_model, n_heads, backend):
    gqa = make_gqa(d_model, n_heads, n_heads, backend=backend)
    mha = MultiHeadAttention(d_model, n_heads, bias=True).double().eval()
    mha.load_state_dict(gqa.state_dict())
    x = inputs(3, 7, d_model)
    keep = padding_mask(torch.tensor([7, 3, 5]), 7)

    torch.testing.assert_close(gqa(x), mha(x), **TIGHT)
    torch.testing.assert_close(gqa(x, is_causal=False), mha(x, is_causal=False), **TIGHT)
    torch.testing.assert_close(gqa(x, attn_mask=keep), mha(x, attn_mask=keep), **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_model, n_heads", [(24, 6), (32, 8), (12, 1)])
def test_gqa_with_one_kv_head_equals_mqa(d_model, n_heads, backend):
    gqa = make_gqa(d_model, n_heads, 1, backend=backend)
    mqa = MultiQueryAttention(d_model, n_heads, bias=True, backend=backend).double().eval()
    mqa.load_state_dict(gqa.state_dict())
    x = inputs(2, 9, d_model)

    assert mqa.n_kv_heads == 1
    assert torch.equal(mqa(x), gqa(x))
    assert torch.equal(mqa(x, is_causal=False), gqa(x, is_causal=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("d_model, n_heads, n_kv_heads", CONFIGS)
def test_gqa_matches_torch_enable_gqa(d_model, n_heads, n_kv_heads, is_causal, backend):
    module = make_gqa(d_model, n_heads, n_kv_heads, backend=backend)
    x = inputs(2, 6, d_model)

    query = split_heads(F.linear(x, module.q_proj.weight, module.q_proj.bias), n_heads)
    key = split_heads(F.linear(x, module.k_proj.weight, module.k_proj.bias), n_kv_heads)
    value = split_heads(F.linear(x, module.v_proj.weight, module.v_proj.bias), n_kv_heads)
    attended = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=True)
    merged = attended.transpose(1, 2).reshape(2, 6, d_model)
    expected = F.linear(merged, module.o_proj.weight, module.o_proj.bias)

    actual = module(x, is_causal=is_causal)

    assert actual.shape == (2, 6, d_model)
    torch.testing.assert_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_model, n_heads, n_kv_heads", CONFIGS)
def test_gqa_equals_mha_with_repeated_kv_weights(d_model, n_heads, n_kv_heads, backend):
    gqa = make_gqa(d_model, n_heads, n_kv_heads, backend=backend)
    mha = MultiHeadAttention(d_model, n_heads, bias=True).double().eval()
    mha.load_state_dict(repeat_kv_weights(gqa))
    x = inputs(2, 5, d_model)
    keep = padding_mask(torch.tensor([5, 2]), 5)

    torch.testing.assert_close(gqa(x), mha(x), **TIGHT)
    torch.testing.assert_close(gqa(x, attn_mask=keep), mha(x, attn_mask=keep), **TIGHT)


@pytest.mark.parametrize("d_model, n_heads, n_kv_heads", CONFIGS)
def test_gqa_backends_agree_with_masks(d_model, n_heads, n_kv_heads):
    explicit = make_gqa(d_model, n_heads, n_kv_heads, backend="explicit")
    fused = make_gqa(d_model, n_heads, n_kv_heads, backend="torch")
    x = inputs(3, 6, d_model)
    keep = padding_mask(torch.tensor([6, 2, 4]), 6)
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    # A different mask per head and query, with the first key always kept.
    per_head = torch.rand(3, n_heads, 6, 6, generator=torch.Generator().manual_seed(5)) > 0.4
    per_head[..., 0] = True

    torch.testing.assert_close(explicit(x), fused(x), **TIGHT)
    torch.testing.assert_close(explicit(x, is_causal=False), fused(x, is_causal=False), **TIGHT)
    torch.testing.assert_close(explicit(x, attn_mask=keep), fused(x, attn_mask=keep), **TIGHT)
    torch.testing.assert_close(explicit(x, attn_mask=additive), fused(x, attn_mask=additive), **TIGHT)
    torch.testing.assert_close(
        explicit(x, attn_mask=per_head, is_causal=False), fused(x, attn_mask=per_head, is_causal=False), **TIGHT
    )


def test_gqa_backend_switch_on_one_module():
    module = make_gqa(24, 6, 2)
    x = inputs(2, 8, 24)

    explicit = module(x)
    module.backend = "torch"
    fused = module(x)

    assert module.backend == "torch"
    torch.testing.assert_close(explicit, fused, **TIGHT)


@pytest.mark.parametrize("d_model, n_heads, n_kv_heads", [(24, 6, 2), (32, 8, 1), (12, 3, 3)])
def test_gqa_gradients_agree_across_backends(d_model, n_heads, n_kv_heads):
    explicit = make_gqa(d_model, n_heads, n_kv_heads, backend="explicit")
    fused = make_gqa(d_model, n_heads, n_kv_heads, backend="torch")
    x = inputs(2, 5, d_model)

    explicit(x).pow(2).sum().backward()
    fused(x).pow(2).sum().backward()

    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        mine = explicit.get_submodule(name).weight.grad
        theirs = fused.get_submodule(name).weight.grad
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-8, msg=name)


def test_gqa_attention_weights_match_mha_with_repeated_kv():
    gqa = make_gqa(24, 6, 2)
    mha = MultiHeadAttention(24, 6, bias=True).double().eval()
    mha.load_state_dict(repeat_kv_weights(gqa))
    x = inputs(2, 5, 24)

    weights = gqa.attention_weights(x)

    assert weights.shape == (2, 6, 5, 5)
    torch.testing.assert_close(weights, mha.attention_weights(x), **TIGHT)


def test_gqa_projection_shapes_and_names():
    module = GroupedQueryAttention(48, 12, 4, bias=True)

    assert module.head_dim == 4
    assert module.group_size == 3
    assert module.q_proj.weight.shape == (48, 48)
    assert module.k_proj.weight.shape == (16, 48)
    assert module.v_proj.weight.shape == (16, 48)
    assert module.o_proj.weight.shape == (48, 48)
    assert set(module.state_dict()) == {
        f"{name}.{kind}" for name in ("q_proj", "k_proj", "v_proj", "o_proj") for kind in ("weight", "bias")
    }


def test_gqa_parameter_count():
    module = GroupedQueryAttention(48, 12, 4)

    # q_proj and o_proj are 48 x 48; k_proj and v_proj are 16 x 48.
    assert sum(p.numel() for p in module.parameters()) == 2 * 48 * 48 + 2 * 16 * 48


# repeat_kv and the order of heads.


def test_repeat_kv_shape_and_order():
    kv = torch.randn(2, 3, 5, 4)

    repeated = repeat_kv(kv, 4)

    assert repeated.shape == (2, 12, 5, 4)
    for head in range(12):
        assert torch.equal(repeated[:, head], kv[:, head // 4]), f"head {head}"


def test_repeat_kv_equals_repeat_interleave():
    kv = torch.randn(2, 3, 5, 4)

    assert torch.equal(repeat_kv(kv, 3), torch.repeat_interleave(kv, 3, dim=1))


def test_repeat_kv_group_of_one_is_identity():
    kv = torch.randn(2, 3, 5, 4)

    assert repeat_kv(kv, 1) is kv


def test_wrong_repeat_order_mixes_groups():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 5, 4, dtype=torch.float64, generator=generator)
    key = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)
    value = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)

    reference = F.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    interleaved = scaled_dot_product_attention(query, repeat_kv(key, 2), repeat_kv(value, 2))
    tiled = scaled_dot_product_attention(query, key.repeat(1, 2, 1, 1), value.repeat(1, 2, 1, 1))

    torch.testing.assert_close(interleaved, reference, **TIGHT)
    assert not torch.allclose(tiled, reference)
    # Tiling pairs query head 1 with key-value head 1, but head 1 belongs to group 0.
    assert torch.equal(key.repeat(1, 2, 1, 1)[:, 1], key[:, 1])
    assert not torch.allclose(tiled[:, 1], reference[:, 1])
    # Head 0 reads key-value head 0 either way, so only the other heads differ.
    torch.testing.assert_close(tiled[:, 0], reference[:, 0], **TIGHT)


# Converting a multi-head checkpoint.


@pytest.mark.parametrize("n_kv_heads", [1, 2, 3])
def test_from_mha_mean_pools_each_group(n_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 6, bias=True).double()
    for layer in (mha.k_proj, mha.v_proj):
        nn.init.normal_(layer.bias)
    group_size, head_dim = 6 // n_kv_heads, 4

    gqa = GroupedQueryAttention.from_mha(mha, n_kv_heads)

    for name in ("k_proj", "v_proj"):
        source, target = mha.get_submodule(name), gqa.get_submodule(name)
        for group in range(n_kv_heads):
            heads = range(group * group_size, (group + 1) * group_size)
            rows = slice(group * head_dim, (group + 1) * head_dim)
            expected_weight = sum(source.weight[h * head_dim : (h + 1) * head_dim] for h in heads) / group_size
            expected_bias = sum(source.bias[h * head_dim : (h + 1) * head_dim] for h in heads) / group_size
            torch.testing.assert_close(target.weight[rows], expected_weight, atol=1e-15, rtol=0, msg=name)
            torch.testing.assert_close(target.bias[rows], expected_bias, atol=1e-15, rtol=0, msg=name)
    assert torch.equal(gqa.q_proj.weight, mha.q_proj.weight)
    assert torch.equal(gqa.o_proj.weight, mha.o_proj.weight)
    assert torch.equal(gqa.o_proj.bias, mha.o_proj.bias)


def test_from_mha_with_all_heads_reproduces_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(30, 5, bias=True).double().eval()
    x = inputs(2, 7, 30)

    gqa = GroupedQueryAttention.from_mha(mha, 5).eval()

    assert torch.equal(gqa(x), mha(x))


def test_from_mha_copies_dtype_and_settings():
    mha = MultiHeadAttention(16, 4, dropout=0.25, backend="torch").double()

    gqa = GroupedQueryAttention.from_mha(mha, 2)

    assert gqa.k_proj.weight.dtype == torch.float64
    assert gqa.dropout == 0.25
    assert gqa.backend == "torch"
    assert gqa.q_proj.bias is None


def test_mqa_from_mha_pools_every_head():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).double()

    mqa = MultiQueryAttention.from_mha(mha)

    assert isinstance(mqa, MultiQueryAttention)
    torch.testing.assert_close(
        mqa.k_proj.weight, mha.k_proj.weight.view(4, 4, 16).mean(dim=0), atol=1e-15, rtol=0
    )


# Invalid input: each case names the offending value in the message.


def test_gqa_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        GroupedQueryAttention(24, 6, 4)


def test_gqa_rejects_indivisible_model_width():
    with pytest.raises(ValueError, match="d_model=50 is not divisible by n_heads=6"):
        GroupedQueryAttention(50, 6, 2)


@pytest.mark.parametrize("n_kv_heads", [0, -2])
def test_gqa_rejects_non_positive_kv_heads(n_kv_heads):
    with pytest.raises(ValueError, match=f"n_kv_heads={n_kv_heads} is invalid; expected a positive int"):
        GroupedQueryAttention(24, 6, n_kv_heads)


def test_gqa_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend='flash' is invalid; expected 'explicit' or 'torch'"):
        GroupedQueryAttention(24, 6, 2, backend="flash")


def test_backend_setter_rejects_unknown_backend():
    module = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        module.backend = "cuda"


def test_from_mha_rejects_other_modules():
    with pytest.raises(ValueError, match="mha must be a MultiHeadAttention, got GroupedQueryAttention"):
        GroupedQueryAttention.from_mha(GroupedQueryAttention(16, 4, 2), 1)


def test_from_mha_rejects_indivisible_kv_heads():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        GroupedQueryAttention.from_mha(MultiHeadAttention(24, 6), 4)


def test_mqa_from_mha_rejects_several_kv_heads():
    with pytest.raises(ValueError, match="n_kv_heads=2 is invalid for MultiQueryAttention"):
        MultiQueryAttention.from_mha(MultiHeadAttention(16, 4), 2)


def test_repeat_kv_rejects_rank_three():
    with pytest.raises(ValueError, match=r"kv has shape \(2, 5, 4\)"):
        repeat_kv(torch.randn(2, 5, 4), 2)


def test_repeat_kv_rejects_zero_group():
    with pytest.raises(ValueError, match="group_size=0 is invalid"):
        repeat_kv(torch.randn(2, 3, 5, 4), 0)
