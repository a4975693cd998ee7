"""Tests of model/vocab.py: reference tokenization, vocabularies and the official pickles."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from model.vocab import (
    _SENTENCE_SPLITTER,
    _WORD_TOKENIZER,
    SPECIAL_TOKENS,
    UnsafePickleError,
    Vocabulary,
    VocabularyError,
    build_vocab,
    load_reference_vocab,
    pad_captions,
    tokenize,
)
from model.vocab import _simple_tokens
from model.vsrn import END_ID, PAD_ID, START_ID, UNK_ID
from reference_layout import RunsCommand, official_vocab_path, vocab_words, write_reference_vocab_pickle


# --------------------------------------------------------------------------------------------------
# Tokenization (expected tokens worked out by hand from the Penn Treebank conventions)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, tokens",
    [
        ("A man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
        ("A MAN's Dog", ["a", "man", "'s", "dog"]),
        ("Two dogs, one cat; and a bird!", ["two", "dogs", ",", "one", "cat", ";", "and", "a", "bird", "!"]),
        ("The dog can't swim", ["the", "dog", "ca", "n't", "swim"]),
        ("They're at the 3.5 mile mark", ["they", "'re", "at", "the", "3.5", "mile", "mark"]),
        ("A t-shirt (red) on a rack", ["a", "t-shirt", "(", "red", ")", "on", "a", "rack"]),
        ('A sign that says "stop"', ["a", "sign", "that", "says", "``", "stop", "''"]),
        ("a dog in the field..", ["a", "dog", "in", "the", "field.."]),  # "field.." is a vocabulary token
        ("“Quoted” words.", ["“", "quoted", "”", "words", "."]),  # unicode quotes, as word_tokenize splits them
        ("  A cat  ", ["a", "cat"]),
        ("", []),
    ],
)
def test_tokenize_examples(caption: str, tokens: list[str]) -> None:
    assert tokenize(caption) == tokens


def test_tokenize_splits_sentences_like_word_tokenize() -> None:
    # word_tokenize splits sentences first, so the period inside the caption is its own token...
    assert tokenize("A man. A dog") == ["a", "man", ".", "a", "dog"]
    # ...but not after a known abbreviation ("st." is a token of the official vocabularies).
    assert tokenize("A man on St. Mark's street.") == ["a", "man", "on", "st.", "mark", "'s", "street", "."]


def _nltk_tokens(text: str) -> list[str]:
    """tokenize's NLTK way (sentence splitter, then the Treebank rules), without its fast path."""
    return [token for sentence in _SENTENCE_SPLITTER.tokenize(text) for token in _WORD_TOKENIZER.tokenize(sentence)]


def _random_simple_text(rng: random.Random) -> str:
    """A text over the fast path's alphabet (letters, digits, spaces, hyphens, commas, periods), built
    from caption-like pieces and the awkward ones: commas before digits and in runs, periods
    inside, trailing spaces, Treebank contractions alone and inside words."""
    pieces = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.55:
            pieces.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))))
        elif kind < 0.65:
            pieces.append(rng.choice(["1,000", "3", "42", "7,5", "0"]))
        elif kind < 0.72:
            pieces.append(rng.choice(["cannot", "wanna", "gonna", "gimme", "gotta", "lemme", "scannotes", "wannabe"]))
        else:
            pieces.append(rng.choice([",", ",", ".", ",,", ", ,", ",.", "..", ",1", " ", "  ", "-", "--", "t-shirt", "-,"]))
    text = "".join(piece + (" " if rng.random() < 0.7 else "") for piece in pieces)
    return text + rng.choice(["", ".", ". ", " .", "  ", ",", ".."])


def test_tokenize_fast_path_equals_nltk_on_its_alphabet() -> None:
    rng = random.Random(0)
    texts = [_random_simple_text(rng) for _ in range(4000)] + [
        "a man riding a wave on top of a surfboard.", "two dogs, one cat and 1,000 birds .", "", " ", ".",
        " . ", ",", ",5", ",,a", "a,,b", "a,.", "a,", ", a", "5.", "st.", "a dog,", "cannot.", "a. b"]
    fast = 0
    for text in texts:
        simple = _simple_tokens(text)
        assert tokenize(text) == _nltk_tokens(text), text
        if simple is not None:
            fast += 1
            assert simple == _nltk_tokens(text), text
    assert fast > len(texts) // 4  # the comparison covers the fast path well, not just the fallback


