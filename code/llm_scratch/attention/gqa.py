"""Grouped-query attention and multi-query attention.

Multi-query attention (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head
is All You Need") gives every query head the same single key-value head.
Grouped-query attention (Ainslie et al., 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints") splits the
``n_heads`` query heads into ``n_kv_heads`` groups of ``n_heads // n_kv_heads``
adjacent heads, each group sharing one key-value head. Both shrink the
key-value cache by the factor ``n_heads / n_kv_heads``.
"""

import torch

from llm_scratch.attention.base import _SelfAttention, repeat_kv
from llm_scratch.attention.mha import MultiHeadAttention

__all__ = ["GroupedQueryAttention", "MultiQueryAttention", "repeat_kv"]


def _mean_pool_heads(parameter: torch.Tensor, n_kv_heads: int, group_size: int) -> torch.Tensor:
    """Average the rows of a key or value projection over the heads of each group.

    ``parameter`` is a weight ``(n_heads * head_dim, d_model)`` or a bias
    ``(n_heads * head_dim,)``; the result has ``n_kv_heads * head_dim`` rows.
    """
    rows = parameter.size(0)
    head_dim = rows // (n_kv_heads * group_size)
    trailing = tuple(parameter.shape[1:])
    # (n_heads * head_dim, ...) -> (n_kv_heads, group_size, head_dim, ...)
    grouped = parameter.reshape(n_kv_heads, group_size, head_dim, *trailing)
    # (n_kv_heads, head_dim, ...) -> (n_kv_heads * head_dim, ...)
    return grouped.mean(dim=1).reshape(n_kv_heads * head_dim, *trailing)


