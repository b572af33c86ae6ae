"""Key-value caches for autoregressive decoding.

During generation every new token attends to the keys and values of itself
and all the tokens before it. Those of earlier tokens do not change once
computed, so a cache stores them and each step projects only the new tokens. A :class:`KVCache` serves one
attention layer, and a :class:`ModelKVCache` contains one per layer of a model.

Keys and values are stored as ``(batch, n_kv_heads, seq_len, head_dim)``: the
key-value heads exactly as the layer projects them. Grouped-query and
multi-query attention share each key-value head among several query heads,
and the cache never repeats those heads up to ``n_heads``, because storing
each key-value head once is the memory saving of those variants.

The caches are meant for inference, under ``torch.no_grad()`` or
``torch.inference_mode()``: they write into preallocated storage in place.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from llm_scratch._checks import check_positive_int, is_int


def _check_positive_int(name: str, value: object) -> int:
    return check_positive_int(name, value)


def kv_cache_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Return the bytes that caching one token of one sequence takes in a whole model.

    Each layer stores one key and one value vector per key-value head, so the
    total is ``2 * n_layers * n_kv_heads * head_dim * bytes_per_element``.
    """
    n_layers = _check_positive_int("n_layers", n_layers)
    n_kv_heads = _check_positive_int("n_kv_heads", n_kv_heads)
    head_dim = _check_positive_int("head_dim", head_dim)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is invalid; expected a torch.dtype such as torch.float16")
    return 2 * n_layers * n_kv_heads * head_dim * dtype.itemsize


