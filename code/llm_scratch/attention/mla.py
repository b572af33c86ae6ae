"""Multi-head latent attention, MLA (DeepSeek-AI, 2024, "DeepSeek-V2", arXiv 2405.04434, section 2.1).

MLA compresses the keys and values of each token into one latent vector
``c_KV = W_DKV h`` of ``kv_lora_rank`` features, and expands it per head into
the key part ``k_C = W_UK c_KV`` and the value ``v_C = W_UV c_KV``. Queries go
through their own latent ``c_Q = W_DQ h`` to ``q_C = W_UQ c_Q``. RoPE applied
to ``k_C`` would put a position-dependent rotation between ``W_UK`` and the
query, and ``W_UK`` could no longer be folded into the query. Position is
therefore carried by separate, decoupled features (section 2.1.3): per-head
``q_R = RoPE(W_QR c_Q)`` and one key ``k_R = RoPE(W_KR h)`` shared by every
head. A head's score is
``(q_C . k_C + q_R . k_R) / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.
As in the released model, RMSNorm is applied to ``c_Q`` and ``c_KV``.

:class:`MultiHeadLatentAttention` has two inference paths that give the
same output:

* naive: expand the latents into per-head keys and values and attend as in
  multi-head attention;
* absorbed: fold ``W_UK`` into the query, attend over the latents
  ``[c_KV, k_R]`` directly, and apply ``W_UV`` after attending (paper,
  section 2.1.2).

Both read and write the same :class:`MLAKVCache`, which stores only ``c_KV``
and ``k_R``, ``kv_lora_rank + qk_rope_head_dim`` values per token and layer.
The naive path recomputes the per-head keys and values from it at each call.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from llm_scratch._checks import check_bool, check_input_dtype, check_positive_int, is_int
from llm_scratch.attention.base import combine_with_causal, fold_mask
from llm_scratch.attention.mla_config import MLAConfig
from llm_scratch.attention.rope import apply_rope, rope_cos_sin
from llm_scratch.attention.sdpa import causal_mask, check_mask, scaled_dot_product_attention

# DeepSeek-V2 pairs its rotated features as (2 i, 2 i + 1); see llm_scratch.attention.rope.
ROPE_LAYOUT = "interleaved"


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned scale, as DeepSeek-V2 applies to ``c_Q`` and ``c_KV``.

    ``y = x / sqrt(mean(x ** 2) + eps) * weight`` over the last axis. Half
    precision inputs are normalized in float32 and float64 inputs in float64,
    and the result has the dtype of ``x``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        x_compute = x.to(compute_dtype)
        mean_square = x_compute.pow(2).mean(dim=-1, keepdim=True)
        normalized = x_compute * torch.rsqrt(mean_square + self.eps)
        return normalized.to(x.dtype) * self.weight.to(x.dtype)


class MLAKVCache:
    """Key-value cache of one MLA layer: the latent ``c_KV`` and the rotated key ``k_R`` of each token.

    Both live in one preallocated tensor, ``storage``, of shape ``(batch,
    max_seq_len, kv_lora_rank + qk_rope_head_dim)``. Features
    ``[:kv_lora_rank]`` hold ``c_KV`` after its RMSNorm, and the rest hold
    ``k_R`` after RoPE, so a cached entry never changes once written.
    :meth:`append` writes one or more tokens after the filled ones, and the
    slots from ``seq_len`` on are never read. Like
    :class:`~llm_scratch.attention.KVCache` it is meant for inference and
    writes in place.

    Args:
        batch: number of sequences decoded together.
        kv_lora_rank: width of the latent ``c_KV``.
        qk_rope_head_dim: width of the rotated key ``k_R``; even.
        max_seq_len: positions the storage has room for, prompt included.
        dtype: dtype of the storage; must match the layer's.
        device: device of the storage; must match the layer's.
    """

    def __init__(
        self,
        batch: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        batch = check_positive_int("batch", batch)
        kv_lora_rank = check_positive_int("kv_lora_rank", kv_lora_rank)
        qk_rope_head_dim = check_positive_int("qk_rope_head_dim", qk_rope_head_dim)
        max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        if qk_rope_head_dim % 2 != 0:
            raise ValueError(
                f"qk_rope_head_dim={qk_rope_head_dim} is odd; RoPE rotates pairs of features, so "
                f"it must be even, as MLAConfig requires"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is invalid; expected a floating-point torch.dtype")

        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.storage = torch.zeros(
            batch, max_seq_len, kv_lora_rank + qk_rope_head_dim, dtype=dtype, device=device
        )
        self._seq_len = 0

    def __repr__(self) -> str:
        return (
            f"MLAKVCache(batch={self.batch}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_rope_head_dim={self.qk_rope_head_dim}, seq_len={self.seq_len}, "
            f"max_seq_len={self.max_seq_len}, dtype={self.dtype})"
        )

    @property
    def batch(self) -> int:
        return self.storage.size(0)

    @property
    def max_seq_len(self) -> int:
        return self.storage.size(1)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def seq_len(self) -> int:
        """Number of filled positions, which is also the position of the next token."""
        return self._seq_len

    @property
    def elements_per_token(self) -> int:
        """Values stored per token and sequence, ``kv_lora_rank + qk_rope_head_dim``."""
        return self.storage.size(-1)

    @property
    def latent(self) -> Tensor:
        """The cached ``c_KV``, a ``(batch, seq_len, kv_lora_rank)`` view of the storage."""
        return self.storage[:, : self._seq_len, : self.kv_lora_rank]

    @property
    def k_rope(self) -> Tensor:
        """The cached ``k_R``, a ``(batch, seq_len, qk_rope_head_dim)`` view of the storage."""
        return self.storage[:, : self._seq_len, self.kv_lora_rank :]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated storage, filled or not."""
        return self.storage.nbytes

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the filled positions of the storage."""
        return self.storage[:, : self._seq_len].nbytes

    def check_room(self, new_len: int) -> None:
        """Raise ``ValueError`` unless ``new_len`` more positions fit in the storage."""
        if self._seq_len + new_len > self.max_seq_len:
            raise ValueError(
                f"cannot append {new_len} positions to an MLAKVCache holding {self._seq_len}: "
                f"{self._seq_len + new_len} exceeds max_seq_len={self.max_seq_len}; reset() the "
                f"cache or allocate one with a larger max_seq_len"
            )

    def append(self, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Store the entries of new tokens and return ``(latent, k_rope)`` for every cached token.

        Args:
            latent: ``(batch, new_len, kv_lora_rank)``.
            k_rope: ``(batch, new_len, qk_rope_head_dim)``.

        Returns:
            Views ``(batch, seq_len, kv_lora_rank)`` and ``(batch, seq_len,
            qk_rope_head_dim)`` of the storage, where ``seq_len`` counts the
            new tokens.

        Raises:
            ValueError: if a shape or dtype does not match the cache, or if the
                new tokens would take it past ``max_seq_len``. The cache is
                unchanged then.
        """
        for name, tensor, width in (
            ("latent", latent, self.kv_lora_rank),
            ("k_rope", k_rope, self.qk_rope_head_dim),
        ):
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 3 or tensor.size(0) != self.batch or tensor.size(2) != width:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected (batch, new_len, features) "
                    f"= ({self.batch}, new_len, {width})"
                )
            if tensor.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {tensor.dtype}; expected the cache's dtype {self.dtype}")
        new_len = latent.size(1)
        if new_len < 1 or k_rope.size(1) != new_len:
            raise ValueError(
                f"latent holds {new_len} positions and k_rope {k_rope.size(1)}; expected the same "
                f"number, at least 1"
            )

        self.check_room(new_len)
        start, end = self._seq_len, self._seq_len + new_len
        self.storage[:, start:end, : self.kv_lora_rank] = latent
        self.storage[:, start:end, self.kv_lora_rank :] = k_rope
        self._seq_len = end
        return self.latent, self.k_rope

    def crop(self, seq_len: int) -> None:
        """Keep only the first ``seq_len`` positions, as :meth:`KVCache.crop` does.

        The storage is kept, and the dropped positions are overwritten by the
        next :meth:`append`.
        """
        if not is_int(seq_len) or not 0 <= seq_len <= self._seq_len:
            raise ValueError(
                f"seq_len={seq_len!r} is invalid; expected an int between 0 and the "
                f"{self._seq_len} filled positions"
            )
        self._seq_len = int(seq_len)

    def reset(self) -> None:
        """Empty the cache for a new prompt; the storage is kept and later overwritten."""
        self._seq_len = 0


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention from DeepSeek-V2, with a naive and an absorbed inference path.

    The projections are ``nn.Linear`` layers, one per matrix of the paper.
    ``q_down_proj`` and ``q_norm`` exist only when ``config.q_lora_rank`` is
    set; without them ``q_nope_proj`` and ``q_rope_proj`` read the hidden
    state ``h`` instead of ``c_Q``.

    ==================  =================================  ==============================================
    Module              Paper                              Hugging Face ``DeepseekV2Attention``
    ==================  =================================  ==============================================
    ``q_down_proj``     ``W_DQ``: h -> c_Q                 ``q_a_proj``
    ``q_norm``          RMSNorm on ``c_Q``                 ``q_a_layernorm``
    ``q_nope_proj``     ``W_UQ`` (``W_Q`` if no c_Q)       ``q_b_proj`` (``q_proj``), first
                                                           ``qk_nope_head_dim`` rows of each head
    ``q_rope_proj``     ``W_QR``                           ``q_b_proj`` (``q_proj``), last
                                                           ``qk_rope_head_dim`` rows of each head
    ``kv_down_proj``    ``W_DKV``: h -> c_KV               ``kv_a_proj_with_mqa``, first
                                                           ``kv_lora_rank`` rows
    ``k_rope_proj``     ``W_KR``: h -> k_R (before RoPE)   ``kv_a_proj_with_mqa``, last
                                                           ``qk_rope_head_dim`` rows
    ``kv_norm``         RMSNorm on ``c_KV``                ``kv_a_layernorm``
    ``k_nope_proj``     ``W_UK``: c_KV -> k_C              ``kv_b_proj``, first ``qk_nope_head_dim``
                                                           rows of each head
    ``v_proj``          ``W_UV``: c_KV -> v_C              ``kv_b_proj``, last ``v_head_dim`` rows of
                                                           each head
    ``o_proj``          ``W_O``                            ``o_proj``
    ==================  =================================  ==============================================

    The rows of each head are contiguous in Hugging Face's packed weights: the
    output of ``q_b_proj`` is viewed as ``(n_heads, qk_nope_head_dim +
    qk_rope_head_dim)`` and that of ``kv_b_proj`` as ``(n_heads,
    qk_nope_head_dim + v_head_dim)``. Biases, present with
    ``attention_bias``, split like their weights. :func:`state_dict_from_hf`
    and :func:`state_dict_to_hf` convert between the two sets of names.

    RoPE uses the interleaved layout, pairing features ``(2 i, 2 i + 1)``,
    like ``apply_rotary_emb`` of DeepseekV2 in transformers 5.25.0, which
    rotates ``q_pe`` and ``k_pe`` as complex numbers without reordering
    them. Weights therefore copy across without a RoPE permutation.
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise ValueError(f"config must be an MLAConfig, got {type(config).__name__}")
        self.config = config
        self.n_heads = config.n_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        bias = config.attention_bias

        if config.q_lora_rank is None:
            query_source_dim = config.d_model
        else:
            query_source_dim = config.q_lora_rank
            self.q_down_proj = nn.Linear(config.d_model, config.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
        self.q_nope_proj = nn.Linear(query_source_dim, config.n_heads * config.qk_nope_head_dim, bias=False)
        self.q_rope_proj = nn.Linear(query_source_dim, config.n_heads * config.qk_rope_head_dim, bias=False)

        self.kv_down_proj = nn.Linear(config.d_model, config.kv_lora_rank, bias=bias)
        self.k_rope_proj = nn.Linear(config.d_model, config.qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(config.kv_lora_rank, eps=config.rms_norm_eps)
        self.k_nope_proj = nn.Linear(
            config.kv_lora_rank, config.n_heads * config.qk_nope_head_dim, bias=False
        )
        self.v_proj = nn.Linear(config.kv_lora_rank, config.n_heads * config.v_head_dim, bias=False)

        self.o_proj = nn.Linear(config.n_heads * config.v_head_dim, config.d_model, bias=bias)

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"n_heads={config.n_heads}, q_lora_rank={config.q_lora_rank}, "
            f"kv_lora_rank={config.kv_lora_rank}, qk_nope_head_dim={config.qk_nope_head_dim}, "
            f"qk_rope_head_dim={config.qk_rope_head_dim}, v_head_dim={config.v_head_dim}"
        )

    def make_kv_cache(self, batch: int, max_seq_len: int) -> MLAKVCache:
        """Allocate an empty :class:`MLAKVCache` that fits this layer, on its device and in its dtype."""
        weight = self.kv_down_proj.weight
        return MLAKVCache(
            batch,
            self.kv_lora_rank,
            self.qk_rope_head_dim,
            max_seq_len,
            dtype=weight.dtype,
            device=weight.device,
        )

    def _check_input(self, x: Tensor, positions: Tensor | None, kv_cache: MLAKVCache | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.size(-1) != self.config.d_model:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (batch, seq_len, d_model={self.config.d_model})"
            )
        batch, seq_len, _ = x.shape
        if seq_len == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}, seq_len 0; expected at least 1 token")
        check_input_dtype(x, self.kv_down_proj.weight)

        if positions is not None:
            if not isinstance(positions, Tensor):
                raise ValueError(
                    f"positions must be a torch.Tensor of shape (seq_len={seq_len},) or (batch={batch}, "
                    f"seq_len={seq_len}), got {type(positions).__name__}; wrap it in torch.tensor()"
                )
            if positions.shape not in ((seq_len,), (batch, seq_len)):
                raise ValueError(
                    f"positions has shape {tuple(getattr(positions, 'shape', ()))}; expected "
                    f"(seq_len={seq_len},) or (batch={batch}, seq_len={seq_len})"
                )

        if kv_cache is not None:
            if not isinstance(kv_cache, MLAKVCache):
                raise ValueError(f"kv_cache must be an MLAKVCache or None, got {type(kv_cache).__name__}")
            cache_sizes = (kv_cache.kv_lora_rank, kv_cache.qk_rope_head_dim)
            if cache_sizes != (self.kv_lora_rank, self.qk_rope_head_dim):
                raise ValueError(
                    f"kv_cache has kv_lora_rank={kv_cache.kv_lora_rank} and qk_rope_head_dim="
                    f"{kv_cache.qk_rope_head_dim}; this layer has {self.kv_lora_rank} and "
                    f"{self.qk_rope_head_dim}. Allocate it with make_kv_cache()"
                )
            if kv_cache.batch != batch:
                raise ValueError(f"kv_cache has batch={kv_cache.batch}; x has batch {batch}")
            if kv_cache.dtype != x.dtype:
                raise ValueError(f"kv_cache has dtype {kv_cache.dtype}; x has dtype {x.dtype}")
            if kv_cache.device != x.device:
                raise ValueError(f"kv_cache is on {kv_cache.device}; x is on {x.device}")
            kv_cache.check_room(seq_len)

    def _rope_tables(self, x: Tensor, positions: Tensor | None, start: int) -> tuple[Tensor, Tensor]:
        if positions is None:
            positions = torch.arange(start, start + x.size(1), device=x.device)
        # Tables in at least float32, so half-precision inputs are rotated with float32 angles.
        table_dtype = torch.promote_types(x.dtype, torch.float32)
        return rope_cos_sin(
            positions, self.qk_rope_head_dim, self.config.rope_theta, layout=ROPE_LAYOUT, dtype=table_dtype
        )

    def project_queries(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Compute ``q_C`` and the rotated ``q_R`` of every head.

        Args:
            x: ``(batch, seq_len, d_model)``.
            cos, sin: RoPE tables for the tokens of ``x``, shaped as
                :func:`~llm_scratch.attention.rope.apply_rope` takes them.

        Returns:
            ``(batch, n_heads, seq_len, qk_nope_head_dim)`` and
            ``(batch, n_heads, seq_len, qk_rope_head_dim)``.
        """
        batch, seq_len, _ = x.shape
        source = x if self.config.q_lora_rank is None else self.q_norm(self.q_down_proj(x))

        # (B, T, n_heads * d) -> (B, T, n_heads, d) -> (B, n_heads, T, d)
        q_nope = self.q_nope_proj(source).view(batch, seq_len, self.n_heads, self.qk_nope_head_dim)
        q_nope = q_nope.transpose(1, 2)
        q_rope = self.q_rope_proj(source).view(batch, seq_len, self.n_heads, self.qk_rope_head_dim)
        q_rope = q_rope.transpose(1, 2)
        return q_nope, apply_rope(q_rope, cos, sin, layout=ROPE_LAYOUT)

    def compress(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Compute what the cache stores for each token: the normalized ``c_KV`` and the rotated ``k_R``.

        ``k_R`` is projected from the hidden state ``x``, not from the latent.

        Returns:
            ``(batch, seq_len, kv_lora_rank)`` and ``(batch, seq_len, qk_rope_head_dim)``.
        """
        batch, seq_len, _ = x.shape
        latent = self.kv_norm(self.kv_down_proj(x))

        # (B, T, d_R) -> (B, 1, T, d_R) for apply_rope, and back.
        k_rope = self.k_rope_proj(x).view(batch, 1, seq_len, self.qk_rope_head_dim)
        k_rope = apply_rope(k_rope, cos, sin, layout=ROPE_LAYOUT)
        return latent, k_rope.view(batch, seq_len, self.qk_rope_head_dim)

    def decompress(self, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Expand cached entries into the per-head keys and values that the naive path attends over.

        Args:
            latent: ``(batch, seq_len, kv_lora_rank)``.
            k_rope: ``(batch, seq_len, qk_rope_head_dim)``.

        Returns:
            Keys ``(batch, n_heads, seq_len, qk_nope_head_dim +
            qk_rope_head_dim)``, each head's ``[k_C, k_R]`` with the same
            ``k_R`` in every head, and values ``(batch, n_heads, seq_len,
            v_head_dim)``.
        """
        batch, seq_len, _ = latent.shape

        # (B, S, n_heads * d) -> (B, S, n_heads, d) -> (B, n_heads, S, d)
        k_nope = self.k_nope_proj(latent).view(batch, seq_len, self.n_heads, self.qk_nope_head_dim)
        k_nope = k_nope.transpose(1, 2)
        values = self.v_proj(latent).view(batch, seq_len, self.n_heads, self.v_head_dim).transpose(1, 2)

        # (B, S, d_R) -> (B, 1, S, d_R) -> (B, n_heads, S, d_R), a view without copies.
        k_rope_heads = k_rope.unsqueeze(1).expand(batch, self.n_heads, seq_len, self.qk_rope_head_dim)
        keys = torch.cat((k_nope, k_rope_heads), dim=-1)
        return keys, values

    def _attend_naive(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        latent: Tensor,
        k_rope: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        keys, values = self.decompress(latent, k_rope)
        query = torch.cat((q_nope, q_rope), dim=-1)  # (B, n_heads, T, qk_head_dim)
        return scaled_dot_product_attention(
            query, keys, values, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale
        )  # (B, n_heads, T, v_head_dim)

    def _attend_absorbed(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        latent: Tensor,
        k_rope: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        # q_C . (W_UK c) = (W_UK^T q_C) . c for each head, so the query moves into latent space.
        w_uk = self.k_nope_proj.weight.view(self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, n_heads, T, kv_lora_rank)
        query = torch.cat((q_latent, q_rope), dim=-1)  # (B, n_heads, T, kv_lora_rank + d_R)

        # Every head attends over the same keys and values, so the heads are stacked along the
        # query axis and one matmul per sequence serves them all. Broadcasting n_heads query
        # heads against one key head instead makes matmul copy the cached latents n_heads times.
        batch, n_heads, query_len, width = query.shape
        key_len = latent.size(1)
        # (B, n_heads, L, C + d_R) -> (B, 1, n_heads * L, C + d_R); head h fills rows h * L .. h * L + L - 1.
        folded = query.reshape(batch, 1, n_heads * query_len, width)
        if attn_mask is not None:
            attn_mask = self._fold_mask(attn_mask, query_len)
        elif is_causal and query_len > 1:
            # (L, S) -> (n_heads * L, S): every head repeats the same rows.
            attn_mask = causal_mask(query_len, key_len, device=query.device).repeat(n_heads, 1)
        # A single query sits at the last position and may attend to every key, so it needs no mask.

        # One key and value sequence shared by all heads: (B, S, .) -> (B, 1, S, .).
        key = torch.cat((latent, k_rope), dim=-1).unsqueeze(1)
        value = latent.unsqueeze(1)
        attended_latent = scaled_dot_product_attention(
            folded, key, value, attn_mask=attn_mask, scale=self.softmax_scale
        )  # (B, 1, n_heads * L, kv_lora_rank)
        # (B, 1, n_heads * L, kv_lora_rank) -> (B, n_heads, L, kv_lora_rank)
        attended_latent = attended_latent.view(batch, n_heads, query_len, self.kv_lora_rank)

        # Attention is linear in the values, so applying W_UV after attending equals attending over W_UV c.
        w_uv = self.v_proj.weight.view(self.n_heads, self.v_head_dim, self.kv_lora_rank)
        return torch.einsum("bhtc,hvc->bhtv", attended_latent, w_uv)  # (B, n_heads, T, v_head_dim)

    def _fold_mask(self, attn_mask: Tensor, query_len: int) -> Tensor:
        """Reshape a mask broadcastable to ``(B, n_heads, L, S)`` to ``(B or 1, 1, n_heads * L, S)``."""
        return fold_mask(attn_mask, self.n_heads, 1, query_len)

    def _combine_masks(
        self,
        attn_mask: Tensor | None,
        is_causal: bool,
        batch: int,
        query_len: int,
        key_len: int,
        device: torch.device,
    ) -> Tensor | None:
        """Fold ``is_causal`` into ``attn_mask`` so a padding mask and causality can be combined."""
        if attn_mask is None:
            return None
        check_mask(attn_mask, (batch, self.n_heads, query_len, key_len), device=device)
        if not is_causal:
            return attn_mask
        return combine_with_causal(attn_mask, query_len, key_len)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = True,
        kv_cache: MLAKVCache | None = None,
        *,
        positions: Tensor | None = None,
        absorb: bool = False,
    ) -> Tensor:
        """Attend over ``x`` and, when given, the tokens stored in ``kv_cache``.

        Args:
            x: ``(batch, seq_len, d_model)``, the new tokens.
            attn_mask: boolean (``True`` means may attend) or additive float
                mask, broadcastable to ``(batch, n_heads, seq_len, key_len)``,
                where ``key_len`` is ``seq_len`` plus the tokens already in
                ``kv_cache``. A padding mask is ``(batch, 1, 1, key_len)``.
            is_causal: also apply the causal mask, aligned bottom-right so the
                new tokens sit after the cached ones; combined with
                ``attn_mask`` when both are given.
            kv_cache: an :class:`MLAKVCache` for this layer. The new tokens'
                ``c_KV`` and ``k_R`` are appended to it, and the queries
                attend over every cached token. Both paths read and write the
                same layout.
            positions: RoPE positions of the new tokens, ``(seq_len,)`` or
                ``(batch, seq_len)``. By default ``kv_cache.seq_len`` onwards,
                or ``0 .. seq_len - 1`` without a cache.
            absorb: use the absorbed path instead of the naive one. Both give
                the same output up to rounding.

        Returns:
            ``(batch, seq_len, d_model)``.
        """
        check_bool("is_causal", is_causal)
        check_bool("absorb", absorb)
        self._check_input(x, positions, kv_cache)
        batch, seq_len, _ = x.shape
        cached_len = 0 if kv_cache is None else kv_cache.seq_len
        # Every check runs before the cache is written, so an invalid call leaves it unchanged.
        key_len = cached_len + seq_len
        attn_mask = self._combine_masks(attn_mask, is_causal, batch, seq_len, key_len, x.device)
        is_causal = is_causal and attn_mask is None

        cos, sin = self._rope_tables(x, positions, cached_len)
        q_nope, q_rope = self.project_queries(x, cos, sin)
        latent, k_rope = self.compress(x, cos, sin)
        if kv_cache is not None:
            # (B, key_len, kv_lora_rank) and (B, key_len, d_R): every cached token.
            latent, k_rope = kv_cache.append(latent, k_rope)

        attend = self._attend_absorbed if absorb else self._attend_naive
        attended = attend(q_nope, q_rope, latent, k_rope, attn_mask, is_causal)  # (B, n_heads, T, v_head_dim)

        # (B, n_heads, T, v_head_dim) -> (B, T, n_heads, v_head_dim) -> (B, T, n_heads * v_head_dim)
        merged = attended.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.v_head_dim)
        return self.o_proj(merged)

    def load_hf_state_dict(self, hf_state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
        """Copy the weights of a Hugging Face ``DeepseekV2Attention`` into this module.

        ``prefix`` selects one layer of a full checkpoint, for example
        ``"model.layers.0.self_attn."``. See :func:`state_dict_from_hf`.
        """
        self.load_state_dict(state_dict_from_hf(hf_state_dict, self.config, prefix=prefix))

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Return this module's weights under the names of Hugging Face's ``DeepseekV2Attention``."""
        return state_dict_to_hf(self.state_dict(), self.config)


def _split_heads_rows(weight: Tensor, n_heads: int, sizes: tuple[int, int]) -> tuple[Tensor, Tensor]:
    # (n_heads * (a + b), in) -> (n_heads, a + b, in) -> (n_heads, a, in) and (n_heads, b, in)
    # -> (n_heads * a, in) and (n_heads * b, in). A bias has no "in" axis.
    per_head = weight.reshape(n_heads, sum(sizes), *weight.shape[1:])
    first, second = per_head.split(sizes, dim=1)
    return (
        first.reshape(n_heads * sizes[0], *weight.shape[1:]),
        second.reshape(n_heads * sizes[1], *weight.shape[1:]),
    )


def _join_heads_rows(first: Tensor, second: Tensor, n_heads: int) -> Tensor:
    # (n_heads * a, in), (n_heads * b, in) -> (n_heads, a + b, in) -> (n_heads * (a + b), in)
    first_per_head = first.reshape(n_heads, -1, *first.shape[1:])
    second_per_head = second.reshape(n_heads, -1, *second.shape[1:])
    per_head = torch.cat((first_per_head, second_per_head), dim=1)
    return per_head.reshape(-1, *first.shape[1:])


def _hf_key_names(config: MLAConfig) -> list[str]:
    names = ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if config.q_lora_rank is None:
        names.append("q_proj.weight")
    else:
        names += ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
    if config.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"]
        if config.q_lora_rank is not None:
            names.append("q_a_proj.bias")
    return names


def _module_key_names(config: MLAConfig) -> list[str]:
    names = [
        "q_nope_proj.weight",
        "q_rope_proj.weight",
        "kv_down_proj.weight",
        "k_rope_proj.weight",
        "kv_norm.weight",
        "k_nope_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
    ]
    if config.q_lora_rank is not None:
        names += ["q_down_proj.weight", "q_norm.weight"]
    if config.attention_bias:
        names += ["kv_down_proj.bias", "k_rope_proj.bias", "o_proj.bias"]
        if config.q_lora_rank is not None:
            names.append("q_down_proj.bias")
    return names


def state_dict_from_hf(
    hf_state_dict: Mapping[str, Tensor], config: MLAConfig, prefix: str = ""
) -> dict[str, Tensor]:
    """Convert the weights of ``DeepseekV2Attention`` to the names of :class:`MultiHeadLatentAttention`.

    The mapping is the table in :class:`MultiHeadLatentAttention`'s
    docstring. Only keys starting with ``prefix`` are read, with the prefix
    removed. No RoPE permutation is needed, because both implementations
    pair the rotated features as ``(2 i, 2 i + 1)``.

    Raises:
        ValueError: if a key that ``config`` needs is missing, or a key under
            ``prefix`` is not a known attention weight.
    """
    weights = {
        name[len(prefix) :]: tensor for name, tensor in hf_state_dict.items() if name.startswith(prefix)
    }
    expected = _hf_key_names(config)
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the DeepseekV2Attention weights under prefix {prefix!r} do not match the config: "
            f"missing {missing}, unexpected {unexpected}; check q_lora_rank and attention_bias"
        )

    n_heads = config.n_heads
    converted = {}
    if config.q_lora_rank is None:
        packed_query = weights["q_proj.weight"]
    else:
        converted["q_down_proj.weight"] = weights["q_a_proj.weight"]
        if config.attention_bias:
            converted["q_down_proj.bias"] = weights["q_a_proj.bias"]
        converted["q_norm.weight"] = weights["q_a_layernorm.weight"]
        packed_query = weights["q_b_proj.weight"]
    converted["q_nope_proj.weight"], converted["q_rope_proj.weight"] = _split_heads_rows(
        packed_query, n_heads, (config.qk_nope_head_dim, config.qk_rope_head_dim)
    )

    down_sizes = [config.kv_lora_rank, config.qk_rope_head_dim]
    kv_down_weight, k_rope_weight = weights["kv_a_proj_with_mqa.weight"].split(down_sizes)
    converted["kv_down_proj.weight"], converted["k_rope_proj.weight"] = kv_down_weight, k_rope_weight
    if config.attention_bias:
        kv_down_bias, k_rope_bias = weights["kv_a_proj_with_mqa.bias"].split(down_sizes)
        converted["kv_down_proj.bias"], converted["k_rope_proj.bias"] = kv_down_bias, k_rope_bias
    converted["kv_norm.weight"] = weights["kv_a_layernorm.weight"]
    converted["k_nope_proj.weight"], converted["v_proj.weight"] = _split_heads_rows(
        weights["kv_b_proj.weight"], n_heads, (config.qk_nope_head_dim, config.v_head_dim)
    )

    converted["o_proj.weight"] = weights["o_proj.weight"]
    if config.attention_bias:
        converted["o_proj.bias"] = weights["o_proj.bias"]
    return {name: tensor.clone() for name, tensor in converted.items()}


def state_dict_to_hf(state_dict: Mapping[str, Tensor], config: MLAConfig) -> dict[str, Tensor]:
    """Convert a :class:`MultiHeadLatentAttention` state dict to the packed names of ``DeepseekV2Attention``.

    This is the inverse of :func:`state_dict_from_hf`.

    Raises:
        ValueError: if a weight that ``config`` needs is missing from ``state_dict``.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    missing = [name for name in _module_key_names(config) if name not in state_dict]
    if missing:
        raise ValueError(
            f"state_dict is missing the MultiHeadLatentAttention weights {missing}; pass the "
            f"state_dict() of a module built from this config, and check q_lora_rank and attention_bias"
        )

    n_heads = config.n_heads
    converted = {}
    packed_query = _join_heads_rows(
        state_dict["q_nope_proj.weight"], state_dict["q_rope_proj.weight"], n_heads
    )
    if config.q_lora_rank is None:
        converted["q_proj.weight"] = packed_query
    else:
        converted["q_a_proj.weight"] = state_dict["q_down_proj.weight"]
        if config.attention_bias:
            converted["q_a_proj.bias"] = state_dict["q_down_proj.bias"]
        converted["q_a_layernorm.weight"] = state_dict["q_norm.weight"]
        converted["q_b_proj.weight"] = packed_query

    converted["kv_a_proj_with_mqa.weight"] = torch.cat(
        (state_dict["kv_down_proj.weight"], state_dict["k_rope_proj.weight"])
    )
    if config.attention_bias:
        converted["kv_a_proj_with_mqa.bias"] = torch.cat(
            (state_dict["kv_down_proj.bias"], state_dict["k_rope_proj.bias"])
        )
    converted["kv_a_layernorm.weight"] = state_dict["kv_norm.weight"]
    converted["kv_b_proj.weight"] = _join_heads_rows(
        state_dict["k_nope_proj.weight"], state_dict["v_proj.weight"], n_heads
    )

    converted["o_proj.weight"] = state_dict["o_proj.weight"]
    if config.attention_bias:
        converted["o_proj.bias"] = state_dict["o_proj.bias"]
    return {name: tensor.clone() for name, tensor in converted.items()}