class GroupedQueryAttention(_SelfAttention):
    """Grouped-query self-attention: ``n_heads`` query heads share ``n_kv_heads`` key-value heads.

    Query head ``h`` reads key-value head ``h // (n_heads // n_kv_heads)``, so
    each group is a run of adjacent query heads. ``n_kv_heads == n_heads`` is
    multi-head attention and ``n_kv_heads == 1`` is multi-query attention.

    The projections are ``nn.Linear`` layers named as in
    :class:`~llm_scratch.attention.MultiHeadAttention`. ``q_proj`` and
    ``o_proj`` have ``d_model`` output features, ``k_proj`` and ``v_proj``
    have ``n_kv_heads * head_dim``.

    :meth:`forward` takes ``(x, attn_mask=None, is_causal=True, kv_cache=None,
    *, positions=None)``. With a :class:`~llm_scratch.attention.KVCache` the
    new keys and values are appended to it, and the new queries attend over
    every cached position with the causal mask aligned bottom-right.

    With ``rope_base`` set, the queries and keys of every head are rotated by
    RoPE after the heads are split and before the keys are cached, as in
    Llama. The positions of the new tokens start at the cache length, so
    decoding token by token reproduces a forward pass over the whole
    sequence. A key-value head is rotated once, however many query heads
    share it.

    The ``backend`` attribute selects the attention core. ``"explicit"`` runs
    this package's
    :func:`~llm_scratch.attention.scaled_dot_product_attention`, with each
    group's query heads stacked along the sequence axis, so the keys and
    values are read once per group and never copied. ``"torch"`` runs
    ``torch.nn.functional.scaled_dot_product_attention`` with
    ``enable_gqa=True`` and an explicit bottom-right mask where PyTorch's
    top-left ``is_causal`` would differ.

    Args:
        d_model: width of the residual stream; must be divisible by ``n_heads``.
        n_heads: number of query heads; must be divisible by ``n_kv_heads``.
        n_kv_heads: number of key-value heads.
        bias: whether the four projections have a bias.
        dropout: probability of zeroing an attention weight, applied only in
            training mode.
        backend: ``"explicit"`` or ``"torch"``.
        rope_base: base of the RoPE frequencies applied to queries and keys,
            such as ``10000.0`` (Llama 2) or ``500000.0`` (Llama 3); ``None``
            for no position information.
        rope_layout: ``"split_halves"`` (Llama in Hugging Face transformers)
            or ``"interleaved"`` (RoFormer, DeepSeek) pairing of the rotated
            features; :func:`~llm_scratch.attention.convert_rope_weight`
            converts ``q_proj`` and ``k_proj`` between them.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "explicit",
        rope_base: float | None = None,
        rope_layout: str = "split_halves",
    ):
        super().__init__(
            d_model,
            n_heads,
            n_kv_heads,
            bias=bias,
            dropout=dropout,
            backend=backend,
            rope_base=rope_base,
            rope_layout=rope_layout,
        )

    @classmethod
    def from_mha(cls, mha: MultiHeadAttention, n_kv_heads: int) -> "GroupedQueryAttention":
        """Convert a multi-head attention layer by mean-pooling the key and value heads of each group.

        The key (and value) projection of group ``j`` is the mean of those of
        query heads ``j * group_size .. (j + 1) * group_size - 1``, which is how
        Ainslie et al. (2023) initialise a grouped-query model from a
        multi-head checkpoint before training it further. The query and output
        projections are copied unchanged. With ``n_kv_heads == mha.n_heads``
        the result computes exactly what ``mha`` computes.

        The new layer has the same dropout, backend, RoPE settings, dtype and
        device as ``mha``. RoPE rotates every key head by the same matrix, so
        mean-pooling the key projections equals mean-pooling the rotated keys.
        """
        if not isinstance(mha, MultiHeadAttention):
            raise ValueError(f"mha must be a MultiHeadAttention, got {type(mha).__name__}")
        weight = mha.q_proj.weight
        converted = cls._new_like(mha, n_kv_heads).to(dtype=weight.dtype, device=weight.device)

        with torch.no_grad():
            for name in ("q_proj", "o_proj"):
                converted.get_submodule(name).load_state_dict(mha.get_submodule(name).state_dict())
            for name in ("k_proj", "v_proj"):
                source = mha.get_submodule(name)
                target = converted.get_submodule(name)
                target.weight.copy_(_mean_pool_heads(source.weight, n_kv_heads, converted.group_size))
                if source.bias is not None:
                    target.bias.copy_(_mean_pool_heads(source.bias, n_kv_heads, converted.group_size))
        return converted

    @classmethod
    def _new_like(cls, mha: MultiHeadAttention, n_kv_heads: int) -> "GroupedQueryAttention":
        return cls(
            mha.d_model,
            mha.n_heads,
            n_kv_heads,
            bias=mha.q_proj.bias is not None,
            dropout=mha.dropout,
            backend=mha.backend,
            rope_base=mha.rope_base,
            rope_layout=mha.rope_layout,
        )


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query self-attention: every query head reads one shared key-value head.

    This is :class:`GroupedQueryAttention` with ``n_kv_heads == 1``;
    ``k_proj`` and ``v_proj`` have ``head_dim`` output features.

    Args:
        d_model: width of the residual stream; must be divisible by ``n_heads``.
        n_heads: number of query heads.
        bias: whether the four projections have a bias.
        dropout: probability of zeroing an attention weight, applied only in
            training mode.
        backend: ``"explicit"`` or ``"torch"``.
        rope_base, rope_layout: RoPE settings, as for
            :class:`GroupedQueryAttention`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "explicit",
        rope_base: float | None = None,
        rope_layout: str = "split_halves",
    ):
        super().__init__(
            d_model,
            n_heads,
            1,
            bias=bias,
            dropout=dropout,
            backend=backend,
            rope_base=rope_base,
            rope_layout=rope_layout,
        )

    @classmethod
    def from_mha(cls, mha: MultiHeadAttention, n_kv_heads: int = 1) -> "MultiQueryAttention":
        """Convert a multi-head attention layer by mean-pooling all its key and value heads into one.

        See :meth:`GroupedQueryAttention.from_mha`. ``n_kv_heads`` must be 1.
        """
        if n_kv_heads != 1:
            raise ValueError(
                f"n_kv_heads={n_kv_heads} is invalid for MultiQueryAttention; expected 1, or use "
                f"GroupedQueryAttention.from_mha"
            )
        return super().from_mha(mha, n_kv_heads)

    @classmethod
    def _new_like(cls, mha: MultiHeadAttention, n_kv_heads: int) -> "MultiQueryAttention":
        return cls(
            mha.d_model,
            mha.n_heads,
            bias=mha.q_proj.bias is not None,
            dropout=mha.dropout,
            backend=mha.backend,
            rope_base=mha.rope_base,
            rope_layout=mha.rope_layout,
        )