def test_tokenize_fast_path_takes_ordinary_captions() -> None:
    for caption in ("A man riding a wave on top of a surfboard.", "Two dogs, one cat, and 3 birds",
                    "A kitchen with 2 sinks , a stove and 1,000 plates .", "A man in a t-shirt"):
        assert _simple_tokens(caption.lower()) is not None
    for caption in ("A man's dog.", "It cannot swim", "A man. A dog", "Two dogs,, one cat", "Où?"):
        assert _simple_tokens(caption.lower()) is None


def test_tokenize_refuses_bytes() -> None:
    # The Python 3 bug of the reference: captions read as bytes became "b'..." tokens.
    with pytest.raises(TypeError, match="must be str"):
        tokenize(b"a man riding a horse")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def _small_vocab() -> Vocabulary:
    return Vocabulary([*SPECIAL_TOKENS, "a", "man", "riding", "horse", ".", "'s"])


def test_special_ids_and_lookup() -> None:
    vocab = _small_vocab()
    assert [vocab(t) for t in SPECIAL_TOKENS] == [PAD_ID, START_ID, END_ID, UNK_ID] == [0, 1, 2, 3]
    assert len(vocab) == 10
    assert vocab("man") == 5 and vocab.idx2word[5] == "man" and vocab.word2idx["man"] == 5
    assert vocab("zebra") == UNK_ID and "zebra" not in vocab


def test_encode_decode_round_trip() -> None:
    vocab = _small_vocab()
    ids = vocab.encode("A man riding a horse.")
    assert ids == [START_ID, 4, 5, 6, 4, 7, 8, END_ID]
    assert vocab.decode(ids) == "a man riding a horse ."
    # Unknown words become <unk>; decoding stops at <end> and at padding.
    assert vocab.encode("A zebra") == [START_ID, 4, UNK_ID, END_ID]
    assert vocab.decode([START_ID, 5, END_ID, 6, 6]) == "man"
    assert vocab.decode(torch.tensor([5, 9, PAD_ID, 7])) == "man 's"
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        vocab.decode([5, 99])


def test_vocabulary_validation() -> None:
    with pytest.raises(VocabularyError, match="id 1 must be the special token '<start>'"):
        Vocabulary(["<pad>", "<end>", "<start>", "<unk>"])
    with pytest.raises(VocabularyError, match="duplicate word 'man'"):
        Vocabulary([*SPECIAL_TOKENS, "man", "man"])
    with pytest.raises(VocabularyError, match="id 3"):
        Vocabulary(SPECIAL_TOKENS[:3])


def test_build_vocab_threshold_and_order() -> None:
    captions = ["a dog runs"] * 3 + ["a cat runs", "a cat sits", "a cat"] + ["zebra"] * 2
    # counts: a 6, cat 3, runs 4, dog 3, sits 1, zebra 2
    vocab = build_vocab(captions, threshold=3)
    assert vocab.idx2word == [*SPECIAL_TOKENS, "a", "runs", "cat", "dog"]  # by count, ties alphabetical
    assert build_vocab(reversed(captions), threshold=3) == vocab  # independent of the caption order
    assert build_vocab(captions, threshold=1).idx2word[4:] == ["a", "runs", "cat", "dog", "zebra", "sits"]
    assert "zebra" in build_vocab(captions, threshold=2) and "zebra" not in vocab
    assert len(build_vocab(captions)) == len(SPECIAL_TOKENS) + 2  # threshold 4 (the reference): a, runs
    with pytest.raises(TypeError, match="caption 1 must be str"):
        build_vocab(["a dog", b"a cat"])  # type: ignore[list-item]


