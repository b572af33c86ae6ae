"""A small word-level tokenizer, so chapters can run on real text without downloading a vocabulary."""

import re
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor

# Words (letters, digits and inner apostrophes, as in "don't") or single
# punctuation marks. Whitespace separates tokens and is not kept.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """Split ``text`` into word and punctuation tokens."""
    if lowercase:
        text = text.lower()
    return _TOKEN_PATTERN.findall(text)


class WordTokenizer:
    """Map words and punctuation to integer ids with a vocabulary built from example texts.

    Id 0 is ``<pad>`` and id 1 is ``<unk>``, the id of every token not seen
    when the vocabulary was built. The remaining ids follow frequency, most
    frequent first, with ties broken alphabetically, so the same texts always
    give the same vocabulary.
    """

    pad_token = "<pad>"
    unk_token = "<unk>"

    def __init__(self, vocab: list[str], lowercase: bool = True):
        if vocab[:2] != [self.pad_token, self.unk_token]:
            raise ValueError(
                f"vocab must start with {[self.pad_token, self.unk_token]}, got {vocab[:2]}"
            )
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab contains duplicate tokens")
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
        tokens = []
        for index in ids:
            index = int(index)
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
        encoded = [self.encode(text) for text in texts]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        max_len = int(lengths.max()) if encoded else 0
        ids = torch.full((len(encoded), max_len), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return ids, lengths


# The sentence every chapter of Part I draws its attention maps on. Its
# repeated words ("the" three times, "mat" twice) make the effect of identical
# embeddings visible before any training.
EXAMPLE_SENTENCE = "The cat sat on the mat because the mat was warm."
