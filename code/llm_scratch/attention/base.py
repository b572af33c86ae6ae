"""The self-attention layer shared by multi-head, grouped-query and multi-query attention.

All three variants project ``n_heads`` query heads and ``n_kv_heads`` key-value
heads, and query head ``h`` reads key-value head ``h // (n_heads // n_kv_heads)``.
Multi-head attention is the case ``n_kv_heads == n_heads`` and multi-query
attention the case ``n_kv_heads == 1``. The public classes live in
:mod:`llm_scratch.attention.mha` and :mod:`llm_scratch.attention.gqa`.

With ``rope_base`` set, the layer applies rotary position embedding to the
queries and keys of every head after the heads are split and before the keys
are cached, as Llama does (Su et al., 2021, "RoFormer: Enhanced Transformer
with Rotary Position Embedding").
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_scratch._checks import (
    check_bool,
    check_input_dtype,
    check_positive_int,
    check_probability,
    is_int,
)
from llm_scratch.attention.kv_cache import KVCache
from llm_scratch.attention.rope import (
    ROPE_LAYOUTS,
    _check_base,
    apply_rope,
    rope_cos_sin,
)
from llm_scratch.attention.sdpa import (
    _attention_weights,
    causal_mask,
    check_mask,
    scaled_dot_product_attention,
)

BACKENDS = ("explicit", "torch")


def repeat_kv(kv: Tensor, group_size: int) -> Tensor:
    """Repeat each key or value head ``group_size`` times along the head axis (dim 1).

    ``(batch, n_kv_heads, seq_len, head_dim)`` becomes
    ``(batch, n_kv_heads * group_size, seq_len, head_dim)``. The copies of one
    head are adjacent, so output head ``h`` is input head ``h // group_size``:
    the key-value head that query head ``h`` reads in grouped-query attention.
    This equals ``torch.repeat_interleave(kv, group_size, dim=1)``. Tiling
    with ``kv.repeat(1, group_size, 1, 1)`` instead puts input head
    ``h % n_kv_heads`` at position ``h`` and pairs queries with the keys of
    another group.
    """
    if not isinstance(kv, Tensor) or kv.dim() != 4:
        shape = tuple(kv.shape) if isinstance(kv, Tensor) else type(kv).__name__
        raise ValueError(f"kv has shape {shape}; expected (batch, n_kv_heads, seq_len, head_dim)")
    if not is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is invalid; expected a positive int")
    group_size = int(group_size)
    if group_size == 1:
        return kv
    batch, n_kv_heads, seq_len, head_dim = kv.shape
    # (B, n_kv_heads, T, head_dim) -> (B, n_kv_heads, group_size, T, head_dim), a view
    expanded = kv[:, :, None].expand(batch, n_kv_heads, group_size, seq_len, head_dim)
    # (B, n_kv_heads, group_size, T, head_dim) -> (B, n_kv_heads * group_size, T, head_dim): a copy,
    # except when n_kv_heads == 1, where reshape returns a stride-0 view of kv.
    return expanded.reshape(batch, n_kv_heads * group_size, seq_len, head_dim)


def combine_with_causal(attn_mask: Tensor, query_len: int, key_len: int) -> Tensor:
    """Combine a boolean or additive ``attn_mask`` with the bottom-right causal mask of ``(query_len, key_len)``."""
    causal = causal_mask(query_len, key_len, device=attn_mask.device)
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    blocked = torch.zeros(query_len, key_len, dtype=attn_mask.dtype, device=attn_mask.device)
    return attn_mask + blocked.masked_fill(~causal, float("-inf"))


def fold_mask(attn_mask: Tensor, n_heads: int, n_groups: int, query_len: int) -> Tensor:
    """Reshape a mask broadcastable to ``(B, n_heads, L, S)`` for queries folded to ``(B, n_groups, (n_heads // n_groups) * L, .)``.

    Query head ``h`` belongs to group ``h // (n_heads // n_groups)`` and fills
    the rows of that group in head order. A mask that is the same for every
    head and query is returned as it is, because it broadcasts over the folded
    rows.
    """
    # Left-pad the shape with ones to rank 4: (B or 1, n_heads or 1, L or 1, S or 1).
    attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if attn_mask.size(1) == 1 and attn_mask.size(2) == 1:
        return attn_mask
    batch, key_len = attn_mask.size(0), attn_mask.size(3)
    expanded = attn_mask.expand(batch, n_heads, query_len, key_len)
    # (B, n_heads, L, S) -> (B, n_groups, (n_heads // n_groups) * L, S)
    return expanded.reshape(batch, n_groups, (n_heads // n_groups) * query_len, key_len)


def _check_positive_int(name: str, value: object) -> int:
    return check_positive_int(name, value)


class _SelfAttention(nn.Module):
    """Causal self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key-value heads.

    The projections are ``nn.Linear`` layers named ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj``, the names that Llama-style checkpoints use.
    ``q_proj`` and ``o_proj`` map ``d_model`` to ``d_model = n_heads * head_dim``
    features; ``k_proj`` and ``v_proj`` map ``d_model`` to
    ``n_kv_heads * head_dim`` features.

    ``backend`` selects the attention core: ``"explicit"`` runs this package's
    :func:`~llm_scratch.attention.scaled_dot_product_attention`, ``"torch"``
    runs ``torch.nn.functional.scaled_dot_product_attention``. Both give the
    same output up to rounding, with one exception: dropout in training mode
    draws different random masks. The attribute may be changed at any time.

    ``rope_base`` switches on rotary position embedding with the frequencies
    ``rope_base ** (-2 i / head_dim)``; ``None`` leaves the layer without
    position information. ``rope_layout`` pairs the rotated features as
    ``"split_halves"`` (Llama in Hugging Face transformers) or
    ``"interleaved"`` (RoFormer, DeepSeek); see
    :mod:`llm_scratch.attention.rope`.
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
        super().__init__()
        d_model = _check_positive_int("d_model", d_model)
        n_heads = _check_positive_int("n_heads", n_heads)
        n_kv_heads = _check_positive_int("n_kv_heads", n_kv_heads)
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads "
                f"among the divisors of d_model"
            )
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; choose n_kv_heads "
                f"among the divisors of n_heads"
            )
        check_probability("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is invalid; expected 0 <= dropout < 1")
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={rope_layout!r} is invalid; expected one of {ROPE_LAYOUTS}")
        if rope_base is not None:
            _check_base(rope_base)
            if (d_model // n_heads) % 2 != 0:
                raise ValueError(
                    f"head_dim = d_model / n_heads = {d_model // n_heads} is odd, but RoPE rotates "
                    f"pairs of features; choose d_model and n_heads with an even head_dim, or pass "
                    f"rope_base=None"
                )

        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.group_size = n_heads // n_kv_heads
        self.dropout = dropout
        self.backend = backend
        self.rope_base = None if rope_base is None else float(rope_base)
        self.rope_layout = rope_layout

        kv_features = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_features, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_features, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    @property
    def backend(self) -> str:
        """Attention core: ``"explicit"`` (this package) or ``"torch"`` (PyTorch's fused kernel)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r} is invalid; expected 'explicit' or 'torch'")
        self._backend = value

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"head_dim={self.head_dim}, backend={self.backend!r}{self._rope_repr()}"
        )

    def _rope_repr(self) -> str:
        if self.rope_base is None:
            return ""
        return f", rope_base={self.rope_base:g}, rope_layout={self.rope_layout!r}"

    def make_kv_cache(self, batch: int, max_seq_len: int) -> KVCache:
        """Allocate an empty :class:`KVCache` that fits this layer, on its device and in its dtype."""
        weight = self.k_proj.weight
        return KVCache(
            batch, self.n_kv_heads, self.head_dim, max_seq_len, dtype=weight.dtype, device=weight.device
        )

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
        if x.size(1) == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}, seq_len 0; expected at least 1 token")
        check_input_dtype(x, self.q_proj.weight)

    def _check_cache(self, kv_cache: KVCache, key: Tensor) -> None:
        """Raise ``ValueError`` unless ``kv_cache`` can store ``key``, ``(B, n_kv_heads, T, head_dim)``."""
        if not isinstance(kv_cache, KVCache):
            raise ValueError(
                f"kv_cache must be a KVCache, got {type(kv_cache).__name__}; pass one layer's cache, "
                f"for example model_cache[layer_index]"
            )
        if kv_cache.n_kv_heads != self.n_kv_heads:
            raise ValueError(
                f"kv_cache has n_kv_heads={kv_cache.n_kv_heads}, but this layer has "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if kv_cache.head_dim != self.head_dim:
            raise ValueError(
                f"kv_cache has head_dim={kv_cache.head_dim}, but this layer has head_dim={self.head_dim}"
            )
        if kv_cache.batch != key.size(0):
            raise ValueError(f"kv_cache has batch={kv_cache.batch}, but x has batch={key.size(0)}")
        if kv_cache.dtype != key.dtype:
            raise ValueError(
                f"kv_cache has dtype={kv_cache.dtype}, but the keys projected from x have dtype={key.dtype}"
            )
        if kv_cache.device != key.device:
            raise ValueError(
                f"kv_cache is on device {kv_cache.device}, but the keys projected from x are on {key.device}"
            )
        kv_cache.check_room(key.size(2))

    def _split_heads(self, projected: Tensor, n_heads: int) -> Tensor:
        batch, seq_len, _ = projected.shape
        # (B, T, n_heads * head_dim) -> (B, T, n_heads, head_dim) -> (B, n_heads, T, head_dim)
        return projected.view(batch, seq_len, n_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project ``x`` to queries, keys and values.

        Queries are ``(B, n_heads, T, head_dim)``; keys and values are ``(B, n_kv_heads, T, head_dim)``.
        """
        self._check_input(x)
        query = self._split_heads(self.q_proj(x), self.n_heads)
        key = self._split_heads(self.k_proj(x), self.n_kv_heads)
        value = self._split_heads(self.v_proj(x), self.n_kv_heads)
        return query, key, value

    def _check_positions(self, positions: Tensor, batch: int, seq_len: int) -> None:
        if self.rope_base is None:
            raise ValueError(
                "positions were given, but this layer has no RoPE; construct it with rope_base, "
                "for example rope_base=10000.0"
            )
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

    def _rotate(
        self, query: Tensor, key: Tensor, positions: Tensor | None, start: int
    ) -> tuple[Tensor, Tensor]:
        """Apply RoPE to ``query`` ``(B, n_heads, T, head_dim)`` and ``key`` ``(B, n_kv_heads, T, head_dim)``.

        The positions default to ``start .. start + T - 1``. Without
        ``rope_base`` the inputs are returned unchanged.
        """
        if self.rope_base is None:
            return query, key
        if positions is None:
            positions = torch.arange(start, start + query.size(2), device=query.device)
        # Tables in at least float32, so half-precision inputs are rotated with float32 angles.
        table_dtype = torch.promote_types(query.dtype, torch.float32)
        cos, sin = rope_cos_sin(
            positions, self.head_dim, self.rope_base, layout=self.rope_layout, dtype=table_dtype
        )
        query = apply_rope(query, cos, sin, layout=self.rope_layout)
        key = apply_rope(key, cos, sin, layout=self.rope_layout)
        return query, key

    def _combine_masks(
        self, attn_mask: Tensor | None, is_causal: bool, query: Tensor, key_len: int
    ) -> Tensor | None:
        """Fold ``is_causal`` into ``attn_mask`` so a padding mask and causality can be combined.

        The causal part is aligned bottom-right: with ``key_len - query_len``
        cached positions, query ``i`` sits at position ``key_len - query_len + i``.
        """
        if attn_mask is None:
            return None
        batch, n_heads, query_len, _ = query.shape
        check_mask(attn_mask, (batch, n_heads, query_len, key_len), device=query.device)
        if not is_causal:
            return attn_mask
        return combine_with_causal(attn_mask, query_len, key_len)

    def _fold_mask(self, attn_mask: Tensor, query_len: int) -> Tensor:
        """Reshape a mask to fit the queries that :meth:`_attend_explicit` folds to ``(B, n_kv_heads, group_size * L, head_dim)``."""
        return fold_mask(attn_mask, self.n_heads, self.n_kv_heads, query_len)

    def _attend_explicit(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        """Run this package's attention core and return ``(B, n_heads, L, head_dim)``.

        ``query`` is ``(B, n_heads, L, head_dim)``; ``key`` and ``value`` are
        ``(B, n_kv_heads, S, head_dim)``. ``attn_mask`` already contains the
        causal part when it is given.
        """
        if self.group_size == 1:
            return scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )

        # The group_size query heads that share a key-value head are stacked
        # along the sequence axis, so one matmul per key-value head serves the
        # whole group and the keys and values are never copied, as they would
        # be by repeat_kv. Query head h = kv * group_size + g lands in rows
        # g * L .. g * L + L - 1 of key-value head kv.
        batch, _, query_len, _ = query.shape
        key_len = key.size(2)
        # (B, n_heads, L, head_dim) -> (B, n_kv_heads, group_size * L, head_dim)
        folded = query.reshape(batch, self.n_kv_heads, self.group_size * query_len, self.head_dim)
        if attn_mask is not None:
            attn_mask = self._fold_mask(attn_mask, query_len)
        elif is_causal and query_len > 1:
            # (L, S) -> (group_size * L, S): every group repeats the same rows.
            attn_mask = causal_mask(query_len, key_len, device=query.device).repeat(self.group_size, 1)
        # A single query sits at the last position and may attend to every key, so it needs no mask.

        attended = scaled_dot_product_attention(folded, key, value, attn_mask=attn_mask, dropout_p=dropout_p)
        # (B, n_kv_heads, group_size * L, head_dim) -> (B, n_heads, L, head_dim)
        return attended.view(batch, self.n_heads, query_len, self.head_dim)

    def _attend_torch(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        """Run PyTorch's fused attention on the same inputs as :meth:`_attend_explicit`."""
        query_len, key_len = query.size(2), key.size(2)
        torch_causal = False
        if attn_mask is None and is_causal:
            if query_len == key_len:
                # For a square mask PyTorch's top-left alignment equals bottom-right.
                torch_causal = True
            elif query_len > 1:
                attn_mask = causal_mask(query_len, key_len, device=query.device)
            # A single query sits at the last position and may attend to every key, so it needs no mask.
        if attn_mask is not None and attn_mask.dim() < 4:
            # PyTorch 2.13's kernel raises IndexError for a mask of rank 0 or 1, such as a (S,) padding
            # mask that the explicit backend broadcasts. Left-padding the shape with ones broadcasts alike.
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=torch_causal,
            enable_gqa=self.group_size > 1,
        )

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = True,
        kv_cache: KVCache | None = None,
        *,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Attend over the sequence ``x`` and, when given, the positions stored in ``kv_cache``.

        Args:
            x: ``(batch, seq_len, d_model)``, the new tokens.
            attn_mask: boolean (``True`` means may attend) or additive float
                mask, broadcastable to ``(batch, n_heads, seq_len, key_len)``,
                where ``key_len`` is ``seq_len`` plus the positions already in
                ``kv_cache``. A padding mask is ``(batch, 1, 1, key_len)``.
            is_causal: also apply the causal mask, aligned bottom-right so the
                new tokens sit after the cached ones; combined with
                ``attn_mask`` when both are given.
            kv_cache: a :class:`KVCache` for this layer. The new keys and
                values are appended to it, and the queries attend over every
                cached position. The cache must match the layer's
                ``n_kv_heads``, ``head_dim``, dtype and device and the batch
                size of ``x``. With RoPE the cache stores rotated keys.
            positions: RoPE positions of the new tokens, ``(seq_len,)`` or
                ``(batch, seq_len)``, for a layer built with ``rope_base``.
                By default ``kv_cache.seq_len`` onwards, or ``0 .. seq_len -
                1`` without a cache.

        Returns:
            ``(batch, seq_len, d_model)``.
        """
        check_bool("is_causal", is_causal)
        query, key, value = self._project(x)  # (B, n_heads, T, head_dim), (B, n_kv_heads, T, head_dim) x 2
        batch, _, seq_len, _ = query.shape
        if positions is not None:
            self._check_positions(positions, batch, seq_len)
        key_len = seq_len
        if kv_cache is not None:
            self._check_cache(kv_cache, key)
            key_len += kv_cache.seq_len
        # Every check runs before the cache is written, so an invalid call leaves it unchanged.
        attn_mask = self._combine_masks(attn_mask, is_causal, query, key_len)
        start = 0 if kv_cache is None else kv_cache.seq_len
        # The keys are rotated before they are cached, so a cached key is never rotated again.
        query, key = self._rotate(query, key, positions, start)
        if kv_cache is not None:
            key, value = kv_cache.append(key, value)  # each (B, n_kv_heads, key_len, head_dim)

        dropout_p = self.dropout if self.training else 0.0
        causal_only = is_causal and attn_mask is None
        if self.backend == "explicit":
            attended = self._attend_explicit(query, key, value, attn_mask, causal_only, dropout_p)
        else:
            attended = self._attend_torch(query, key, value, attn_mask, causal_only, dropout_p)
        # attended: (B, n_heads, T, head_dim)

        # (B, n_heads, T, head_dim) -> (B, T, n_heads, head_dim) -> (B, T, d_model)
        merged = attended.transpose(1, 2).reshape(batch, seq_len, self.d_model)
        return self.o_proj(merged)

    @torch.no_grad()
    def attention_weights(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = True,
        *,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Return the attention weights of every query head, ``(batch, n_heads, seq_len, seq_len)``.

        The weights are those :meth:`forward` uses without a cache, before
        dropout, with RoPE at ``positions`` (default ``0 .. seq_len - 1``)
        when the layer has it. Query heads of one group share keys but not
        weights, because their queries differ.
        """
        check_bool("is_causal", is_causal)
        query, key, _ = self._project(x)
        if positions is not None:
            self._check_positions(positions, query.size(0), query.size(2))
        query, key = self._rotate(query, key, positions, start=0)
        seq_len = query.size(2)
        attn_mask = self._combine_masks(attn_mask, is_causal, query, seq_len)
        key = repeat_kv(key, self.group_size)  # (B, n_heads, T, head_dim)
        return _attention_weights(query, key, attn_mask, is_causal and attn_mask is None, None)
