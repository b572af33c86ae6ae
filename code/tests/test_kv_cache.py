"""KVCache and ModelKVCache, alone and inside the attention layers."""

import pytest
import torch

from llm_scratch.attention import (
    GroupedQueryAttention,
    KVCache,
    ModelKVCache,
    MultiHeadAttention,
    MultiQueryAttention,
    kv_cache_bytes_per_token,
)

BACKENDS = ["explicit", "torch"]
# Prefill 7 tokens, then 3 at once, then one at a time.
SCHEDULE = [7, 3, 1, 1, 1]


def random_kv(batch, n_kv_heads, seq_len, head_dim, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n_kv_heads, seq_len, head_dim, dtype=dtype, generator=generator)
    values = torch.randn(batch, n_kv_heads, seq_len, head_dim, dtype=dtype, generator=generator)
    return keys, values


def make_layer(kind, backend, dtype=torch.float32, seed=0):
    """Build one attention layer of each kind with d_model=24, n_heads=6."""
    torch.manual_seed(seed)
    if kind == "mha":
        layer = MultiHeadAttention(24, 6, bias=True, backend=backend)
    elif kind == "gqa":
        layer = GroupedQueryAttention(24, 6, 2, bias=True, backend=backend)
    else:
        layer = MultiQueryAttention(24, 6, bias=True, backend=backend)
    return layer.to(dtype).eval()


def decode_in_steps(layer, x, schedule, cache, **kwargs):
    """Feed ``x`` to ``layer`` in chunks of the lengths in ``schedule`` and join the outputs."""
    outputs, start = [], 0
    for length in schedule:
        outputs.append(layer(x[:, start : start + length], kv_cache=cache, **kwargs))
        start += length
    return torch.cat(outputs, dim=1)


# The cache on its own.


def test_prefill_stores_keys_and_values():
    cache = KVCache(2, 3, 4, max_seq_len=10)
    keys, values = random_kv(2, 3, 7, 4)

    cached_keys, cached_values = cache.append(keys, values)

    assert cache.seq_len == 7
    assert cached_keys.shape == (2, 3, 7, 4)
    assert torch.equal(cached_keys, keys)
    assert torch.equal(cached_values, values)


def test_appends_extend_the_sequence():
    cache = KVCache(2, 3, 4, max_seq_len=12)
    keys, values = random_kv(2, 3, 12, 4)

    cache.append(keys[:, :, :7], values[:, :, :7])
    cache.append(keys[:, :, 7:10], values[:, :, 7:10])
    cache.append(keys[:, :, 10:11], values[:, :, 10:11])
    cached_keys, cached_values = cache.append(keys[:, :, 11:], values[:, :, 11:])

    assert cache.seq_len == 12
    assert torch.equal(cached_keys, keys)
    assert torch.equal(cached_values, values)
    assert torch.equal(cache.keys, keys)
    assert torch.equal(cache.values, values)


def test_reset_empties_the_cache():
    cache = KVCache(1, 2, 4, max_seq_len=8)
    first = random_kv(1, 2, 6, 4, seed=0)
    second = random_kv(1, 2, 3, 4, seed=1)
    cache.append(*first)

    cache.reset()
    cached_keys, _ = cache.append(*second)

    assert cache.seq_len == 3
    assert torch.equal(cached_keys, second[0])


def test_crop_drops_later_positions():
    cache = KVCache(1, 2, 4, max_seq_len=10)
    keys, values = random_kv(1, 2, 9, 4)
    cache.append(keys[:, :, :6], values[:, :, :6])

    cache.crop(4)
    cached_keys, cached_values = cache.append(keys[:, :, 4:9], values[:, :, 4:9])

    assert cache.seq_len == 9
    assert torch.equal(cached_keys, keys)
    assert torch.equal(cached_values, values)


