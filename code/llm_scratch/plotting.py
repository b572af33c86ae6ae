"""The book's matplotlib style and the figures that several chapters draw."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from torch import Tensor

STYLE_PATH = Path(__file__).with_name("book.mplstyle")


def use_book_style() -> None:
    """Apply the book's matplotlib style to every figure drawn after this call."""
    plt.style.use(STYLE_PATH)


def plot_attention(
    weights: Tensor,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    colorbar: bool = True,
) -> Axes:
    """Draw a ``(L, S)`` matrix of attention weights as a heatmap with tokens on the axes.

    Rows are queries (``query_tokens``, top to bottom) and columns are keys
    (``key_tokens``, left to right; the query tokens when omitted).
    """
    if key_tokens is None:
        key_tokens = query_tokens
    weights = weights.detach().float().cpu()
    if weights.dim() != 2:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected one (L, S) matrix")
    if weights.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but there are {len(query_tokens)} query "
            f"tokens and {len(key_tokens)} key tokens"
        )
    if ax is None:
        _, ax = plt.subplots()

    image = ax.imshow(weights.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(key_tokens)), labels=list(key_tokens), rotation=60, ha="right")
    ax.set_yticks(range(len(query_tokens)), labels=list(query_tokens))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.grid(False)
    if title is not None:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="attention weight")
    return ax
