"""Scaled dot-product attention, written out step by step.

The public function mirrors ``torch.nn.functional.scaled_dot_product_attention``
(PyTorch 2.13): the same shapes and mask semantics, and the same arguments
except ``enable_gqa``, which it does not take. Key and value heads must
therefore equal the query heads or broadcast to them (one head, as in
multi-query attention). The layers in :mod:`llm_scratch.attention.base`
handle grouped heads themselves before they call this function. It also
differs from PyTorch's function in these documented ways:

* With ``is_causal=True`` and fewer queries than keys (L < S), the causal mask
  is aligned to the bottom-right corner: query ``i`` sits at position
  ``S - L + i`` and attends to keys ``0 .. S - L + i``. This is what decoding with a
  key-value cache needs. PyTorch aligns the mask to the top-left corner.
* A query row whose keys are all masked returns zeros, with finite gradients,
  instead of NaN.
* Query and key feature size ``E = 0`` raises ``ValueError`` when ``scale``
  is ``None``, because the default scale ``1 / sqrt(E)`` is undefined.

As in PyTorch, no keys at all (``S = 0``) give zero outputs.

Half-precision inputs (float16, bfloat16) are computed in float32 and the
result is cast back, so they stay finite wherever float32 inputs would.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_scratch._checks import check_bool, check_probability, check_scale, is_int

_LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def causal_mask(
    query_len: int, key_len: int, device: torch.device | str | None = None
) -> Tensor:
    """Build a boolean causal mask of shape ``(query_len, key_len)``.

    ``True`` means "may attend". The mask is aligned bottom-right: query ``i``
    sits at position ``key_len - query_len + i`` and may attend to every key at
    or before that position. For a square mask this is the usual lower
    triangle. When ``query_len > key_len`` the first
    ``query_len - key_len`` rows have no key to attend to.
    """
    for name, value in (("query_len", query_len), ("key_len", key_len)):
        if not is_int(value):
            raise ValueError(f"{name}={value!r} is invalid; expected a positive int")
    if query_len < 1 or key_len < 1:
        raise ValueError(
            f"query_len={query_len} and key_len={key_len} must both be at least 1"
        )
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    return allowed.tril(diagonal=key_len - query_len)


def stable_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Apply softmax along ``dim`` after subtracting the maximum of each row.

    Subtracting the row maximum leaves softmax unchanged, because the factor
    ``exp(-max)`` cancels between numerator and denominator, and it keeps every
    exponent at or below zero, so ``exp`` cannot overflow.

    Entries equal to ``-inf`` get weight zero. A row whose entries are all
    ``-inf`` returns all zeros (``torch.softmax`` returns NaN there), and its
    gradient is zero rather than NaN.
    """
    return _stable_softmax(scores, dim, in_place=False)


def _stable_softmax(scores: Tensor, dim: int, in_place: bool) -> Tensor:
    """Compute :func:`stable_softmax`, overwriting ``scores`` when ``in_place`` is true.

    The in-place form saves two temporaries the size of ``scores``, which for
    long sequences are the largest tensors of attention. Callers pass
    ``in_place=True`` only for a scores tensor they created themselves.
    """
    if scores.size(dim) == 0:
        # No entries to normalize: return the empty tensor, as torch.softmax does.
        return scores if in_place else scores.clone()
    row_max = scores.detach().amax(dim=dim, keepdim=True)
    # A row of all -inf has max -inf, and -inf - (-inf) is NaN. Shifting such a
    # row by 0 instead leaves exp(-inf) = 0 in every entry.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    shifted = scores.sub_(row_max) if in_place else scores - row_max
    exponentials = shifted.exp_()

    total = exponentials.sum(dim=dim, keepdim=True)
    # Dividing a row of zeros by 1 keeps it zero and keeps the backward pass
    # free of 0/0.
    total = torch.where(total == 0, torch.ones_like(total), total)
    if torch.is_grad_enabled() and exponentials.requires_grad:
        # The backward pass of exp_ reads its output, so the division must not
        # overwrite it.
        return exponentials / total
    return exponentials.div_(total)


def _check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> tuple[int, ...]:
    """Validate the arguments and return the broadcast shape ``(..., L, S)`` of the scores."""
    check_bool("is_causal", is_causal)
    check_scale(scale)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} (rank {tensor.dim()}); "
                f"expected rank at least 2, shaped (..., sequence, features)"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} has dtype {tensor.dtype}; expected a floating-point dtype")

    if query.size(-1) != key.size(-1):
        raise ValueError(
            f"query feature size {query.size(-1)} does not match key feature size "
            f"{key.size(-1)}; query is (..., L, E) and key is (..., S, E)"
        )
    if query.size(-1) == 0 and scale is None:
        raise ValueError(
            f"query feature size 0 (query shape {tuple(query.shape)}) leaves the default scale "
            f"1 / sqrt(E) undefined; expected at least 1 feature, or pass scale explicitly"
        )
    if key.size(-2) != value.size(-2):
        raise ValueError(
            f"key length {key.size(-2)} does not match value length {value.size(-2)}; "
            f"key is (..., S, E) and value is (..., S, Ev) with the same S"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value have dtypes {query.dtype}, {key.dtype}, {value.dtype}; "
            f"expected one dtype for all three"
        )

    try:
        batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch dimensions do not broadcast: query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        ) from None
    scores_shape = (*batch_shape, query.size(-2), key.size(-2))

    if attn_mask is not None:
        if is_causal:
            raise ValueError(
                "attn_mask and is_causal=True were both given; pass is_causal=False and "
                "combine the masks, for example attn_mask & causal_mask(L, S)"
            )
        check_mask(attn_mask, scores_shape, device=query.device)
    return scores_shape