@pytest.mark.parametrize("seq_len", [-1, 7])
def test_crop_rejects_length_outside_filled(seq_len):
    cache = KVCache(1, 2, 4, max_seq_len=10)
    cache.append(*random_kv(1, 2, 6, 4))
    with pytest.raises(ValueError, match=f"seq_len={seq_len} is invalid; expected an int between 0 and the 6 filled"):
        cache.crop(seq_len)


def test_cache_storage_layout():
    cache = KVCache(2, 3, 5, max_seq_len=9, dtype=torch.float16)

    assert cache.key_storage.shape == (2, 3, 9, 5)
    assert cache.value_storage.shape == (2, 3, 9, 5)
    assert cache.dtype == torch.float16
    assert cache.seq_len == 0
    assert cache.keys.shape == (2, 3, 0, 5)


def test_overflow_raises_and_keeps_contents():
    cache = KVCache(1, 2, 4, max_seq_len=8)
    keys, values = random_kv(1, 2, 10, 4)
    cache.append(keys[:, :, :7], values[:, :, :7])

    with pytest.raises(ValueError, match="cannot append 3 positions to a KVCache holding 7: 10 exceeds max_seq_len=8"):
        cache.append(keys[:, :, 7:], values[:, :, 7:])
    assert cache.seq_len == 7
    assert torch.equal(cache.keys, keys[:, :, :7])


def test_append_rejects_wrong_heads():
    cache = KVCache(2, 3, 4, max_seq_len=8)
    keys, values = random_kv(2, 6, 1, 4)
    with pytest.raises(ValueError, match=r"keys has shape \(2, 6, 1, 4\); expected .* = \(2, 3, new_len, 4\)"):
        cache.append(keys, values)


def test_append_rejects_wrong_dtype():
    cache = KVCache(2, 3, 4, max_seq_len=8)
    keys, values = random_kv(2, 3, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="keys has dtype torch.float64; expected the cache's dtype torch.float32"):
        cache.append(keys, values)


def test_append_rejects_different_lengths():
    cache = KVCache(2, 3, 4, max_seq_len=8)
    keys, _ = random_kv(2, 3, 2, 4)
    _, values = random_kv(2, 3, 3, 4)
    with pytest.raises(ValueError, match="keys hold 2 positions but values hold 3"):
        cache.append(keys, values)


@pytest.mark.parametrize("name, value", [("batch", 0), ("n_kv_heads", -1), ("max_seq_len", 0)])
def test_cache_rejects_non_positive_sizes(name, value):
    sizes = dict(batch=2, n_kv_heads=3, head_dim=4, max_seq_len=8)
    sizes[name] = value
    with pytest.raises(ValueError, match=f"{name}={value} is invalid; expected a positive int"):
        KVCache(**sizes)


def test_cache_rejects_integer_dtype():
    with pytest.raises(ValueError, match="dtype=torch.int64 is invalid"):
        KVCache(1, 1, 4, 8, dtype=torch.int64)


# Memory: the byte count of the real tensors against the formula.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_model_cache_bytes_match_formula(dtype):
    n_layers, batch, n_kv_heads, head_dim, max_seq_len = 3, 2, 5, 6, 11
    caches = ModelKVCache(n_layers, batch, n_kv_heads, head_dim, max_seq_len, dtype=dtype)
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * n_kv_heads * head_dim * n_layers * bytes_per_element

    assert caches.nbytes == batch * max_seq_len * per_token
    assert kv_cache_bytes_per_token(n_layers, n_kv_heads, head_dim, dtype) == per_token


def test_filled_bytes_count_filled_positions():
    caches = ModelKVCache(2, 3, 4, 8, 16)
    for cache in caches:
        cache.append(*random_kv(3, 4, 7, 8))
    per_token = 2 * 4 * 8 * 2 * 4  # 2 * n_kv_heads * head_dim * n_layers * float32 bytes

    assert caches.filled_nbytes == 3 * 7 * per_token


