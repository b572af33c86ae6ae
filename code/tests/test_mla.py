"""Multi-head latent attention checked against Hugging Face's DeepseekV2Attention.

The absorbed path is also checked against the naive path, and the KV-cache
sizes against the per-token counts of DeepSeek-V2 and DeepSeek-V2-Lite: MLA
stores (kv_lora_rank + qk_rope_head_dim) values per layer, MHA 2 * n_heads * head_dim.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import DeepseekV2Config, DynamicCache
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
)

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.attention.mha import MultiHeadAttention
from llm_scratch.attention.mla import (
    MLAKVCache,
    MultiHeadLatentAttention,
    state_dict_from_hf,
    state_dict_to_hf,
)
from llm_scratch.attention.mla_config import MLAConfig, kv_cache_elements_per_token

# Every width differs from the others, so a swapped or misplaced axis changes a shape or a result.
SIZES = dict(d_model=48, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
Q_LORA_RANKS = [24, None]

# DeepseekV2Attention (transformers 5.25.0) computes RMSNorm, RoPE and softmax in
# float32 even for float64 inputs, so float64 outputs agree to float32 precision.
HF_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
PATHS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def make_config(q_lora_rank=24, **overrides):
    return MLAConfig(**{**SIZES, "q_lora_rank": q_lora_rank, **overrides})


def make_model(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = MultiHeadLatentAttention(config).to(dtype).eval()
    with torch.no_grad():
        # Norm scales away from 1, so a norm applied in the wrong place changes the output.
        model.kv_norm.weight.uniform_(0.5, 1.5)
        if config.q_lora_rank is not None:
            model.q_norm.weight.uniform_(0.5, 1.5)
    return model


def make_hf_pair(q_lora_rank, attention_bias=False, seed=0):
    """Build DeepseekV2Attention with random weights and our module with the same weights, in float64."""
    hf_config = DeepseekV2Config(
        hidden_size=SIZES["d_model"],
        num_attention_heads=SIZES["n_heads"],
        q_lora_rank=q_lora_rank,
        kv_lora_rank=SIZES["kv_lora_rank"],
        qk_nope_head_dim=SIZES["qk_nope_head_dim"],
        qk_rope_head_dim=SIZES["qk_rope_head_dim"],
        v_head_dim=SIZES["v_head_dim"],
        attention_bias=attention_bias,
        num_hidden_layers=1,
        vocab_size=16,
        intermediate_size=8,
        moe_intermediate_size=8,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    reference = DeepseekV2Attention(hf_config, layer_idx=0).double().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)

    ours = MultiHeadLatentAttention(MLAConfig.from_hf_config(hf_config)).double().eval()
    ours.load_hf_state_dict(reference.state_dict())
    return ours, reference, DeepseekV2RotaryEmbedding(hf_config)


def additive_causal_mask(query_len, key_len):
    """HF's additive mask, (1, 1, query_len, key_len), aligned bottom-right for cached decoding."""
    allowed = torch.ones(query_len, key_len, dtype=torch.bool).tril(diagonal=key_len - query_len)
    mask = torch.zeros(query_len, key_len, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


def inputs(batch, seq_len, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, SIZES["d_model"], dtype=dtype, generator=generator)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_prefill_matches_hf(q_lora_rank, absorb):
    ours, reference, rotary = make_hf_pair(q_lora_rank)
    x = inputs(2, 7)
    position_ids = torch.arange(7).expand(2, 7)

    position_embeddings = rotary(x, position_ids)

    expected, _ = reference(
        x, attention_mask=additive_causal_mask(7, 7), position_embeddings=position_embeddings
    )
    with torch.no_grad():
        actual = ours(x, absorb=absorb)

    assert actual.shape == (2, 7, SIZES["d_model"])
    torch.testing.assert_close(actual, expected, **HF_TOLERANCE)


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_bias_and_positions_match_hf(q_lora_rank):
    ours, reference, rotary = make_hf_pair(q_lora_rank, attention_bias=True, seed=2)
    x = inputs(2, 6, seed=3)
    # A different run of positions per sequence.
    position_ids = torch.stack((torch.arange(3, 9), torch.arange(40, 46)))

    position_embeddings = rotary(x, position_ids)

    expected, _ = reference(
        x, attention_mask=additive_causal_mask(6, 6), position_embeddings=position_embeddings
    )
    with torch.no_grad():
        naive = ours(x, positions=position_ids)
        absorbed = ours(x, positions=position_ids, absorb=True)

    torch.testing.assert_close(naive, expected, **HF_TOLERANCE)
    torch.testing.assert_close(absorbed, expected, **HF_TOLERANCE)


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_cached_decoding_matches_hf_cache(q_lora_rank):
    ours, reference, rotary = make_hf_pair(q_lora_rank, seed=4)
    x = inputs(2, 13, seed=5)
    position_embeddings = rotary(x, torch.arange(13).expand(2, 13))
    hf_cache = DynamicCache(config=reference.config)
    cache = ours.make_kv_cache(batch=2, max_seq_len=13)

    # Prefill 7 tokens, append 3, then 1 at a time.
    bounds = [(0, 7), (7, 10), (10, 11), (11, 12), (12, 13)]
    for start, end in bounds:
        expected, _ = reference(
            x[:, start:end],
            attention_mask=additive_causal_mask(end - start, end),
            position_embeddings=position_embeddings[:, start:end],
            cache=hf_cache,
        )
        with torch.no_grad():
            actual = ours(x[:, start:end], kv_cache=cache, absorb=True)
        torch.testing.assert_close(actual, expected, **HF_TOLERANCE, msg=f"tokens {start}..{end - 1}")

    # HF caches the same two tensors, each as a single head: (batch, 1, seq_len, features).
    hf_layer = hf_cache.layers[0]
    torch.testing.assert_close(cache.latent, hf_layer.keys[:, 0], **HF_TOLERANCE)
    torch.testing.assert_close(cache.k_rope, hf_layer.values[:, 0], **HF_TOLERANCE)


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_state_dict_round_trips_through_hf_names(q_lora_rank, attention_bias):
    ours, reference, _ = make_hf_pair(q_lora_rank, attention_bias=attention_bias)

    hf_names = ours.hf_state_dict()
    back = state_dict_from_hf(hf_names, ours.config)

    assert set(hf_names) == set(reference.state_dict())
    assert set(back) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name
    for name, tensor in reference.state_dict().items():
        assert torch.equal(hf_names[name], tensor), name


def test_state_dict_prefix_selects_one_layer():
    config = make_config()
    source = make_model(config, seed=6)
    prefix = "model.layers.3.self_attn."
    checkpoint = {prefix + name: tensor for name, tensor in source.hf_state_dict().items()}
    checkpoint["model.layers.3.mlp.down_proj.weight"] = torch.zeros(2, 2)
    checkpoint["model.layers.4.self_attn.o_proj.weight"] = torch.zeros(2, 2)

    target = make_model(config, seed=7)
    target.load_hf_state_dict(checkpoint, prefix=prefix)

    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_state_dict_mismatch_rejected():
    with_query_latent = make_model(make_config(q_lora_rank=24)).hf_state_dict()

    with pytest.raises(ValueError, match=r"missing \['q_proj.weight'\]"):
        state_dict_from_hf(with_query_latent, make_config(q_lora_rank=None))
    del with_query_latent["kv_b_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['kv_b_proj.weight'\]"):
        state_dict_from_hf(with_query_latent, make_config(q_lora_rank=24))


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_absorbed_equals_naive_prefill(q_lora_rank):
    model = make_model(make_config(q_lora_rank), seed=8)
    x = inputs(3, 9, dtype=torch.float32, seed=9)
    # Padding: the last two keys of the second sequence are masked.
    keep = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 7:] = False

    with torch.no_grad():
        for attn_mask, is_causal in [(None, True), (None, False), (keep, True)]:
            naive = model(x, attn_mask, is_causal)
            absorbed = model(x, attn_mask, is_causal, absorb=True)
            torch.testing.assert_close(absorbed, naive, **PATHS_TOLERANCE)


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_absorbed_equals_naive_cached_decoding(q_lora_rank):
    model = make_model(make_config(q_lora_rank), seed=10)
    x = inputs(2, 13, dtype=torch.float32, seed=11)
    naive_cache = model.make_kv_cache(2, 16)
    absorbed_cache = model.make_kv_cache(2, 16)

    with torch.no_grad():
        full = model(x)
        # Prefill 7 tokens, append 3, then 1 at a time.
        for start, end in [(0, 7), (7, 10), (10, 11), (11, 12), (12, 13)]:
            naive = model(x[:, start:end], kv_cache=naive_cache)
            absorbed = model(x[:, start:end], kv_cache=absorbed_cache, absorb=True)
            tokens = f"tokens {start}..{end - 1}"
            torch.testing.assert_close(absorbed, naive, **PATHS_TOLERANCE, msg=tokens)
            torch.testing.assert_close(naive, full[:, start:end], **PATHS_TOLERANCE, msg=tokens)

    assert naive_cache.seq_len == absorbed_cache.seq_len == 13
    torch.testing.assert_close(absorbed_cache.storage, naive_cache.storage, rtol=0, atol=0)


