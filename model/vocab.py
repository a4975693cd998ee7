"""Caption tokenization and the word vocabulary of VSRN.

The reference (KunpengLi1994/VSRN, like VSE++ before it) tokenizes each caption with
``nltk.word_tokenize(caption.lower())`` and maps tokens through a vocabulary of the words seen at
least 4 times in the train + dev captions, after four special tokens: ``<pad>`` = 0,
``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3. A caption becomes ``<start> w1 .. wn <end>``.

This module provides

* :func:`tokenize`: the reference tokenization without NLTK's downloadable data (see its docstring
  for the exact differences);
* :class:`Vocabulary`: ids <-> words, ``encode`` / ``decode`` of captions and a JSON file format;
* :func:`build_vocab`: a vocabulary from captions, the reference's way (count >= threshold);
* :func:`load_reference_vocab`: the official ``*_precomp_vocab.pkl`` files, read with an unpickler
  that can only build the vocabulary and refuses anything else, so a pickle cannot run code;
* :func:`pad_captions`: a batch of id sequences -> padded ids and lengths.

This module is library code: it imports nothing from the rest of the project.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from nltk.tokenize import TreebankWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
from torch import Tensor

from model.atomic import atomic_write
from model.vsrn import END_ID, PAD_ID, START_ID, UNK_ID

__all__ = [
    "SPECIAL_TOKENS",
    "UnsafePickleError",
    "Vocabulary",
    "VocabularyError",
    "build_vocab",
    "load_reference_vocab",
    "pad_captions",
    "tokenize",
]

#: The special tokens, at ids 0..3 in every vocabulary (the reference's order).
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<start>", "<end>", "<unk>")
assert [PAD_ID, START_ID, END_ID, UNK_ID] == list(range(len(SPECIAL_TOKENS)))

#: The JSON vocabulary file format written by :meth:`Vocabulary.save_json`.
VOCAB_FORMAT = "vsrn-vocab"
VOCAB_FORMAT_VERSION = 1

# The classes the official vocabulary pickles name: they were written by the reference's
# vocab.py run as a script (``__main__.Vocabulary``); a pickle written by a program that imported
# that module names ``vocab.Vocabulary``. Nothing else may be loaded from such a file.
_REFERENCE_VOCAB_CLASSES = frozenset({("__main__", "Vocabulary"), ("vocab", "Vocabulary")})


class VocabularyError(ValueError):
    """A vocabulary or vocabulary file is malformed; the message names the file when there is one."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (class or function) that the loader does not allow.

    Raised before that global is looked up, so nothing named in the file has run.
    """


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


class _ReferenceWordTokenizer(TreebankWordTokenizer):
    """NLTK's Treebank tokenizer with the rules ``nltk.word_tokenize`` adds to it.

    From NLTK 3.2.4 through 3.4 (the vocabularies were built with the former, the reference
    trained with the latter), ``word_tokenize`` used a TreebankWordTokenizer whose rules were
    extended to split off unicode quotes (« » “ ” ‘ ’ „, and runs of backticks) and a sentence-final
    period followed by such quotes. The rules are added to this subclass's own copies of the rule
    lists, so NLTK's class is not modified. NLTK 3.4 also split an opening single quote before a
    one-letter word ("'a" -> "'", "a"); that rule is left out because the official vocabularies
    contain the token "'a", which it would never produce.
    """

    STARTING_QUOTES = [(re.compile("([«“‘„]|[`]+)"), r" \1 "), *TreebankWordTokenizer.STARTING_QUOTES]
    ENDING_QUOTES = [(re.compile("([»”’])"), r" \1 "), *TreebankWordTokenizer.ENDING_QUOTES]
    PUNCTUATION = [
        (re.compile(r"([^\.])(\.)([\]\)}>\"'»”’ ]*)\s*$"), r"\1 \2 \3 "),
        *TreebankWordTokenizer.PUNCTUATION,
    ]


# Abbreviations after which a period does not end a sentence. The trained English Punkt model of
# the reference knows many; these are the ones the official vocabularies show it kept together
# ("st.", "dr.", "ave.", "u.s." are vocabulary tokens, which only a non-breaking period leaves),
# plus the common titles. Punkt stores them lowercased and without the final period.
_ABBREVIATIONS = frozenset({"st", "dr", "ave", "u.s", "mr", "mrs", "ms"})


def _sentence_splitter() -> PunktSentenceTokenizer:
    """An untrained Punkt sentence splitter (no downloaded data) that knows ``_ABBREVIATIONS``."""
    parameters = PunktParameters()
    parameters.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(parameters)


_WORD_TOKENIZER = _ReferenceWordTokenizer()
_SENTENCE_SPLITTER = _sentence_splitter()


def tokenize(caption: str) -> list[str]:
    """Lowercase and tokenize one caption the way the reference does.

    The reference calls ``nltk.word_tokenize(caption.lower())``, which first splits the text into
    sentences with NLTK's trained English Punkt model (downloadable data that we cannot rely on)
    and then tokenizes each sentence, so only a sentence-final period is split off
    ("a man. a dog" -> a, man, ., a, dog; a Treebank tokenizer alone would give "man."). Here the
    sentences are split by an *untrained* ``PunktSentenceTokenizer``, which needs no data, told a
    few abbreviations ("st.", "dr.", "ave.", "u.s.", "mr.", "mrs.", "ms."). It splits where the
    trained model does except after other abbreviations the trained model knows (it learned
    hundreds, and word collocations): "no. 5" ends a sentence here, giving "no", "." where the
    reference may keep "no.". Single-sentence captions, nearly all of COCO and Flickr30K,
    tokenize identically. Captions of plain words, digits, hyphens and commas with at most a final
    period (most of COCO and Flickr30K) skip NLTK: `_simple_tokens` gives NLTK's tokens for
    them some 40 times faster. Two Python 2 details of the reference are not reproduced: its
    ``lower()`` ran on UTF-8 bytes (only ASCII letters were lowercased) and its regular
    expressions treated only ASCII characters as word characters and whitespace.

    >>> tokenize("A man's dog, running.")
    ['a', 'man', "'s", 'dog', ',', 'running', '.']
    """
    if not isinstance(caption, str):
        # Bytes here are the Python 3 port bug of the reference (captions read with 'rb' became
        # "b'...'" tokens); refuse them instead of tokenizing their repr.
        raise TypeError(f"captions must be str, got {type(caption).__name__}; decode the text first (UTF-8)")
    text = caption.lower()
    simple = _simple_tokens(text)
    if simple is not None:
        return simple
    return [token for sentence in _SENTENCE_SPLITTER.tokenize(text) for token in _WORD_TOKENIZER.tokenize(sentence)]


# Lowercased captions made of ASCII letters, digits, spaces, hyphens and commas, with at most one
# period, at the end: the bulk of COCO and Flickr30K. On them the sentence splitter finds one
# sentence and, of NLTK's Treebank rules (~60 regular expression substitutions, ~250 us a
# caption), only three do anything: a comma not followed by a digit becomes a token ("1,000"
# stays whole), the final period becomes a token, and the contractions below split. Texts with two
# commas in a row (whose NLTK result depends on overlapping matches), a double dash (a token of
# its own) or those contractions go the NLTK way.
# tests/model/test_vocab.py compares both ways on many random texts of this alphabet.
_SIMPLE_TEXT = re.compile(r"[a-z0-9 ,\-]*(?:\.[ ]*)?")
_SIMPLE_COMMA = re.compile(r",(?!\d)")
_TREEBANK_CONTRACTIONS = ("cannot", "gimme", "gonna", "gotta", "lemme", "wanna")  # CONTRACTIONS2 without quotes


def _simple_tokens(text: str) -> list[str] | None:
    """`tokenize`'s result for a lowercased `text` of the simple kind above, else None."""
    if not _SIMPLE_TEXT.fullmatch(text) or ",," in text or ",." in text or "--" in text:
        return None
    if any(word in text for word in _TREEBANK_CONTRACTIONS):
        return None
    body = text.rstrip(" ")
    final_period = body.endswith(".")
    tokens = _SIMPLE_COMMA.sub(" , ", body[:-1] if final_period else body).split()
    if final_period:
        tokens.append(".")
    return tokens


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