def test_layer_cache_holds_kv_heads_unrepeated():
    layer = make_layer("gqa", "explicit")
    cache = layer.make_kv_cache(batch=2, max_seq_len=10)
    x = torch.randn(2, 7, 24)

    with torch.no_grad():
        layer(x, kv_cache=cache)
        expected_keys = layer.k_proj(x).view(2, 7, 2, 4).transpose(1, 2)

    assert cache.keys.shape == (2, 2, 7, 4)
    torch.testing.assert_close(cache.keys, expected_keys, atol=0, rtol=0)
    # A grouped-query layer with n_heads=6, n_kv_heads=2 stores a third of what MHA stores.
    mha_cache = make_layer("mha", "explicit").make_kv_cache(batch=2, max_seq_len=10)
    assert mha_cache.nbytes == 3 * cache.nbytes


def test_llama_like_bytes_per_token():
    # 32 layers with 32 key-value heads of 128 features in float16: half a MiB per token.
    assert kv_cache_bytes_per_token(32, 32, 128, torch.float16) == 512 * 1024
    # With 8 key-value heads (grouped-query attention), a quarter of that.
    assert kv_cache_bytes_per_token(32, 8, 128, torch.float16) == 128 * 1024


def test_model_cache_indexing_and_reset():
    caches = ModelKVCache(3, 1, 2, 4, 8)
    for cache in caches:
        cache.append(*random_kv(1, 2, 5, 4))

    assert len(caches) == 3
    assert caches[2] is caches.layers[2]
    assert caches.seq_len == 5
    caches.crop(2)
    assert [cache.seq_len for cache in caches] == [2, 2, 2]
    caches.reset()
    assert [cache.seq_len for cache in caches] == [0, 0, 0]


def test_model_cache_rejects_zero_layers():
    with pytest.raises(ValueError, match="n_layers=0 is invalid"):
        ModelKVCache(0, 1, 2, 4, 8)


