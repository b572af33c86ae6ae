"""Multi-head attention (Vaswani et al., 2017, section 3.2.2)."""

from llm_scratch.attention.base import _SelfAttention


class MultiHeadAttention(_SelfAttention):
    """Multi-head self-attention with separate query, key, value and output projections.

    The projections are ``nn.Linear`` layers named ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj``, the names that Llama-style checkpoints use, so
    a state dict maps one to one. Each maps ``d_model`` features to
    ``d_model = n_heads * head_dim`` features. Every query head has its own
    key and value head, so ``n_kv_heads == n_heads``.

    :meth:`forward` takes ``(x, attn_mask=None, is_causal=True, kv_cache=None)``;
    see :class:`~llm_scratch.attention.GroupedQueryAttention` for the cache
    and the backends, which work the same here.

    Args:
        d_model: width of the residual stream; must be divisible by ``n_heads``.
        n_heads: number of attention heads.
        bias: whether the four projections have a bias.
        dropout: probability of zeroing an attention weight, applied only in
            training mode.
        backend: ``"explicit"`` to run this package's attention,
            ``"torch"`` to run PyTorch's fused kernel.
        rope_base: base of the RoPE frequencies applied to queries and keys,
            such as ``10000.0``; ``None`` for no position information.
        rope_layout: ``"split_halves"`` or ``"interleaved"`` pairing of the
            rotated features.
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
            n_heads,
            bias=bias,
            dropout=dropout,
            backend=backend,
            rope_base=rope_base,
            rope_layout=rope_layout,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"backend={self.backend!r}{self._rope_repr()}"
        )
