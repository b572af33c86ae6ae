"""A tiny decoder-only language model for checking attention variants and the KV cache end to end.

The layout is GPT-2's: learned token and position embeddings, pre-norm blocks
of self-attention and a GELU MLP, a final LayerNorm and a linear head. The
weights are random; the model exists so that cached and uncached generation
can be compared on a real stack of layers.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llm_scratch._checks import check_positive_int, is_int
from llm_scratch.attention import (
    GroupedQueryAttention,
    KVCache,
    ModelKVCache,
    MultiHeadAttention,
    MultiQueryAttention,
)


@dataclass
class TinyDecoderConfig:
    """Sizes of a :class:`TinyDecoder`; the defaults build a model of 33,472 parameters."""

    vocab_size: int = 97
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    # None means n_heads (multi-head attention); 1 gives multi-query attention.
    n_kv_heads: int | None = None
    d_ff: int = 128
    # Length of the learned position table, so no sequence may be longer.
    max_seq_len: int = 64
    backend: str = "explicit"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            setattr(self, name, check_positive_int(name, getattr(self, name)))


def make_attention(d_model: int, n_heads: int, n_kv_heads: int, backend: str = "explicit") -> nn.Module:
    """Build the attention class that ``n_kv_heads`` names: MHA for ``n_heads``, MQA for 1, GQA otherwise."""
    if n_kv_heads == n_heads:
        return MultiHeadAttention(d_model, n_heads, backend=backend)
    if n_kv_heads == 1:
        return MultiQueryAttention(d_model, n_heads, backend=backend)
    return GroupedQueryAttention(d_model, n_heads, n_kv_heads, backend=backend)


class TinyBlock(nn.Module):
    """A pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = make_attention(config.d_model, config.n_heads, config.n_kv_heads, config.backend)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.GELU(),
            nn.Linear(config.d_ff, config.d_model),
        )

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), kv_cache=kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    """A decoder-only language model with a configurable attention variant.

    ``forward(tokens, kv_caches=None)`` maps ``(batch, seq_len)`` token ids to
    ``(batch, seq_len, vocab_size)`` logits. The ids must be integers in
    ``[0, vocab_size)``, and ``seq_len`` must be at least 1. With a :class:`ModelKVCache`
    from :meth:`make_kv_cache`, the tokens are taken to follow the cached
    ones: their positions start at ``kv_caches.seq_len`` and every layer
    appends to its own cache.
    """

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(TinyBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def make_kv_cache(self, batch: int, max_seq_len: int | None = None) -> ModelKVCache:
        """Allocate an empty cache for every layer, in the model's dtype and on its device.

        ``max_seq_len`` defaults to the model's own ``config.max_seq_len``.
        """
        config = self.config
        weight = self.token_embedding.weight
        return ModelKVCache(
            config.n_layers,
            batch,
            config.n_kv_heads,
            config.d_model // config.n_heads,
            config.max_seq_len if max_seq_len is None else max_seq_len,
            dtype=weight.dtype,
            device=weight.device,
        )

    def _check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        """Raise ``ValueError`` unless ``tokens`` is ``(batch, seq_len)`` ids in ``[0, vocab_size)``."""
        if not isinstance(tokens, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(tokens.shape)}; expected (batch, seq_len)")
        if tokens.size(1) == 0:
            raise ValueError(f"{name} has shape {tuple(tokens.shape)}, seq_len 0; expected at least 1 token")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(
                f"{name} has dtype {tokens.dtype}; expected an integer dtype such as torch.long"
            )
        vocab_size = self.config.vocab_size
        if tokens.numel() > 0:
            low, high = (int(bound) for bound in torch.aminmax(tokens))
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"{name} contains ids from {low} to {high}; expected ids in [0, vocab_size={vocab_size})"
                )

    def forward(self, tokens: Tensor, kv_caches: ModelKVCache | None = None) -> Tensor:
        self._check_tokens(tokens)
        if kv_caches is not None and len(kv_caches) != len(self.blocks):
            raise ValueError(
                f"kv_caches has {len(kv_caches)} layers; expected n_layers={len(self.blocks)}"
            )
        start = 0 if kv_caches is None else kv_caches.seq_len
        end = start + tokens.size(1)
        if end > self.config.max_seq_len:
            raise ValueError(
                f"positions {start} .. {end - 1} exceed the position table of "
                f"max_seq_len={self.config.max_seq_len}"
            )

        positions = torch.arange(start, end, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, T, d_model)
        for index, block in enumerate(self.blocks):
            x = block(x, kv_cache=None if kv_caches is None else kv_caches[index])
        return self.lm_head(self.final_norm(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, use_cache: bool = True) -> Tensor:
        """Extend ``prompt`` ``(batch, prompt_len)`` by greedy decoding.

        With ``use_cache`` the prompt is processed once and each later step
        feeds only the newest token. Without it every step runs the model on
        the whole sequence so far. Both choose the same tokens.

        Returns:
            ``(batch, prompt_len + max_new_tokens)``, the prompt followed by
            the generated tokens.
        """
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an int >= 0")
        max_new_tokens = int(max_new_tokens)
        self._check_tokens(prompt, "prompt")
        total = prompt.size(1) + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt_len={prompt.size(1)} plus max_new_tokens={max_new_tokens} is {total}, "
                f"more than max_seq_len={self.config.max_seq_len}"
            )

        tokens = prompt
        kv_caches = self.make_kv_cache(prompt.size(0), total) if use_cache else None
        step_input = prompt
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, kv_caches)
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
        return tokens