def test_softmax_scale_uses_query_key_width():
    config = make_config()

    assert config.qk_head_dim == 12 + 8
    assert config.softmax_scale == pytest.approx(20 ** -0.5)
    assert MultiHeadLatentAttention(config).softmax_scale == config.softmax_scale


def test_cache_stores_latent_and_rotated_key():
    config = make_config()
    model = make_model(config, seed=12)
    cache = model.make_kv_cache(batch=2, max_seq_len=12)
    x = inputs(2, 8, dtype=torch.float32, seed=13)

    assert cache.storage.shape == (2, 12, 16 + 8)
    assert cache.elements_per_token == 24
    assert cache.nbytes == 2 * 12 * 24 * 4

    with torch.no_grad():
        model(x[:, :7], kv_cache=cache)
        model(x[:, 7:], kv_cache=cache)
        cos, sin = model._rope_tables(x, None, 0)
        latent, k_rope = model.compress(x, cos, sin)

    assert cache.seq_len == 8
    assert cache.latent.shape == (2, 8, 16)
    assert cache.k_rope.shape == (2, 8, 8)
    assert cache.filled_nbytes == 2 * 8 * 24 * 4
    torch.testing.assert_close(cache.latent, latent)
    torch.testing.assert_close(cache.k_rope, k_rope)


