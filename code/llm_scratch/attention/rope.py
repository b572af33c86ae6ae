"""Rotary position embedding, RoPE.

Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding".

RoPE splits a ``dim``-wide query or key vector into ``dim / 2`` pairs and
rotates pair ``i`` at position ``m`` by the angle ``m * theta_i``, with
``theta_i = base ** (-2 i / dim)``. A rotation preserves the norm, and the
score between a query rotated at position ``m`` and a key rotated at position
``n`` depends on the positions only through ``m - n``.

Two layouts of the pairs are in use, and this module supports both:

* ``"interleaved"``: pair ``i`` is the features ``(2 i, 2 i + 1)``. This is
  the RoFormer paper's formulation, and the layout of DeepSeek-V2's query and
  key projections (Hugging Face transformers 5.25.0 rotates them with
  ``torch.view_as_complex``, which pairs adjacent features).
* ``"split_halves"``: pair ``i`` is the features ``(i, i + dim / 2)``. This is
  what ``rotate_half`` in Hugging Face's Llama implements.

The layouts give the same attention scores once the output rows of the query
and key projections are reordered by :func:`rope_permutation`, because
reordering the features of every query and every key in the same way leaves
their dot products unchanged. :func:`convert_rope_weight` applies that
reordering to a projection's weight.
"""

import math
from typing import Literal

import torch
from torch import Tensor

RopeLayout = Literal["interleaved", "split_halves"]
ROPE_LAYOUTS: tuple[str, ...] = ("interleaved", "split_halves")


def _check_dim(dim: int, name: str = "dim") -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"{name}={dim!r} is invalid; expected a positive even int")
    if dim % 2 != 0:
        raise ValueError(f"{name}={dim} is odd; RoPE rotates pairs of features, so {name} must be even")


def _check_base(base: float) -> None:
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise ValueError(f"base={base!r} is invalid; expected a positive number such as 10000.0")
    if not math.isfinite(base) or base <= 0:
        raise ValueError(f"base={base} is invalid; expected a finite positive number such as 10000.0")
    if base <= 1:
        raise ValueError(
            f"base={base} is invalid; expected a number greater than 1, so that the frequencies "
            f"base^(-2i/dim) decrease from pair to pair, such as 10000.0"
        )


def _check_rotatable(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor whose last dimension splits into pairs of features."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.size(-1) < 2 or x.size(-1) % 2 != 0:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected a last dimension of positive even size, "
            f"because RoPE rotates pairs of features"
        )


def _check_layout(layout: str) -> None:
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; expected one of {ROPE_LAYOUTS}")


def rope_frequencies(
    dim: int, base: float = 10000.0, *, device: torch.device | str | None = None
) -> Tensor:
    """Return the angular frequencies ``theta_i = base ** (-2 i / dim)``, shape ``(dim // 2,)``, in float64.

    Raises ``ValueError`` for an odd or non-positive ``dim`` and for a base
    that is not a finite positive number.
    """
    _check_dim(dim)
    _check_base(base)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return float(base) ** -exponents


