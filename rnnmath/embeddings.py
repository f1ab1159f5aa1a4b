"""Pretrained word vectors: reading the word2vec / GloVe / fastText text format and initialising the
classifier's embedding rows from it (as Kim 2014's "non-static" CNN starts from word2vec).

The text format: one word a line followed by its E numbers, separated by spaces (``word v1 v2 ... vE``);
word2vec and fastText's ``.vec`` files start with a header line ``count E``, GloVe's have none. A ``.gz``
file is decompressed on the fly. A word that itself holds spaces (some GloVe files) is everything before the
last E fields, unless the field before them is a number too: a line with too many numbers is an error.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .data import Vocabulary, tokenize
from .errors import UserError


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) of a text file, gzip-compressed or not; UTF-8."""
    if not path.is_file():
        raise UserError(f"--embeddings {path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    yield n, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise UserError(f"{path} line {n}: not valid UTF-8; expected a word-vector text file "
                                    "(the binary word2vec format is not read: convert it to text)") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} line {n + 1}: cannot be read ({e}); expected a word-vector text file") from None


def _header(fields: list[str]) -> int | None:
    """E if ``fields`` is a word2vec header ``count E`` (two positive integers), else None."""
    if len(fields) == 2 and all(f.isdigit() for f in fields) and int(fields[1]) > 0:
        return int(fields[1])
    return None


def vector_size(path: str | os.PathLike) -> int:
    """E, the size of the vectors of a word-vector file: from its header, or from its first vector line."""
    for n, line in _lines(Path(path)):
        fields = line.split()
        if not fields:
            continue
        size = _header(fields)
        if size is None:
            size = len(fields) - 1
        if size < 1:
            raise UserError(f"{path} line {n}: expected 'word v1 v2 ...' or a header 'count dim', found {line!r}")
        return size
    raise UserError(f"{path}: holds no vectors; expected lines 'word v1 v2 ...'")


def read_vectors(path: str | os.PathLike, keep: set[str] | None = None) -> tuple[int, dict[str, Tensor]]:
    """E and {word: vector (E,) float32} of the words of ``path`` that are in ``keep`` (all if None).

    Every line is checked (E numbers after the word, all finite), also those of words not kept; the first of
    repeated words wins. Raises UserError naming the file and line of the first malformed line.
    """
    path = Path(path)
    size: int | None = None
    vectors: dict[str, Tensor] = {}
    for n, line in _lines(path):
        fields = line.rstrip(" ").split(" ")
        if not line.strip():
            continue
        if size is None:
            size = _header(line.split())
            header = size is not None
            if header:
                continue
            size, first = len(fields) - 1, n  # no header: the first vector sets E
            if size < 1:
                raise UserError(f"{path} line {n}: expected 'word v1 v2 ...' or a header 'count dim', "
                                f"found {line!r}")
        source = "as the header says" if header else f"as the first vector, line {first}, has"
        if len(fields) < size + 1 or not "".join(fields[:-size]).strip():
            raise UserError(f"{path} line {n}: expected a word and {size} numbers ({source}), found "
                            f"{len(fields) - 1} field(s) after the first")
        if len(fields) > size + 1 and _is_number(fields[-size - 1]) \
                and all(_is_number(v) for v in fields[-size:]):  # "phone 0.1 0.2 0.3 0.4" with E = 3
            raise UserError(f"{path} line {n}: {len(fields) - 1} numbers after the word, expected {size} ({source})")
        word = " ".join(fields[:-size])
        if keep is not None and word not in keep:
            numbers = fields[-size:]
            if any(not _is_number(v) for v in numbers):  # cheap check of lines we do not keep
                bad = next(v for v in numbers if not _is_number(v))
                raise UserError(f"{path} line {n}: {bad!r} is not a finite number")
            continue
        try:
            values = [float(v) for v in fields[-size:]]
        except ValueError:
            bad = next(v for v in fields[-size:] if not _is_number(v))
            raise UserError(f"{path} line {n}: {bad!r} is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{path} line {n}: holds a non-finite number; expected finite numbers")
        vectors.setdefault(word, torch.tensor(values, dtype=torch.float32))
    if size is None:
        raise UserError(f"{path}: holds no vectors; expected lines 'word v1 v2 ...'")
    return size, vectors


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def initialise_embeddings(weight: Tensor, vocab: Vocabulary, texts: Sequence[str], path: str | os.PathLike) -> dict:
    """Copy the vectors of ``path`` into the rows of ``weight`` (V, E) of the vocabulary's words: a word's
    own vector if the file has it, else the vector of the first file word whose case-folded form equals the
    word's (so ``Good`` serves ``good``). PAD and UNK keep their rows. Returns the coverage:
    ``{"words", "words_covered", "tokens", "tokens_covered", "vocabulary_share", "token_share"}``, tokens
    counted over ``texts`` (the training sentences; a word outside the vocabulary is not covered).

    Raises UserError if the file's vectors are not of size E.
    """
    words = vocab.words[2:]
    wanted = set(words)
    folded: dict[str, str] = {}  # case-folded vocabulary word -> the word
    for w in words:
        folded.setdefault(w.casefold(), w)

    class _Keep(set):  # exact words, and any file word whose case-folded form is a vocabulary word's
        def __contains__(self, word: object) -> bool:
            return set.__contains__(self, word) or (isinstance(word, str) and word.casefold() in folded)

    size, vectors = read_vectors(path, _Keep(wanted))
    if size != weight.shape[1]:
        raise UserError(f"--embeddings {path}: the vectors have {size} numbers, but the embedding has "
                        f"{weight.shape[1]}; pass --embedding-dim {size}")
    chosen: dict[str, Tensor] = {w: v for w, v in vectors.items() if w in wanted}
    for word, v in vectors.items():  # in file order: the first case-folded match wins
        w = folded.get(word.casefold())
        if w is not None and w not in chosen:
            chosen[w] = v
    with torch.no_grad():
        for word, v in chosen.items():
            weight[vocab.index[word]] = v
    tokens = covered = 0
    for text in texts:
        for t in tokenize(text):
            tokens += 1
            covered += t in chosen
    return {"words": len(words), "words_covered": len(chosen), "tokens": tokens, "tokens_covered": covered,
            "vocabulary_share": len(chosen) / len(words) if words else 0.0,
            "token_share": covered / tokens if tokens else 0.0}


def coverage_line(path: str | os.PathLike, coverage: dict) -> str:
    """``"--embeddings FILE: vectors for 72% of the vocabulary, 91% of the training tokens"``."""
    return (f"--embeddings {path}: vectors for {coverage['vocabulary_share']:.0%} of the vocabulary "
            f"({coverage['words_covered']} of {coverage['words']} words), "
            f"{coverage['token_share']:.0%} of the training tokens")