def test_cache_rejects_overflow():
    model = make_model(make_config())
    cache = model.make_kv_cache(batch=1, max_seq_len=10)
    x = inputs(1, 14, dtype=torch.float32)

    with torch.no_grad():
        model(x[:, :8], kv_cache=cache)
        with pytest.raises(ValueError, match="cannot append 3 positions to an MLAKVCache holding 8"):
            model(x[:, 8:11], kv_cache=cache, absorb=True)
        assert cache.seq_len == 8
        model(x[:, 8:10], kv_cache=cache)
        with pytest.raises(ValueError, match="11 exceeds max_seq_len=10"):
            model(x[:, 10:11], kv_cache=cache)
        assert cache.seq_len == 10

    cache.reset()
    assert cache.seq_len == 0


def test_invalid_mask_leaves_cache_unchanged():
    model = make_model(make_config())
    cache = model.make_kv_cache(batch=2, max_seq_len=10)
    x = inputs(2, 5, dtype=torch.float32)

    with torch.no_grad():
        model(x[:, :3], kv_cache=cache)
        with pytest.raises(ValueError, match="does not broadcast"):
            model(x[:, 3:], torch.ones(2, 1, 1, 4, dtype=torch.bool), kv_cache=cache)

    assert cache.seq_len == 3


def test_cache_rejects_mismatched_entries():
    cache = MLAKVCache(2, kv_lora_rank=16, qk_rope_head_dim=8, max_seq_len=5)

    with pytest.raises(ValueError, match="latent has shape"):
        cache.append(torch.zeros(3, 1, 16), torch.zeros(3, 1, 8))
    with pytest.raises(ValueError, match="k_rope has shape"):
        cache.append(torch.zeros(2, 1, 16), torch.zeros(2, 1, 6))
    with pytest.raises(ValueError, match="latent holds 0 positions"):
        cache.append(torch.zeros(2, 0, 16), torch.zeros(2, 0, 8))
    with pytest.raises(ValueError, match="latent holds 2 positions and k_rope 1"):
        cache.append(torch.zeros(2, 2, 16), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="expected the cache's dtype torch.float32"):
        cache.append(torch.zeros(2, 1, 16, dtype=torch.float64), torch.zeros(2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_seq_len=0"):
        MLAKVCache(2, kv_lora_rank=16, qk_rope_head_dim=8, max_seq_len=0)
    assert cache.seq_len == 0


def test_cache_sizes_of_deepseek_v2():
    # DeepSeek-V2 has 60 layers, and its MHA counterpart would have 128 heads of 128 features.
    v2 = MLAConfig.deepseek_v2()
    mha = SimpleNamespace(n_heads=128, head_dim=128)

    assert kv_cache_elements_per_token(v2) == 576
    assert kv_cache_elements_per_token(v2, n_layers=60) == 34_560
    assert kv_cache_elements_per_token(mha, n_layers=60) == 1_966_080


def test_cache_sizes_of_deepseek_v2_lite():
    # DeepSeek-V2-Lite has 27 layers, and its MHA counterpart would have 16 heads of 128 features.
    lite = MLAConfig.deepseek_v2_lite()
    mha = SimpleNamespace(n_heads=16, head_dim=128)

    assert lite.q_lora_rank is None
    assert kv_cache_elements_per_token(lite, n_layers=27) == 15_552
    assert kv_cache_elements_per_token(mha, n_layers=27) == 110_592


def test_cache_sizes_of_grouped_and_multi_query():
    grouped = SimpleNamespace(n_heads=128, n_kv_heads=8, head_dim=128)
    multi_query = SimpleNamespace(n_heads=128, n_kv_heads=1, head_dim=128)

    assert kv_cache_elements_per_token(grouped, n_layers=60) == 2 * 8 * 128 * 60
    assert kv_cache_elements_per_token(multi_query, n_layers=60) == 2 * 128 * 60
    with pytest.raises(ValueError, match="n_layers=0"):
        kv_cache_elements_per_token(grouped, n_layers=0)
    with pytest.raises(ValueError, match="SimpleNamespace has neither"):
        kv_cache_elements_per_token(SimpleNamespace(n_heads=4))


def test_cache_formula_matches_mla_tensors():
    config = make_config()
    model = make_model(config)
    cache = model.make_kv_cache(batch=3, max_seq_len=5)

    with torch.no_grad():
        model(inputs(3, 5, dtype=torch.float32), kv_cache=cache, absorb=True)

    tokens = 3 * 5
    assert cache.latent.numel() + cache.k_rope.numel() == tokens * kv_cache_elements_per_token(config)
    assert cache.storage.numel() == tokens * kv_cache_elements_per_token(model)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cache_formula_matches_kv_cache_tensors(n_kv_heads):
    # The layers are the package's MHA (4 key-value heads), GQA and MQA, each with its own KVCache.
    layer = GroupedQueryAttention(d_model=32, n_heads=4, n_kv_heads=n_kv_heads)
    kv_cache = layer.make_kv_cache(batch=3, max_seq_len=5)

    with torch.no_grad():
        layer(torch.randn(3, 5, 32), kv_cache=kv_cache)

    tokens = 3 * 5
    assert kv_cache.keys.numel() + kv_cache.values.numel() == tokens * kv_cache_elements_per_token(layer)
    assert kv_cache_elements_per_token(layer) == 2 * n_kv_heads * 8
    assert kv_cache_elements_per_token(MultiHeadAttention(32, 4)) == 2 * 4 * 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 is odd"),
        (dict(qk_rope_head_dim=0), "qk_rope_head_dim=0"),
        (dict(kv_lora_rank=0), "kv_lora_rank=0"),
        (dict(q_lora_rank=0), "q_lora_rank=0"),
        (dict(q_lora_rank=-8), "q_lora_rank=-8"),
        (dict(n_heads=0), "n_heads=0"),
        (dict(d_model=48.0), "d_model=48.0"),
        (dict(qk_nope_head_dim=-1), "qk_nope_head_dim=-1"),
        (dict(v_head_dim=True), "v_head_dim=True"),
        (dict(rope_theta=0.0), "rope_theta=0.0"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06"),
        (dict(attention_bias="no"), "attention_bias='no'"),
    ],
)
def test_invalid_config_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_hf_config_with_yarn_rejected():
    hf_config = SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0})

    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        MLAConfig.from_hf_config(hf_config)


