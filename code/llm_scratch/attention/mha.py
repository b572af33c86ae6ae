"""Multi-head attention (Vaswani et al., 2017, section 3.2.2)."""

import torch
from torch import Tensor, nn

from llm_scratch.attention.sdpa import (
    _attention_weights,
    causal_mask,
    check_mask,
    scaled_dot_product_attention,
)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections.

    The projections are ``nn.Linear`` layers named ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj``, the names that Llama-style checkpoints use, so
    a state dict maps one to one. Each maps ``d_model`` features to
    ``d_model = n_heads * head_dim`` features.

    Args:
        d_model: width of the residual stream; must be divisible by ``n_heads``.
        n_heads: number of attention heads.
        bias: whether the four projections have a bias.
        dropout: probability of zeroing an attention weight, applied only in
            training mode.
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r} is invalid; expected a positive int")
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads={n_heads!r} is invalid; expected a positive int")
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads "
                f"among the divisors of d_model"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is invalid; expected 0 <= dropout < 1")

        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout

        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}"

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"x has shape {tuple(x.shape)} (rank {x.dim()}); expected rank 3, "
                f"(batch, seq_len, d_model)"
            )
        if x.size(-1) != self.d_model:
            raise ValueError(
                f"x has {x.size(-1)} features in its last dimension; expected d_model={self.d_model}"
            )

    def _split_heads(self, projected: Tensor) -> Tensor:
        batch, seq_len, _ = projected.shape
        # (B, T, d_model) -> (B, T, n_heads, head_dim) -> (B, n_heads, T, head_dim)
        return projected.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check_input(x)
        query = self._split_heads(self.q_proj(x))
        key = self._split_heads(self.k_proj(x))
        value = self._split_heads(self.v_proj(x))
        return query, key, value

    def _combine_masks(self, attn_mask: Tensor | None, is_causal: bool, query: Tensor) -> Tensor | None:
        """Fold ``is_causal`` into ``attn_mask`` so a padding mask and causality can be combined."""
        if attn_mask is None:
            return None
        batch, n_heads, seq_len, _ = query.shape
        check_mask(attn_mask, (batch, n_heads, seq_len, seq_len))
        if not is_causal:
            return attn_mask
        device = query.device
        causal = causal_mask(seq_len, seq_len, device=device)
        if attn_mask.dtype == torch.bool:
            return attn_mask & causal
        blocked = torch.zeros(seq_len, seq_len, dtype=attn_mask.dtype, device=device)
        return attn_mask + blocked.masked_fill(~causal, float("-inf"))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = True) -> Tensor:
        """Attend over the sequence ``x`` of shape ``(batch, seq_len, d_model)``.

        Args:
            x: ``(batch, seq_len, d_model)``.
            attn_mask: boolean (``True`` means may attend) or additive float
                mask, broadcastable to ``(batch, n_heads, seq_len, seq_len)``;
                a padding mask is ``(batch, 1, 1, seq_len)``.
            is_causal: also apply the causal mask; combined with ``attn_mask``
                when both are given.

        Returns:
            ``(batch, seq_len, d_model)``.
        """
        query, key, value = self._project(x)  # each (B, n_heads, T, head_dim)
        batch, _, seq_len, _ = query.shape
        attn_mask = self._combine_masks(attn_mask, is_causal, query)
        dropout_p = self.dropout if self.training else 0.0

        attended = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal and attn_mask is None,
        )  # (B, n_heads, T, head_dim)

        # (B, n_heads, T, head_dim) -> (B, T, n_heads, head_dim) -> (B, T, d_model)
        merged = attended.transpose(1, 2).reshape(batch, seq_len, self.d_model)
        return self.o_proj(merged)

    @torch.no_grad()
    def attention_weights(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = True
    ) -> Tensor:
        """Return the attention weights of every head, ``(batch, n_heads, seq_len, seq_len)``.

        The weights are those :meth:`forward` uses, before dropout.
        """
        query, key, _ = self._project(x)
        attn_mask = self._combine_masks(attn_mask, is_causal, query)
        return _attention_weights(query, key, attn_mask, is_causal and attn_mask is None, None)