class KVCache:
    """The keys and values of one attention layer, in preallocated storage.

    Storage for ``max_seq_len`` positions is allocated once. :meth:`append`
    writes new positions after the filled ones and returns views of the filled
    part, so attention reads positions ``0 .. seq_len - 1`` only. The slots
    from ``seq_len`` on hold zeros or stale values from before a
    :meth:`reset`, and nothing reads them.

    Args:
        batch: number of sequences decoded together.
        n_kv_heads: key-value heads of the layer (``n_heads`` for multi-head
            attention, 1 for multi-query attention).
        head_dim: features per head.
        max_seq_len: positions the storage has room for, prompt included.
        dtype: dtype of the keys and values; must match the layer's.
        device: device of the storage; must match the layer's.
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        batch = _check_positive_int("batch", batch)
        n_kv_heads = _check_positive_int("n_kv_heads", n_kv_heads)
        head_dim = _check_positive_int("head_dim", head_dim)
        max_seq_len = _check_positive_int("max_seq_len", max_seq_len)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is invalid; expected a floating-point torch.dtype")

        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.key_storage = torch.zeros(shape, dtype=dtype, device=device)
        self.value_storage = torch.zeros(shape, dtype=dtype, device=device)
        self._seq_len = 0

    def __repr__(self) -> str:
        return (
            f"KVCache(batch={self.batch}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"seq_len={self.seq_len}, max_seq_len={self.max_seq_len}, dtype={self.dtype})"
        )

    @property
    def batch(self) -> int:
        return self.key_storage.size(0)

    @property
    def n_kv_heads(self) -> int:
        return self.key_storage.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.key_storage.size(2)

    @property
    def head_dim(self) -> int:
        return self.key_storage.size(3)

    @property
    def dtype(self) -> torch.dtype:
        return self.key_storage.dtype

    @property
    def device(self) -> torch.device:
        return self.key_storage.device

    @property
    def seq_len(self) -> int:
        """Number of filled positions, which is also the position of the next token."""
        return self._seq_len

    @property
    def keys(self) -> Tensor:
        """The cached keys, a ``(batch, n_kv_heads, seq_len, head_dim)`` view of the storage."""
        return self.key_storage[:, :, : self._seq_len]

    @property
    def values(self) -> Tensor:
        """The cached values, a ``(batch, n_kv_heads, seq_len, head_dim)`` view of the storage."""
        return self.value_storage[:, :, : self._seq_len]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated key and value storage, filled or not."""
        return self.key_storage.nbytes + self.value_storage.nbytes

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the filled positions of the key and value storage."""
        return self.keys.nbytes + self.values.nbytes

    def check_room(self, new_len: int) -> None:
        """Raise ``ValueError`` unless ``new_len`` more positions fit in the storage."""
        if self._seq_len + new_len > self.max_seq_len:
            raise ValueError(
                f"cannot append {new_len} positions to a KVCache holding {self._seq_len}: "
                f"{self._seq_len + new_len} exceeds max_seq_len={self.max_seq_len}; reset() the "
                f"cache or allocate one with a larger max_seq_len"
            )

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys and values and return all the cached ones.

        The first call on an empty cache stores the prompt (prefill). Later
        calls add one token or several at once.

        Args:
            keys: ``(batch, n_kv_heads, new_len, head_dim)`` with ``new_len >= 1``.
            values: ``(batch, n_kv_heads, new_len, head_dim)``.

        Returns:
            ``(keys, values)``, each a ``(batch, n_kv_heads, seq_len, head_dim)``
            view of the storage, with ``seq_len`` counting the new positions.
        """
        expected = (self.batch, self.n_kv_heads, "new_len", self.head_dim)
        for name, tensor in (("keys", keys), ("values", values)):
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            shape = tuple(tensor.shape)
            if tensor.dim() != 4 or shape[:2] != expected[:2] or shape[3] != expected[3]:
                raise ValueError(
                    f"{name} has shape {shape}; expected (batch, n_kv_heads, new_len, head_dim) = "
                    f"({self.batch}, {self.n_kv_heads}, new_len, {self.head_dim})"
                )
            if tensor.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {tensor.dtype}; expected the cache's dtype {self.dtype}")
        if keys.size(2) != values.size(2):
            raise ValueError(
                f"keys hold {keys.size(2)} positions but values hold {values.size(2)}; expected the same"
            )

        new_len = keys.size(2)
        if new_len == 0:
            raise ValueError("keys and values hold 0 positions; expected at least 1 position to append")
        self.check_room(new_len)
        start, end = self._seq_len, self._seq_len + new_len
        self.key_storage[:, :, start:end] = keys
        self.value_storage[:, :, start:end] = values
        self._seq_len = end
        return self.keys, self.values

    def crop(self, seq_len: int) -> None:
        """Keep only the first ``seq_len`` positions, for example to undo rejected draft tokens.

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


class ModelKVCache(Sequence[KVCache]):
    """One :class:`KVCache` per layer of a model, all of the same shape.

    Index it by layer (``caches[i]``) and pass each layer its own cache.

    Args:
        n_layers: number of attention layers.
        batch, n_kv_heads, head_dim, max_seq_len, dtype, device: as for
            :class:`KVCache`, shared by every layer.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        n_layers = _check_positive_int("n_layers", n_layers)
        self.layers = [
            KVCache(batch, n_kv_heads, head_dim, max_seq_len, dtype=dtype, device=device)
            for _ in range(n_layers)
        ]

    def __getitem__(self, index: int) -> KVCache:  # type: ignore[override]
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KVCache]:
        return iter(self.layers)

    def __repr__(self) -> str:
        first = self.layers[0]
        return (
            f"ModelKVCache(n_layers={len(self)}, batch={first.batch}, n_kv_heads={first.n_kv_heads}, "
            f"head_dim={first.head_dim}, seq_len={self.seq_len}, max_seq_len={first.max_seq_len}, "
            f"dtype={first.dtype})"
        )

    @property
    def seq_len(self) -> int:
        """Filled positions of the first layer's cache.

        Every layer has the same number once a forward pass through the whole
        model has finished, so between passes this is the position of the next
        token.
        """
        return self.layers[0].seq_len

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated key and value storage of every layer."""
        return sum(cache.nbytes for cache in self.layers)

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the filled positions of every layer."""
        return sum(cache.filled_nbytes for cache in self.layers)

    def crop(self, seq_len: int) -> None:
        """Keep only the first ``seq_len`` positions of every layer's cache."""
        for cache in self.layers:
            cache.crop(seq_len)

    def reset(self) -> None:
        """Empty every layer's cache for a new prompt."""
        for cache in self.layers:
            cache.reset()
