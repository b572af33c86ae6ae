"""WordTokenizer and the book's plotting helpers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from llm_scratch.plotting import STYLE_PATH, plot_attention, use_book_style
from llm_scratch.tokenizer import EXAMPLE_SENTENCE, WordTokenizer, split_words


def test_split_words_keeps_punctuation_and_contractions():
    assert split_words("Don't stop, Bob!") == ["don't", "stop", ",", "bob", "!"]


def test_split_words_can_keep_case():
    assert split_words("The Cat", lowercase=False) == ["The", "Cat"]


def test_vocabulary_orders_by_frequency_then_alphabet():
    tokenizer = WordTokenizer.from_texts(["b a b c", "c b"])

    assert tokenizer.vocab == ["<pad>", "<unk>", "b", "c", "a"]


def test_encode_decode_round_trip():
    tokenizer = WordTokenizer.from_texts([EXAMPLE_SENTENCE])
    ids = tokenizer.encode(EXAMPLE_SENTENCE)

    assert tokenizer.decode(ids) == " ".join(split_words(EXAMPLE_SENTENCE))
    assert len(ids) == 12


def test_unknown_word_maps_to_unk():
    tokenizer = WordTokenizer.from_texts(["the cat"])

    assert tokenizer.encode("the dog") == [tokenizer.token_to_id["the"], tokenizer.unk_id]
    assert tokenizer.tokenize("the dog") == ["the", "<unk>"]


def test_max_vocab_size_keeps_most_frequent():
    tokenizer = WordTokenizer.from_texts(["a a a b b c"], max_vocab_size=4)

    assert tokenizer.vocab == ["<pad>", "<unk>", "a", "b"]
    assert len(tokenizer) == 4


def test_encode_batch_pads_on_the_right():
    tokenizer = WordTokenizer.from_texts(["a b c"])
    ids, lengths = tokenizer.encode_batch(["a b c", "b"])

    assert ids.tolist() == [[2, 3, 4], [3, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_from_texts_rejects_single_string():
    with pytest.raises(ValueError, match="not a single string"):
        WordTokenizer.from_texts("the cat")


def test_decode_rejects_unknown_id():
    tokenizer = WordTokenizer.from_texts(["a b"])
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary of size 4"):
        tokenizer.decode([9])


def test_constructor_rejects_missing_special_tokens():
    with pytest.raises(ValueError, match="vocab must start with"):
        WordTokenizer(["a", "b"])


def test_book_style_file_ships_with_package():
    assert STYLE_PATH.is_file()


def test_use_book_style_sets_figure_size():
    with plt.style.context("default"):
        use_book_style()

        assert list(plt.rcParams["figure.figsize"]) == [6.4, 4.0]
        assert plt.rcParams["axes.spines.top"] is False


def test_plot_attention_labels_axes_with_tokens():
    weights = torch.softmax(torch.randn(3, 4), dim=-1)

    ax = plot_attention(weights, ["a", "b", "c"], ["w", "x", "y", "z"], title="demo")

    assert [label.get_text() for label in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["w", "x", "y", "z"]
    assert ax.get_title() == "demo"
    plt.close(ax.figure)


def test_plot_attention_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match="weights has shape \\(3, 3\\) but there are 2 query tokens"):
        plot_attention(torch.zeros(3, 3), ["a", "b"])