def test_forward_rejects_invalid_inputs():
    model = make_model(make_config())
    x = inputs(2, 5, dtype=torch.float32)

    with pytest.raises(ValueError, match=r"expected \(batch, seq_len, d_model=48\)"):
        model(torch.zeros(2, 5, 40))
    with pytest.raises(ValueError, match="positions has shape"):
        model(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match="kv_cache has dtype torch.float64"):
        model(x, kv_cache=MLAKVCache(2, 16, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="kv_cache has batch=1"):
        model(x, kv_cache=model.make_kv_cache(1, 8))
    with pytest.raises(ValueError, match="kv_cache has kv_lora_rank=32"):
        model(x, kv_cache=MLAKVCache(2, kv_lora_rank=32, qk_rope_head_dim=8, max_seq_len=8))


def test_state_dict_to_hf_returns_copies():
    model = make_model(make_config())
    converted = state_dict_to_hf(model.state_dict(), model.config)
    converted["o_proj.weight"].zero_()

    assert model.o_proj.weight.abs().sum() > 0


def test_cache_crop_then_append_matches_fresh_decoding():
    model = make_model(make_config(24), seed=12)
    x = inputs(2, 9, dtype=torch.float32, seed=13)
    other = inputs(2, 1, dtype=torch.float32, seed=14)
    cache = model.make_kv_cache(2, 12)

    with torch.no_grad():
        model(x[:, :8], kv_cache=cache)
        model(other, kv_cache=cache)
        cache.crop(8)
        after_crop = model(x[:, 8:], kv_cache=cache)
        full = model(x)

    assert cache.seq_len == 9
    torch.testing.assert_close(after_crop, full[:, 8:], **PATHS_TOLERANCE)


@pytest.mark.parametrize("seq_len", [-1, 3, 1.5])
def test_cache_crop_rejects_invalid_length(seq_len):
    model = make_model(make_config(24))
    cache = model.make_kv_cache(1, 4)
    with torch.no_grad():
        model(inputs(1, 2, dtype=torch.float32), kv_cache=cache)

    with pytest.raises(ValueError, match=f"seq_len={seq_len!r} is invalid"):
        cache.crop(seq_len)