# The cache inside the attention layers.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_cached_decoding_equals_full_forward(kind, backend):
    layer = make_layer(kind, backend)
    x = torch.randn(2, sum(SCHEDULE), 24, generator=torch.Generator().manual_seed(1))
    cache = layer.make_kv_cache(batch=2, max_seq_len=16)

    with torch.no_grad():
        expected = layer(x)
        actual = decode_in_steps(layer, x, SCHEDULE, cache)

    assert cache.seq_len == sum(SCHEDULE)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_cached_decoding_agrees_across_backends(kind):
    explicit = make_layer(kind, "explicit", dtype=torch.float64)
    fused = make_layer(kind, "torch", dtype=torch.float64)
    x = torch.randn(3, sum(SCHEDULE), 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        from_explicit = decode_in_steps(explicit, x, SCHEDULE, explicit.make_kv_cache(3, 13))
        from_fused = decode_in_steps(fused, x, SCHEDULE, fused.make_kv_cache(3, 13))

    torch.testing.assert_close(from_explicit, from_fused, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_cached_decoding_with_padding_mask(kind, backend):
    layer = make_layer(kind, backend, dtype=torch.float64)
    x = torch.randn(2, 10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # The second sequence's positions 1 and 2 are padding, hidden from every later query.
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 1:3] = False
    full_mask = keep[:, None, None, :]  # (2, 1, 1, 10)
    cache = layer.make_kv_cache(2, 10)

    with torch.no_grad():
        expected = layer(x, attn_mask=full_mask)
        prefill = layer(x[:, :7], attn_mask=full_mask[..., :7], kv_cache=cache)
        chunk = layer(x[:, 7:], attn_mask=full_mask, kv_cache=cache)

    torch.testing.assert_close(prefill, expected[:, :7], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(chunk, expected[:, 7:], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_unfilled_cache_slots_are_never_read(kind, backend):
    layer = make_layer(kind, backend)
    x = torch.randn(2, sum(SCHEDULE), 24, generator=torch.Generator().manual_seed(4))
    clean = layer.make_kv_cache(2, 16)
    poisoned = layer.make_kv_cache(2, 16)
    poisoned.key_storage.fill_(float("nan"))
    poisoned.value_storage.fill_(float("nan"))

    with torch.no_grad():
        expected = decode_in_steps(layer, x, SCHEDULE, clean)
        actual = decode_in_steps(layer, x, SCHEDULE, poisoned)

    assert torch.isfinite(actual).all()
    assert torch.equal(actual, expected)


def test_stale_slots_after_reset_are_never_read():
    layer = make_layer("gqa", "explicit")
    x = torch.randn(1, 9, 24, generator=torch.Generator().manual_seed(5))
    cache = layer.make_kv_cache(1, 16)

    with torch.no_grad():
        layer(torch.full((1, 16, 24), 1e4), kv_cache=cache)
        cache.reset()
        reused = decode_in_steps(layer, x, [5, 1, 3], cache)
        fresh = decode_in_steps(layer, x, [5, 1, 3], layer.make_kv_cache(1, 16))

    assert torch.equal(reused, fresh)


def test_layer_overflow_leaves_cache_unchanged():
    layer = make_layer("gqa", "explicit")
    cache = layer.make_kv_cache(1, 8)

    with torch.no_grad():
        layer(torch.randn(1, 7, 24), kv_cache=cache)
        with pytest.raises(ValueError, match="cannot append 3 positions to a KVCache holding 7: 10 exceeds max_seq_len=8"):
            layer(torch.randn(1, 3, 24), kv_cache=cache)

    assert cache.seq_len == 7


def test_invalid_mask_leaves_cache_unchanged():
    layer = make_layer("mha", "explicit")
    cache = layer.make_kv_cache(2, 8)

    with torch.no_grad():
        layer(torch.randn(2, 4, 24), kv_cache=cache)
        # The keys after this call number 6, so a mask over 2 positions does not broadcast.
        wrong = torch.ones(2, 1, 1, 2, dtype=torch.bool)
        with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 1, 2\) does not broadcast"):
            layer(torch.randn(2, 2, 24), attn_mask=wrong, kv_cache=cache)

    assert cache.seq_len == 4


def test_layer_rejects_cache_with_other_kv_heads():
    gqa = make_layer("gqa", "explicit")
    mha_cache = make_layer("mha", "explicit").make_kv_cache(2, 8)
    with pytest.raises(ValueError, match="kv_cache has n_kv_heads=6, but this layer has n_kv_heads=2"):
        gqa(torch.randn(2, 3, 24), kv_cache=mha_cache)


def test_layer_rejects_cache_with_other_head_dim():
    layer = make_layer("mqa", "explicit")
    with pytest.raises(ValueError, match="kv_cache has head_dim=8, but this layer has head_dim=4"):
        layer(torch.randn(2, 3, 24), kv_cache=KVCache(2, 1, 8, 8))


def test_layer_rejects_cache_with_other_batch():
    layer = make_layer("mha", "explicit")
    with pytest.raises(ValueError, match="kv_cache has batch=3, but x has batch=2"):
        layer(torch.randn(2, 3, 24), kv_cache=layer.make_kv_cache(3, 8))


def test_layer_rejects_cache_with_other_dtype():
    layer = make_layer("gqa", "torch")
    cache = KVCache(2, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="kv_cache has dtype=torch.float64, but the keys projected from x have dtype=torch.float32"):
        layer(torch.randn(2, 3, 24), kv_cache=cache)


def test_layer_rejects_model_cache():
    layer = make_layer("gqa", "explicit")
    with pytest.raises(ValueError, match="kv_cache must be a KVCache, got ModelKVCache; pass one layer's cache"):
        layer(torch.randn(2, 3, 24), kv_cache=ModelKVCache(2, 2, 2, 4, 8))


def test_make_kv_cache_matches_layer():
    layer = make_layer("gqa", "explicit", dtype=torch.float64)

    cache = layer.make_kv_cache(batch=3, max_seq_len=20)

    assert (cache.batch, cache.n_kv_heads, cache.head_dim, cache.max_seq_len) == (3, 2, 4, 20)
    assert cache.dtype == torch.float64
