"""TinyDecoder: cached and uncached decoding through a stack of layers give the same tokens."""

import pytest
import torch

from llm_scratch.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    kv_cache_bytes_per_token,
)
from llm_scratch.models import TinyDecoder, TinyDecoderConfig

BACKENDS = ["explicit", "torch"]
# n_kv_heads for n_heads=4: multi-head, grouped-query and multi-query attention.
KV_HEADS = [4, 2, 1]


def make_model(n_kv_heads, backend="explicit", seed=0, **overrides):
    torch.manual_seed(seed)
    config = TinyDecoderConfig(n_kv_heads=n_kv_heads, backend=backend, **overrides)
    return TinyDecoder(config).eval()


def prompt(batch=3, length=7, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_kv_heads", KV_HEADS)
def test_greedy_generation_same_with_and_without_cache(n_kv_heads, backend):
    model = make_model(n_kv_heads, backend)
    tokens = prompt()

    cached = model.generate(tokens, max_new_tokens=20)
    recomputed = model.generate(tokens, max_new_tokens=20, use_cache=False)

    assert cached.shape == (3, 27)
    assert torch.equal(cached[:, :7], tokens)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("n_kv_heads", KV_HEADS)
def test_cached_logits_equal_full_forward(n_kv_heads):
    model = make_model(n_kv_heads)
    tokens = prompt(batch=2, length=13)
    caches = model.make_kv_cache(batch=2)

    with torch.no_grad():
        expected = model(tokens)
        pieces = [model(tokens[:, :7], caches), model(tokens[:, 7:10], caches)]
        pieces += [model(tokens[:, position : position + 1], caches) for position in range(10, 13)]
    actual = torch.cat(pieces, dim=1)

    assert caches.seq_len == 13
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "n_kv_heads, attention_class",
    [(4, MultiHeadAttention), (2, GroupedQueryAttention), (1, MultiQueryAttention)],
)
def test_config_selects_attention_class(n_kv_heads, attention_class):
    model = make_model(n_kv_heads)

    assert all(type(block.attn) is attention_class for block in model.blocks)
    assert all(block.attn.n_kv_heads == n_kv_heads for block in model.blocks)


@pytest.mark.parametrize("n_kv_heads", KV_HEADS)
def test_model_cache_bytes_per_token(n_kv_heads):
    model = make_model(n_kv_heads, n_layers=3)
    caches = model.make_kv_cache(batch=2, max_seq_len=16)
    head_dim = 32 // 4

    expected_per_token = 2 * n_kv_heads * head_dim * 3 * 4  # float32
    assert caches.nbytes == 2 * 16 * expected_per_token
    assert kv_cache_bytes_per_token(3, n_kv_heads, head_dim, torch.float32) == expected_per_token


def test_generation_depends_on_prompt():
    model = make_model(2)
    first = model.generate(prompt(seed=1), max_new_tokens=8)
    second = model.generate(prompt(seed=2), max_new_tokens=8)

    assert not torch.equal(first[:, 7:], second[:, 7:])


def test_generate_rejects_sequence_past_position_table():
    model = make_model(2, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt_len=7 plus max_new_tokens=10 is 17, more than max_seq_len=16"):
        model.generate(prompt(), max_new_tokens=10)


def test_forward_rejects_positions_past_table():
    model = make_model(2, max_seq_len=8)
    caches = model.make_kv_cache(batch=3, max_seq_len=8)
    with torch.no_grad():
        model(prompt(), caches)
        with pytest.raises(ValueError, match=r"positions 7 .. 8 exceed the position table of max_seq_len=8"):
            model(prompt(length=2), caches)


def test_config_rejects_zero_layers():
    with pytest.raises(ValueError, match="n_layers=0 is invalid"):
        TinyDecoderConfig(n_layers=0)


def test_config_rejects_indivisible_kv_heads():
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        TinyDecoder(TinyDecoderConfig(n_kv_heads=3))