class Vocabulary:
    """Words <-> ids. ``idx2word`` lists the words in id order; ``word2idx`` is its inverse.

    Ids 0..3 are always ``<pad>``, ``<start>``, ``<end>``, ``<unk>``; unknown words map to
    ``<unk>``.
    """

    def __init__(self, words: Iterable[str]) -> None:
        """``words``: every word in id order, the four special tokens first."""
        self.idx2word: list[str] = list(words)
        self.word2idx: dict[str, int] = {}
        for index, word in enumerate(self.idx2word):
            if not isinstance(word, str) or not word:
                raise VocabularyError(f"word {index} must be a non-empty string, got {word!r}")
            if word in self.word2idx:
                raise VocabularyError(f"duplicate word {word!r} at ids {self.word2idx[word]} and {index}")
            self.word2idx[word] = index
        for index, token in enumerate(SPECIAL_TOKENS):
            found = self.idx2word[index] if index < len(self.idx2word) else None
            if found != token:
                raise VocabularyError(f"id {index} must be the special token {token!r}, got {found!r}")

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        """The id of ``word``; ``<unk>``'s id for a word not in the vocabulary."""
        return self.word2idx.get(word, UNK_ID)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, caption: str) -> list[int]:
        """``<start>``, the ids of the caption's tokens (see :func:`tokenize`), ``<end>``."""
        return [START_ID, *(self(token) for token in tokenize(caption)), END_ID]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """The words of ``ids`` joined by spaces: a leading ``<start>`` is skipped and decoding
        stops at the first ``<end>`` or ``<pad>``."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        words: list[str] = []
        for position, value in enumerate(ids):
            index = int(value)
            if index in (END_ID, PAD_ID):
                break
            if position == 0 and index == START_ID:
                continue
            if not 0 <= index < len(self.idx2word):
                raise VocabularyError(
                    f"id {index} at position {position} is outside the vocabulary (0..{len(self) - 1})")
            words.append(self.idx2word[index])
        return " ".join(words)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as JSON (format name, version, the words in id order).

        The file is written beside its destination and renamed into place, so a reader sees the
        old file or the complete new one.
        """
        payload = {"format": VOCAB_FORMAT, "format_version": VOCAB_FORMAT_VERSION, "words": self.idx2word}
        _write_text_atomic(Path(path), json.dumps(payload, ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> "Vocabulary":
        """Read a file written by :meth:`save_json`; malformed content raises
        :class:`VocabularyError` naming the file."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise VocabularyError(f"{path}: not UTF-8 text ({error})") from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise VocabularyError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise VocabularyError(f"{path}: expected a JSON object, got {type(payload).__name__}")
        if payload.get("format") != VOCAB_FORMAT:
            raise VocabularyError(f"{path}: 'format' is {payload.get('format')!r}, expected {VOCAB_FORMAT!r}")
        version = payload.get("format_version")
        if version != VOCAB_FORMAT_VERSION:
            raise VocabularyError(
                f"{path}: unsupported 'format_version' {version!r} (this code reads version {VOCAB_FORMAT_VERSION})"
            )
        words = payload.get("words")
        if not isinstance(words, list):
            raise VocabularyError(f"{path}: 'words' must be a list of strings, got {type(words).__name__}")
        try:
            return cls(words)
        except VocabularyError as error:
            raise VocabularyError(f"{path}: {error}") from None


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s directory, then rename it over ``path``."""
    with atomic_write(path) as stream:
        stream.write(text)


def build_vocab(captions: Iterable[str], threshold: int = 4) -> Vocabulary:
    """The vocabulary of the words that occur at least ``threshold`` times in ``captions``.

    The reference uses threshold 4 on the train + dev captions. Its word order came from iterating
    a Python 2 dict, which cannot be reproduced, so the official ids cannot be rebuilt; use
    :func:`load_reference_vocab` to get them. Here the words follow the special tokens by
    descending count, ties in alphabetical (code point) order: the result depends only on the
    counts, not on the order in which caption files or shards are read, and frequent words get
    small ids.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    counts: Counter[str] = Counter()
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {index} must be str, got {type(caption).__name__}; decode the text first (UTF-8)")
        counts.update(tokenize(caption))
    special = set(SPECIAL_TOKENS)
    words = sorted((w for w, c in counts.items() if c >= threshold and w not in special), key=lambda w: (-counts[w], w))
    return Vocabulary([*SPECIAL_TOKENS, *words])


# --------------------------------------------------------------------------------------------------
# The official vocabulary pickles
# --------------------------------------------------------------------------------------------------


def _global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 resolves a pickled global: protocol <= 2 pickles (Python 2's,
    and Python 3's written for it) say ``__builtin__.eval`` for ``builtins.eval``."""
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


class _PickledVocabularyState:
    """Stand-in for the reference's ``Vocabulary`` class: it only keeps the pickled attributes."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ReferenceVocabUnpickler(pickle.Unpickler):
    """Resolves exactly the reference's ``Vocabulary`` class (to a stand-in) and no other global."""

    def __init__(self, stream: Any, source: Path) -> None:
        # encoding="bytes": Python 2 byte strings arrive as bytes and are decoded (UTF-8) below,
        # explicitly, rather than guessed as latin-1.
        super().__init__(stream, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REFERENCE_VOCAB_CLASSES:
            return _PickledVocabularyState
        raise UnsafePickleError(
            f"{self.source}: refusing to load global {_global_name(module, name)}: a vocabulary pickle may only "
            f"contain a Vocabulary object (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing a persistent id in a vocabulary pickle")


def _as_text(value: Any, what: str, source: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise VocabularyError(f"{source}: {what} {value!r} is not UTF-8") from None
    raise VocabularyError(f"{source}: {what} must be a string, got {type(value).__name__}")


def load_reference_vocab(path: str | os.PathLike[str]) -> Vocabulary:
    """Read an official ``*_precomp_vocab.pkl`` (a Python 2 protocol-2 pickle of the reference's
    ``Vocabulary`` with ``word2idx``, ``idx2word`` and ``idx``).

    Only that class can be named by the pickle; any other global raises
    :class:`UnsafePickleError` before it is looked up. The attributes are checked to agree: ids
    0..n-1 each with one word, ``word2idx`` the inverse of ``idx2word``, ``idx`` = n and the
    special tokens at ids 0..3.
    """
    path = Path(path)
    with open(path, "rb") as stream:
        try:
            loaded = _ReferenceVocabUnpickler(stream, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise VocabularyError(
                f"{path}: not a readable vocabulary pickle ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, _PickledVocabularyState) or not isinstance(loaded.state, dict):
        raise VocabularyError(f"{path}: expected a pickled Vocabulary object, got {type(loaded).__name__}")
    state = {_as_text(key, "attribute name", path): value for key, value in loaded.state.items()}
    missing = [name for name in ("word2idx", "idx2word") if not isinstance(state.get(name), dict)]
    if missing:
        raise VocabularyError(f"{path}: the pickled Vocabulary lacks the dict attribute(s) {', '.join(missing)}")
    idx2word = {index: _as_text(word, f"idx2word[{index!r}]", path) for index, word in state["idx2word"].items()}
    word2idx = {_as_text(word, "word2idx key", path): index for word, index in state["word2idx"].items()}
    size = len(idx2word)
    if any(type(i) is not int for i in idx2word) or sorted(idx2word) != list(range(size)):
        raise VocabularyError(f"{path}: idx2word ids are not exactly 0..{size - 1}")
    words = [idx2word[i] for i in range(size)]
    inverse = {word: index for index, word in enumerate(words)}
    if word2idx != inverse:
        wrong = sorted(set(word2idx.items()) ^ set(inverse.items()), key=repr)[:5]
        raise VocabularyError(f"{path}: word2idx and idx2word disagree (e.g. {wrong}); "
                              f"{len(word2idx)} and {size} entries")
    if "idx" in state and state["idx"] != size:
        raise VocabularyError(f"{path}: idx is {state['idx']!r} but the vocabulary has {size} words")
    try:
        return Vocabulary(words)
    except VocabularyError as error:
        raise VocabularyError(f"{path}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def pad_captions(ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token id sequences -> (ids (B, T) padded with ``<pad>`` = 0, lengths (B,)), both int64.

    The order is kept (no sorting by length): the text encoder accepts any order.
    """
    if len(ids) == 0:
        raise ValueError("pad_captions needs at least one caption")
    lengths = torch.tensor([len(sequence) for sequence in ids], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise ValueError(f"caption {int(torch.argmin(lengths))} is empty; every caption needs at least one token")
    tokens = torch.full((len(ids), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, sequence in enumerate(ids):
        tokens[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return tokens, lengths