def rope_cos_sin(
    positions: Tensor,
    dim: int,
    base: float = 10000.0,
    *,
    layout: RopeLayout = "interleaved",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Build the cosine and sine tables for the given positions.

    Args:
        positions: token positions, shape ``(seq_len,)`` or
            ``(batch, seq_len)``. Pass ``torch.arange(cache_len, cache_len +
            seq_len)`` to continue after ``cache_len`` cached tokens.
        dim: number of rotated features; must be even.
        base: the base of the frequencies ``theta_i = base ** (-2 i / dim)``.
        layout: ``"interleaved"`` repeats each angle for features ``2 i`` and
            ``2 i + 1``; ``"split_halves"`` for features ``i`` and
            ``i + dim / 2``.
        dtype: floating-point dtype of the returned tables. The angles are
            computed in float64 whatever this is.

    Returns:
        ``(cos, sin)``, each of shape ``positions.shape + (dim,)``, on the
        device of ``positions``.
    """
    if not isinstance(positions, Tensor) or positions.dim() not in (1, 2):
        raise ValueError(
            f"positions must be a 1-D (seq_len,) or 2-D (batch, seq_len) tensor, got {positions!r}"
        )
    if positions.dtype == torch.bool or positions.is_complex():
        raise ValueError(f"positions has dtype {positions.dtype}; expected an integer or floating dtype")
    _check_layout(layout)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is invalid; expected a floating-point torch.dtype such as torch.float32"
        )

    frequencies = rope_frequencies(dim, base, device=positions.device)  # (dim/2,)
    angles = positions.to(torch.float64)[..., None] * frequencies  # (..., seq_len, dim/2)
    if layout == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)  # (..., seq_len, dim): t0 t0 t1 t1 ...
    else:
        angles = torch.cat((angles, angles), dim=-1)  # (..., seq_len, dim): t0 t1 ... t0 t1 ...
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """Map each pair ``(x_i, x_{i + dim/2})`` to ``(-x_{i + dim/2}, x_i)``, the split-halves layout.

    Raises ``ValueError`` unless the last dimension of ``x`` is positive and even.
    """
    _check_rotatable(x)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """Map each pair ``(x_{2i}, x_{2i+1})`` to ``(-x_{2i+1}, x_{2i})``, the interleaved layout.

    Raises ``ValueError`` unless the last dimension of ``x`` is positive and even.
    """
    _check_rotatable(x)
    pairs = x.unflatten(-1, (-1, 2))  # (..., dim) -> (..., dim/2, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1)  # (..., dim/2, 2)
    return rotated.flatten(-2)  # (..., dim/2, 2) -> (..., dim)


def apply_rope(
    x: Tensor, cos: Tensor, sin: Tensor, *, layout: RopeLayout = "interleaved"
) -> Tensor:
    """Rotate the features of ``x`` by the angles in the tables from :func:`rope_cos_sin`.

    Args:
        x: ``(batch, heads, seq_len, dim)``.
        cos, sin: ``(seq_len, dim)``, shared by the batch, or
            ``(batch, seq_len, dim)``, one row of positions per sequence.
        layout: must be the layout the tables were built with.

    Returns:
        ``x * cos + rotate(x) * sin`` in the dtype of ``x``, where ``rotate``
        is :func:`rotate_interleaved` or :func:`rotate_half`. The product is
        computed in the promoted dtype of ``x`` and the tables, so float32
        tables keep their precision for bfloat16 inputs.
    """
    _check_layout(layout)
    if not isinstance(x, Tensor):
        raise ValueError(
            f"x must be a torch.Tensor of shape (batch, heads, seq_len, dim), got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(
            f"x has shape {tuple(getattr(x, 'shape', ()))}; expected (batch, heads, seq_len, dim)"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"x has dtype {x.dtype}; expected a floating-point dtype, because the rotated features are "
            f"not integers; convert it with x.float()"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor from rope_cos_sin, got {type(table).__name__}"
            )
        if not table.is_floating_point():
            raise ValueError(f"{name} has dtype {table.dtype}; expected a floating-point dtype")
    if cos.shape != sin.shape:
        raise ValueError(f"cos has shape {tuple(cos.shape)} but sin has shape {tuple(sin.shape)}")
    if cos.dim() not in (2, 3) or cos.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"cos and sin have shape {tuple(cos.shape)}; expected (seq_len, dim) or "
            f"(batch, seq_len, dim) with seq_len={x.size(-2)} and dim={x.size(-1)}"
        )
    # Each pair of features shares one angle: adjacent features in the
    # interleaved layout, features i and i + dim / 2 in the split-halves layout.
    # Tables built for the other layout rotate the wrong features, so they are
    # rejected here rather than returning a wrong rotation. Tables on the meta
    # device hold no values, so they cannot be checked.
    half = cos.size(-1) // 2
    if cos.device.type == "meta":
        same_angle = True
    elif layout == "interleaved":
        same_angle = torch.equal(cos[..., 0::2], cos[..., 1::2])
    else:
        same_angle = torch.equal(cos[..., :half], cos[..., half:])
    if not same_angle:
        raise ValueError(
            f"cos does not pair its features as layout={layout!r} does; build the tables with "
            f"rope_cos_sin(..., layout={layout!r})"
        )
    if cos.dim() == 3:
        cos = cos.unsqueeze(1)  # (B, T, dim) -> (B, 1, T, dim), shared by the heads
        sin = sin.unsqueeze(1)

    rotate = rotate_interleaved if layout == "interleaved" else rotate_half
    rotated = x * cos + rotate(x) * sin
    return rotated.to(x.dtype)


def rope_permutation(
    dim: int,
    *,
    source: RopeLayout = "interleaved",
    target: RopeLayout = "split_halves",
    device: torch.device | str | None = None,
) -> Tensor:
    """Return the index ``perm`` that reorders features from the ``source`` layout to the ``target`` layout.

    ``x_target = x_source[..., perm]`` moves feature ``2 i`` of the
    interleaved layout to feature ``i`` of the split-halves layout, and
    feature ``2 i + 1`` to feature ``i + dim / 2``, so each pair keeps its
    angle ``theta_i``. Rotating ``x_target`` in the target layout then gives
    the source-layout rotation of ``x_source`` reordered by ``perm``. The
    result has shape ``(dim,)`` and dtype int64; it is the identity when the
    two layouts are equal.
    """
    _check_dim(dim)
    _check_layout(source)
    _check_layout(target)
    if source == target:
        return torch.arange(dim, device=device)

    interleaved_to_halves = torch.cat(
        (torch.arange(0, dim, 2, device=device), torch.arange(1, dim, 2, device=device))
    )
    if source == "interleaved":
        return interleaved_to_halves
    return torch.argsort(interleaved_to_halves)


def convert_rope_weight(
    weight: Tensor,
    head_dim: int,
    *,
    source: RopeLayout = "interleaved",
    target: RopeLayout = "split_halves",
) -> Tensor:
    """Reorder the output rows of a query or key projection from one RoPE layout to the other.

    Args:
        weight: the ``nn.Linear`` weight ``(n_heads * head_dim, in_features)``
            or its bias ``(n_heads * head_dim,)``. Every row must feed a
            rotated feature.
        head_dim: the number of rotated features of each head.
        source, target: the layouts, as in :func:`rope_permutation`.

    Returns:
        A new tensor of the same shape whose rows within each head follow
        :func:`rope_permutation`. Converting the query and the key
        projection in the same way leaves every attention score unchanged.
    """
    _check_dim(head_dim, "head_dim")
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (1, 2) or weight.size(0) % head_dim != 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected (n_heads * head_dim, in_features) "
            f"or (n_heads * head_dim,) with head_dim={head_dim}"
        )
    perm = rope_permutation(head_dim, source=source, target=target, device=weight.device)
    n_heads = weight.size(0) // head_dim
    # (n_heads * head_dim, ...) -> (n_heads, head_dim, ...), reorder within each head, and back.
    per_head = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    return per_head[:, perm].reshape(weight.shape)
