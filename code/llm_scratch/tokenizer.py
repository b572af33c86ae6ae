"""A small word-level tokenizer, so chapters can run on real text without downloading a vocabulary."""

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from llm_scratch._checks import is_int

# Words (Unicode letters and digits, with an inner apostrophe followed by
# letters, as in "don't") or single punctuation marks, the underscore among
# them. Whitespace separates tokens and is not kept. On ASCII text this splits
# exactly as [A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9] does, and a word with
# letters outside ASCII, such as "café", stays one token.
_TOKEN_PATTERN = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?|[^\w\s]|_")


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """Split ``text`` into word and punctuation tokens.

    A word is a run of Unicode letters and digits, optionally followed by an
    apostrophe and letters ("don't"). Every other character that is not
    whitespace is a token of its own.
    """
    _check_text(text)
    if lowercase:
        text = text.lower()
    return _TOKEN_PATTERN.findall(text)


class WordTokenizer:
    """Map words and punctuation to integer ids with a vocabulary built from example texts.

    Id 0 is ``<pad>`` and id 1 is ``<unk>``, the id of every token not seen
    when the vocabulary was built. The remaining ids follow frequency, most
    frequent first, with ties broken alphabetically, so the same texts always
    give the same vocabulary.

    Words are runs of Unicode letters and digits (see :func:`split_words`),
    so accented and non-Latin words are single tokens. ``vocab`` may be any
    sequence of strings and is copied to a list.
    """

    pad_token = "<pad>"
    unk_token = "<unk>"

    def __init__(self, vocab: list[str], lowercase: bool = True):
        if isinstance(vocab, str) or not isinstance(vocab, Sequence):
            raise ValueError(
                f"vocab must be a list of token strings starting with "
                f"{[self.pad_token, self.unk_token]}, got {type(vocab).__name__}"
            )
        vocab = list(vocab)
        for token in vocab:
            if not isinstance(token, str):
                raise ValueError(
                    f"vocab contains {token!r} of type {type(token).__name__}; expected str tokens"
                )
        if vocab[:2] != [self.pad_token, self.unk_token]:
            raise ValueError(
                f"vocab must start with {[self.pad_token, self.unk_token]}, got {vocab[:2]}"
            )
        if len(set(vocab)) != len(vocab):
            duplicates = sorted({token for token in vocab if vocab.count(token) > 1})
            raise ValueError(f"vocab contains duplicate tokens {duplicates}; each token must appear once")
        self.vocab = list(vocab)
        self.lowercase = lowercase
        self.token_to_id = {token: index for index, token in enumerate(self.vocab)}

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], max_vocab_size: int | None = None, lowercase: bool = True
    ) -> "WordTokenizer":
        """Build a vocabulary from ``texts``, keeping at most ``max_vocab_size`` tokens in all."""
        if isinstance(texts, str):
            raise ValueError("texts must be an iterable of strings, not a single string; wrap it in a list")
        counts = Counter()
        for text in texts:
            counts.update(split_words(text, lowercase=lowercase))
        ordered = sorted(counts, key=lambda token: (-counts[token], token))
        if max_vocab_size is not None:
            if max_vocab_size < 3:
                raise ValueError(f"max_vocab_size={max_vocab_size} is invalid; expected at least 3")
            ordered = ordered[: max_vocab_size - 2]
        return cls([cls.pad_token, cls.unk_token, *ordered], lowercase=lowercase)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into tokens, replacing those outside the vocabulary by ``<unk>``."""
        return [token if token in self.token_to_id else self.unk_token
                for token in split_words(text, lowercase=self.lowercase)]

    def encode(self, text: str) -> list[int]:
        """Convert ``text`` to a list of token ids."""
        return [self.token_to_id.get(token, self.unk_id)
                for token in split_words(text, lowercase=self.lowercase)]

    def decode(self, ids: Iterable[int]) -> str:
        """Join the tokens of ``ids`` with spaces, dropping padding."""
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"ids must be a sequence of int token ids, got {type(ids).__name__} {ids!r}")
        tokens = []
        for index in ids:
            index = _check_token_id(index)
            if not 0 <= index < len(self.vocab):
                raise ValueError(f"token id {index} is outside the vocabulary of size {len(self.vocab)}")
            if index != self.pad_id:
                tokens.append(self.vocab[index])
        return " ".join(tokens)

    def encode_batch(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode ``texts`` and right-pad them to a common length.

        Returns:
            ``ids`` of shape ``(batch, max_len)`` and ``lengths`` of shape
            ``(batch,)``, the number of real tokens in each row.
        """
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise ValueError(
                f"texts must be a list of strings, got {type(texts).__name__}; wrap a single text "
                f"in a list"
            )
        encoded = [self.encode(text) for text in texts]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        max_len = int(lengths.max()) if encoded else 0
        ids = torch.full((len(encoded), max_len), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return ids, lengths


def _check_token_id(index: object) -> int:
    """Return ``index`` as an int: a Python or NumPy integer, or a one-element integer tensor."""
    if isinstance(index, Tensor) and index.numel() == 1 and not (
        index.is_floating_point() or index.is_complex() or index.dtype == torch.bool
    ):
        return int(index)
    if is_int(index):
        return int(index)
    raise ValueError(f"token id {index!r} of type {type(index).__name__} is invalid; expected an int")


# The sentence every chapter of Part I draws its attention maps on. Its
# repeated words ("the" three times, "mat" twice) make the effect of identical
# embeddings visible before any training.
EXAMPLE_SENTENCE = "The cat sat on the mat because the mat was warm."