def check_mask(
    attn_mask: Tensor, scores_shape: tuple[int, ...], *, device: torch.device | None = None
) -> None:
    """Raise ``ValueError`` unless ``attn_mask`` is a bool or float mask broadcastable to ``scores_shape``.

    With ``device`` given, which is the query's device, the mask must also be
    on it. A mask on another device would otherwise fail inside PyTorch or, on
    the ``meta`` device, be skipped without an error.
    """
    if not isinstance(attn_mask, Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if device is not None and not _same_device(attn_mask.device, torch.device(device)):
        raise ValueError(
            f"attn_mask is on device {attn_mask.device}, but the query is on {device}; "
            f"move the mask with attn_mask.to(query.device)"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(
            f"attn_mask has dtype {attn_mask.dtype}; expected torch.bool "
            f"(True means may attend) or a floating-point additive mask"
        )
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(scores_shape):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
            f"attention scores of shape {tuple(scores_shape)}"
        )


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    """Return whether ``actual`` is ``expected``, a device without an index matching any index."""
    if actual.type != expected.type:
        return False
    return expected.index is None or actual.index == expected.index


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Compute the attention weights ``softmax(q k^T * scale + mask)``.

    Shapes: ``query`` is ``(..., L, E)`` and ``key`` is ``(..., S, E)``; the
    result is ``(..., L, S)``, each row summing to 1 (or to 0 where every key
    of that row is masked). Masks follow :func:`scaled_dot_product_attention`.
    The weights are returned in float32 for float16 and bfloat16 inputs.
    """
    if not isinstance(key, Tensor):
        raise ValueError(f"key must be a torch.Tensor, got {type(key).__name__}")
    placeholder_value = key[..., :1]
    _check_inputs(query, key, placeholder_value, attn_mask, is_causal, scale)
    return _attention_weights(query, key, attn_mask, is_causal, scale)


def _attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> Tensor:
    if query.dtype in _LOW_PRECISION_DTYPES:
        query = query.float()
        key = key.float()
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))

    # The scores are the largest tensor here, (..., L, S), so every later step
    # rewrites them in place instead of allocating another one. In-place
    # scaling and masking are safe for autograd, because the backward pass of
    # a matmul reads its inputs, not its output.
    scores = query @ key.transpose(-2, -1)  # (..., L, S)
    scores.mul_(scale)

    if is_causal and query.size(-2) > 0 and key.size(-2) > 0:
        # Without queries or without keys there is nothing to mask, and
        # causal_mask rejects a zero length.
        attn_mask = causal_mask(query.size(-2), key.size(-2), device=query.device)
    if attn_mask is not None and torch.broadcast_shapes(scores.shape, attn_mask.shape) != scores.shape:
        # Some batch dimensions appear only in value and the mask, not in the
        # scores, so the mask cannot be applied to the scores in place.
        scores = scores.expand(torch.broadcast_shapes(scores.shape, attn_mask.shape)).clone()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            scores.add_(attn_mask.to(scores.dtype))

    return _stable_softmax(scores, dim=-1, in_place=True)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Compute ``softmax(q k^T * scale + mask) v``.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``.
        value: ``(..., S, Ev)``.
        attn_mask: broadcastable to ``(..., L, S)``. A boolean mask keeps the
            positions that are ``True`` ("may attend"); a floating-point mask
            is added to the scores, with ``-inf`` removing a position.
        dropout_p: probability of zeroing each attention weight. As in
            PyTorch's function, dropout is applied whenever ``dropout_p > 0``;
            pass ``0.0`` at evaluation time.
        is_causal: apply a causal mask aligned bottom-right (see
            :func:`causal_mask`). Cannot be combined with ``attn_mask``.
        scale: factor applied to ``q k^T``; ``1 / sqrt(E)`` when ``None``.

    Returns:
        ``(..., L, Ev)`` in the dtype of ``query``. Rows whose keys are all
        masked are zero.
    """
    _check_inputs(query, key, value, attn_mask, is_causal, scale)
    check_probability("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} is invalid; expected 0 <= dropout_p < 1")

    weights = _attention_weights(query, key, attn_mask, is_causal, scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)

    output = weights @ value.to(weights.dtype)  # (..., L, Ev)
    return output.to(query.dtype)


def padding_mask(lengths: Tensor, seq_len: int) -> Tensor:
    """Build a boolean key-padding mask of shape ``(batch, 1, 1, seq_len)`` from sequence lengths.

    ``lengths`` is a 1-D integer tensor of the number of real tokens in each
    sequence. The real tokens must come first, followed by the padding.
    ``True`` marks a real key that may be attended to. The two singleton axes
    broadcast over heads and queries.
    """
    if not is_int(seq_len) or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r} is invalid; expected an int >= 0")
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(
            f"lengths must be a 1-D integer tensor of sequence lengths, got {lengths!r}"
        )
    if lengths.numel() > 0 and (lengths.min() < 0 or lengths.max() > seq_len):
        raise ValueError(
            f"lengths {lengths.tolist()} must lie between 0 and seq_len={seq_len}"
        )
    positions = torch.arange(seq_len, device=lengths.device)
    keep = positions[None, :] < lengths[:, None]  # (batch, seq_len)
    return keep[:, None, None, :]