def test_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary([*SPECIAL_TOKENS, "café", "'s", "t-shirt"])
    path = tmp_path / "vocab.json"
    vocab.save_json(path)
    assert Vocabulary.load_json(path) == vocab
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["format"] == "vsrn-vocab" and payload["format_version"] == 1
    assert payload["words"] == vocab.idx2word
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary files left


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "other", "format_version": 1, "words": []}', "'format' is 'other'"),
        ('{"format": "vsrn-vocab", "format_version": 7, "words": []}', "unsupported 'format_version' 7"),
        ('{"format": "vsrn-vocab", "format_version": 1, "words": "abc"}', "'words' must be a list"),
        ('{"format": "vsrn-vocab", "format_version": 1, "words": ["<pad>", "<start>", "<unk>", "<end>"]}',
         "id 2 must be the special token '<end>'"),
        ('{"format": "vsrn-vocab", "format_version": 1, "words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}',
         "duplicate word 'a'"),
        ('{"format": "vsrn-vocab", "format_version": 1, "words": ["<pad>", "<start>", "<end>", "<unk>", 5]}',
         "word 4 must be a non-empty string"),
    ],
)
def test_load_json_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VocabularyError) as error:
        Vocabulary.load_json(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_pad_captions() -> None:
    tokens, lengths = pad_captions([[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]])
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert lengths.tolist() == [3, 2, 5]  # input order, not sorted
    assert tokens.tolist() == [[1, 5, 2, 0, 0], [1, 2, 0, 0, 0], [1, 7, 8, 9, 2]]
    with pytest.raises(ValueError, match="caption 1 is empty"):
        pad_captions([[1, 2], []])


# --------------------------------------------------------------------------------------------------
# The official vocabulary pickles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_name, size", [("coco_precomp", 10006), ("f30k_precomp", 8481)])
def test_official_vocabularies(data_name: str, size: int) -> None:
    vocab = load_reference_vocab(official_vocab_path(data_name))
    assert len(vocab) == size
    assert vocab.idx2word[:4] == list(SPECIAL_TOKENS)
    for word in ("man", "dog", "a", ".", "'s", "t-shirt", "riding"):
        index = vocab(word)
        assert index > UNK_ID and vocab.idx2word[index] == word and vocab.word2idx[word] == index
    ids = vocab.encode("A man riding a horse.")
    assert UNK_ID not in ids and vocab.decode(ids) == "a man riding a horse ."


def test_official_vocabulary_ids_match_the_pickle() -> None:
    # The ids must be exactly the pickled ones (the checkpoints' embedding rows follow them); read
    # the pickle's dicts independently with the standard unpickler restricted to a stand-in class.
    path = official_vocab_path("coco_precomp")

    class Holder:
        def __setstate__(self, state: dict) -> None:
            self.state = state

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            assert (module, name) == ("__main__", "Vocabulary")
            return Holder

    with open(path, "rb") as stream:
        state = Reader(stream, encoding="latin1").load().state
    vocab = load_reference_vocab(path)
    assert vocab.word2idx == state["word2idx"]
    assert vocab.idx2word == [state["idx2word"][i] for i in range(state["idx"])]


@pytest.mark.parametrize("module", ["__main__", "vocab"])
@pytest.mark.parametrize("py2_words", [False, True])
def test_reference_layout_pickles(tmp_path: Path, module: str, py2_words: bool) -> None:
    words = vocab_words(30)
    path = tmp_path / "v.pkl"
    write_reference_vocab_pickle(path, words, module=module, py2_words=py2_words)
    assert load_reference_vocab(path).idx2word == words


@pytest.mark.parametrize("payload", ["os_system", "eval"])
def test_restricted_unpickler_refuses_malicious_pickles(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    if payload == "os_system":
        evil = RunsCommand(os.system, f"touch {marker}")
        expected = "system"
    else:
        evil = RunsCommand(eval, f"open({str(marker)!r}, 'w').close()")
        expected = "builtins.eval"
    path = tmp_path / "evil_vocab.pkl"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafePickleError) as error:
        load_reference_vocab(path)
    assert str(path) in str(error.value) and expected in str(error.value) and "refusing" in str(error.value)
    assert not marker.exists()


def test_reference_pickle_errors(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pkl"
    write_reference_vocab_pickle(truncated, vocab_words(10))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(VocabularyError, match="truncated.pkl: not a readable vocabulary pickle"):
        load_reference_vocab(truncated)
    not_vocab = tmp_path / "list.pkl"
    not_vocab.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(VocabularyError, match="expected a pickled Vocabulary object, got list"):
        load_reference_vocab(not_vocab)
    bad_specials = tmp_path / "specials.pkl"
    write_reference_vocab_pickle(bad_specials, ["<start>", "<pad>", "<end>", "<unk>", "a"])
    with pytest.raises(VocabularyError, match="specials.pkl: id 0 must be the special token '<pad>'"):
        load_reference_vocab(bad_specials)
