"""Labelled sentences: file readers, the tokenizer, the vocabulary, encoding, splits, known datasets and the
built-in demo task.

Shape letters: N examples, T time (max_len).

Every reader returns ``Examples``: parallel lists of texts, labels (always strings: a JSON label ``1`` and a
TSV label ``1`` are the same class) and the 1-based line each record starts on, so that any later error can
name the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

FORMATS = ("auto", "tsv", "csv", "jsonl")
ON_BAD_LINE = ("error", "skip")


# -- tokenizer ---------------------------------------------------------------------------------------------
TOKEN = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lower-case the text and return its runs of ``[a-z0-9']`` in order.

    Everything else separates words: punctuation, white space, control characters, and letters outside
    a-z (so "café" gives "caf"). ``"Don't stop!!"`` -> ``["don't", "stop"]``.
    """
    return TOKEN.findall(text.lower())


# -- examples and readers ----------------------------------------------------------------------------------
@dataclass
class Examples:
    """Labelled texts read from ``source``; ``lines[i]`` is the 1-based line where record i starts.
    ``skipped`` holds the lines of bad records passed over with ``on_bad_line="skip"``."""

    texts: list[str]
    labels: list[str]
    lines: list[int]
    source: str = ""
    skipped: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> Examples:
        indices = list(indices)
        return Examples(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices],
            [self.lines[i] for i in indices], self.source,
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        return Examples(
            [t for p in parts for t in p.texts], [label for p in parts for label in p.labels],
            [n for p in parts for n in p.lines], " + ".join(p.source for p in parts),
            [n for p in parts for n in p.skipped],
        )


def read_examples(
    path: str | os.PathLike,
    format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    on_bad_line: str = "error",
) -> Examples:
    """Read labelled texts from a file.

    Formats (``auto`` picks by extension: .jsonl/.ndjson/.json -> jsonl, .csv -> csv, anything else -> tsv):

    * ``tsv``: one record a line, fields separated by TAB, no quoting. If the first line's fields include
      ``text_column`` and ``label_column`` it is a header; otherwise every line is ``sentence<TAB>label``
      (the UCI Sentiment Labelled Sentences format).
    * ``csv``: comma-separated with a header row naming the columns; standard CSV quoting.
    * ``jsonl``: one JSON object a line with ``text_column`` and ``label_column`` keys.

    Records are split on ``\\n`` only: a ``\\r`` before it is dropped, and characters that
    ``str.splitlines`` would also break on (``\\x85``, ``\\u2028``, ...) stay inside the sentence. Texts
    are stripped of surrounding white space; blank lines are ignored. Labels may be strings or integers.
    A UTF-8 BOM is allowed. A bad record raises ``UserError`` naming the file and line, or with
    ``on_bad_line="skip"`` is counted in ``Examples.skipped``.
    """
    if format not in FORMATS:
        raise UserError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if on_bad_line not in ON_BAD_LINE:
        raise UserError(f"--on-bad-line {on_bad_line!r} is not one of {', '.join(ON_BAD_LINE)}")
    name = str(path)
    text = read_text(path)
    if format == "auto":
        suffix = Path(path).suffix.lower()
        format = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(suffix, "tsv")
    reader = _Reader(name, on_bad_line)
    records = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    if format == "jsonl":
        reader.read_jsonl(records, text_column, label_column)
    elif format == "csv":
        reader.read_csv(records, text_column, label_column)
    else:
        reader.read_tsv(records, text_column, label_column)
    if not reader.examples.texts:
        if reader.examples.skipped:
            raise UserError(f"{name}: all {len(reader.examples.skipped)} records are bad; none left to use")
        raise UserError(f"{name}: the file holds no examples; expected at least one labelled record")
    return reader.examples


def read_text(path: str | os.PathLike) -> str:
    """The file's text, decoded as UTF-8 (with or without a BOM); a clear UserError if it cannot be."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; expected a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(
            f"{p} line {line}: byte 0x{data[e.start]:02x} is not valid UTF-8{hint}; expected a UTF-8 text file"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{p} line {line}: holds a NUL byte, so it looks binary or UTF-16; expected a UTF-8 "
                        "text file")
    return text


class _Reader:
    """Collects records into Examples; every bad record goes through `bad` (raise, or skip and count)."""

    def __init__(self, name: str, on_bad_line: str) -> None:
        self.name = name
        self.on_bad_line = on_bad_line
        self.examples = Examples([], [], [], name)

    def bad(self, line: int, expected: str) -> None:
        if self.on_bad_line == "error":
            raise UserError(f"{self.name} line {line}: {expected} (use --on-bad-line skip to skip such lines)")
        self.examples.skipped.append(line)

    def add(self, line: int, text, label) -> None:
        if not isinstance(text, str):
            return self.bad(line, f"expected the text to be a string, found {type(text).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            return self.bad(line, f"expected the label to be a string or integer, found {label!r}")
        label = str(label).strip()
        if not label:
            return self.bad(line, "expected a label, found an empty one")
        self.examples.texts.append(text.strip())
        self.examples.labels.append(label)
        self.examples.lines.append(line)

    def columns(self, header: list[str], text_column: str, label_column: str, where: str) -> tuple[int, int]:
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            found = ", ".join(repr(c) for c in header)
            raise UserError(
                f"{self.name} line 1: the {where} has no column {missing[0]!r}; found {found} "
                "(choose columns with --text-column and --label-column)"
            )
        return header.index(text_column), header.index(label_column)

    def read_tsv(self, records, text_column: str, label_column: str) -> None:
        records = [(n, line) for n, line in records if line.strip()]
        if not records:
            return
        first = [f.strip() for f in records[0][1].split("\t")]
        if (text_column in first) != (label_column in first):  # a header that lacks one of the two columns
            self.columns(first, text_column, label_column, "TSV header")
        if text_column in first and label_column in first:
            i_text, i_label = first.index(text_column), first.index(label_column)
            width, records = len(first), records[1:]
            expected = f"{width} tab-separated fields as in the header"
        else:
            i_text, i_label, width = 0, 1, 2
            expected = "'sentence<TAB>label' (2 tab-separated fields)"
        for n, line in records:
            fields = line.split("\t")
            if len(fields) != width:
                self.bad(n, f"expected {expected}, found {len(fields)} field(s)")
            else:
                self.add(n, fields[i_text], fields[i_label])

    def read_csv(self, records, text_column: str, label_column: str) -> None:
        # csv gets the lines we split on "\n" (not io's line splitting), so \x85 and \u2028 stay in fields
        lines = [line + "\n" for _, line in records]
        reader = csv.reader(lines, strict=True)
        start = 1
        header = None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader starts afresh on the next line, so the record can be skipped
                line, start = start, reader.line_num + 1
                if header is None:
                    raise UserError(f"{self.name} line {line}: broken CSV header ({e}); expected properly quoted "
                                    "column names") from None
                self.bad(line, f"broken CSV ({e}); expected properly quoted fields")
                continue
            line, start = start, reader.line_num + 1
            if not any(f.strip() for f in row):
                continue
            if header is None:
                header = [f.strip() for f in row]
                i_text, i_label = self.columns(header, text_column, label_column, "CSV header")
            elif len(row) != len(header):
                self.bad(line, f"expected {len(header)} comma-separated fields as in the header, found {len(row)}")
            else:
                self.add(line, row[i_text], row[i_label])

    def read_jsonl(self, records, text_column: str, label_column: str) -> None:
        for n, line in records:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad(n, f"expected one JSON object, found broken JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                self.bad(n, "expected one JSON object, found JSON nested too deeply to read")
                continue
            if not isinstance(record, dict):
                self.bad(n, f"expected a JSON object, found {type(record).__name__}")
            elif text_column not in record or label_column not in record:
                missing = text_column if text_column not in record else label_column
                self.bad(n, f"expected key {missing!r} in the JSON object, found keys {sorted(record)}")
            else:
                self.add(n, record[text_column], record[label_column])


# -- vocabulary and encoding -------------------------------------------------------------------------------
PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1; the tokenizer never yields them, so no word collides


class Vocabulary:
    """Word <-> id: PAD = 0, UNK = 1, then the training words, most frequent first.

    Ties in frequency are broken alphabetically, so the same texts always give the same vocabulary.
    ``len(vocab)`` counts PAD and UNK: a vocabulary of 400 words has 402 ids.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words = [PAD, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words) or PAD in words or UNK in words:
            raise ValueError("vocabulary words must be unique and must not be PAD or UNK")

    @classmethod
    def build(cls, texts: Iterable[str], size: int) -> Vocabulary:
        """The ``size`` most frequent words of ``texts``."""
        counts = Counter(w for text in texts for w in tokenize(text))
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
        return cls([w for w, _ in ranked[:size]])

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, text: str) -> list[int]:
        return [self.index.get(w, 1) for w in tokenize(text)]


def encode(texts: Sequence[str], vocab: Vocabulary, max_len: int) -> tuple[Tensor, Tensor]:
    """Token ids (N, T=max_len), padded with PAD and truncated to the first max_len words, and the true
    lengths (N,) after truncation (0 for a text without words)."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)  # (N, T)
    lengths = torch.zeros(len(texts), dtype=torch.long)  # (N,)
    for i, text in enumerate(texts):
        row = vocab.ids(text)[:max_len]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[i] = len(row)
    return ids, lengths


# -- splits ------------------------------------------------------------------------------------------------
def stratified_split(labels: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices 0..N-1 into len(fractions) parts holding each class in those proportions.

    Within each class (in sorted label order) the indices are shuffled by ``random.Random(seed)`` and cut
    at the rounded cumulative fractions; each part is returned in file order.
    """
    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        start, total = 0, 0.0
        for part, fraction in zip(parts, fractions):
            total += fraction
            end = round(total * len(members))
            part.extend(members[start:end])
            start = end
    return [sorted(p) for p in parts]


# -- known datasets: download with sha256, or an offline copy ----------------------------------------------
@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset: where it lies in a data directory (the layout of ``../shared/data``), which
    member of the downloaded archive it is (None: the download is the file itself), and its sha256 (None
    where no published checksum is known; the archive's own checksum still covers it)."""

    path: str
    member: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    description: str
    url: str
    sha256: str  # of the download itself
    license: str
    files: tuple[DatasetFile, ...]


_UCI = "sentiment_labelled_sentences"
DATASETS: dict[str, RemoteDataset] = {
    d.name: d
    for d in [
        RemoteDataset(
            name="sentiment-labelled-sentences",
            description="UCI Sentiment Labelled Sentences (Kotzias et al., KDD 2015): 1000 Amazon, Yelp and "
            "IMDB sentences each, 'sentence<TAB>label' with 0 negative, 1 positive",
            url="https://archive.ics.uci.edu/static/public/331/sentiment+labelled+sentences.zip",
            sha256="afc26626d710899948693e1a61405dce197f57ffa719fa1130d346b4cc095343",
            license="CC BY 4.0",
            files=(
                DatasetFile(f"{_UCI}/amazon_cells_labelled.txt", "amazon_cells_labelled.txt",
                            "47003fc0a0d4840b00e96e715b6189bad09e7443a3da41c4cbe12ffc79f86ae3"),
                DatasetFile(f"{_UCI}/yelp_labelled.txt", "yelp_labelled.txt",
                            "c76468b7b5c6e56a0804d728345c5f84aa2142ddb214420f61cc9cfd4c00d2ea"),
                DatasetFile(f"{_UCI}/imdb_labelled.txt", "imdb_labelled.txt"),
                DatasetFile(f"{_UCI}/readme.txt", "readme.txt",
                            "736c26aa54e3614459e50314ece0698051f0923d108ed53938dcb1aa0483bfd4"),
            ),
        ),
        RemoteDataset(
            name="tiny-shakespeare",
            description="tiny-shakespeare, the character-level language-modelling text of char-rnn",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            license="MIT (char-rnn repository)",
            files=(DatasetFile("tinyshakespeare/input.txt", None,
                               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
        ),
    ]
}


def default_data_dir() -> Path | None:
    """The offline copy named by RNNMATH_DATA_DIR, if set."""
    value = os.environ.get("RNNMATH_DATA_DIR")
    return Path(value) if value else None


def default_cache_dir() -> Path:
    """Where downloads go: RNNMATH_CACHE_DIR, else $XDG_CACHE_HOME/rnnmath, else ~/.cache/rnnmath."""
    if os.environ.get("RNNMATH_CACHE_DIR"):
        return Path(os.environ["RNNMATH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnnmath"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_copy(dataset: RemoteDataset, root: Path) -> list[str]:
    """Problems with the copy of ``dataset`` under ``root``: files with a checksum that are missing or
    differ (files without a published checksum may be absent). An empty list means the copy is good."""
    problems = []
    for f in dataset.files:
        p = root / f.path
        if f.sha256 is None:
            continue
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif sha256_of(p.read_bytes()) != f.sha256:
            problems.append(f"{p} has sha256 {sha256_of(p.read_bytes())}, expected {f.sha256}")
    return problems


def locate(name: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
           download: bool = True) -> Path:
    """The directory holding a verified copy of dataset ``name`` (files at ``DatasetFile.path`` under it).

    ``data_dir`` (or RNNMATH_DATA_DIR) names an offline copy, which is verified and used as it is; else the
    cache directory is used, downloading and verifying the dataset there first if needed.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is not None:
        problems = check_copy(dataset, data_dir)
        if problems:
            raise UserError(f"--data-dir {data_dir}: the copy of {name} is not usable: {problems[0]}")
        return data_dir
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if check_copy(dataset, cache):
        if not download:
            raise UserError(f"{name} is not in the cache {cache}; run 'rnnmath datasets --fetch {name}'")
        fetch(dataset, cache)
    return cache


def fetch(dataset: RemoteDataset, cache: Path) -> None:
    """Download ``dataset.url``, check its sha256, and write its files (each checked too) under ``cache``."""
    try:
        with urllib.request.urlopen(dataset.url, timeout=60) as response:
            blob = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download {dataset.url} ({reason}); point --data-dir or RNNMATH_DATA_DIR at an offline copy"
        ) from None
    if sha256_of(blob) != dataset.sha256:
        raise UserError(f"{dataset.url}: downloaded sha256 {sha256_of(blob)}, expected {dataset.sha256}")
    members = {}
    if any(f.member for f in dataset.files):
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            for info in archive.infolist():  # match by file name: the archive nests them in a folder
                if not info.is_dir() and "__MACOSX" not in info.filename:
                    members[Path(info.filename).name] = archive.read(info)
    for f in dataset.files:
        data = blob if f.member is None else members.get(f.member)
        if data is None:
            raise UserError(f"{dataset.url}: the archive lacks {f.member}")
        if f.sha256 is not None and sha256_of(data) != f.sha256:
            raise UserError(f"{dataset.url}: {f.member} has sha256 {sha256_of(data)}, expected {f.sha256}")
        atomic_write(cache / f.path, data)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the old file or the new one:
    a temporary file in the same directory, fsync, os.replace, then fsync of the directory."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only or misnamed --out, a full disk: the user's to fix, so not a traceback
        raise UserError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot be written ({e.strerror or e}); the previous file is kept") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- the built-in demo task: sentiment that depends on word order ------------------------------------------
POSITIVE = ("good", "great", "tasty", "friendly", "fast", "fresh", "clean", "cheap", "lovely", "quiet")
NEGATIVE = ("bad", "awful", "bland", "rude", "slow", "stale", "dirty", "pricey", "noisy", "cold")
SUBJECTS = ("the food", "the service", "the staff", "the room", "the coffee", "the price", "the music",
            "the view", "the bread", "the waiter")
INTENSIFIERS = ("very", "really", "so", "extremely", "quite", "truly")


def make_order_task(n: int, seed: int) -> Examples:
    """``n`` sentences labelled "positive"/"negative" whose label depends on word order, from ``random.Random(seed)``.

    Four kinds, each drawn with equal chance (the first two add a twin pair, so they make up two thirds of
    the sentences):

    * contrast, the clause after "but" decides: "the food was good but slow" (negative) and its twin
      "the food was slow but good" (positive): the same bag of words with opposite labels;
    * negation inside a pair: "the room was clean and not noisy" (positive) and its twin "the room was
      noisy and not clean" (negative): again the same bag of words with opposite labels;
    * plain negation: "the coffee was not very fresh" (negative), "the staff was never rude" (positive):
      "not" flips good to bad and bad to good, which no weighted sum of words can do (an XOR);
    * plain: "the view was lovely", "the view was really lovely" (positive).

    Intensifiers ("very", "really", ...) appear at random and never change the label. Twins are emitted
    next to each other; ``lines`` holds each sentence's 1-based index.
    """
    rng = random.Random(seed)

    def adjective(polarity: bool) -> str:
        word = rng.choice(POSITIVE if polarity else NEGATIVE)
        return f"{rng.choice(INTENSIFIERS)} {word}" if rng.random() < 0.3 else word

    def name(polarity: bool) -> str:
        return "positive" if polarity else "negative"

    texts: list[str] = []
    labels: list[str] = []
    while len(texts) < n:
        subject, kind, polarity = rng.choice(SUBJECTS), rng.randrange(4), rng.random() < 0.5
        a, b = adjective(polarity), adjective(not polarity)
        if kind == 0:
            texts += [f"{subject} was {a} but {b}", f"{subject} was {b} but {a}"]
            labels += [name(not polarity), name(polarity)]
        elif kind == 1:
            texts += [f"{subject} was {a} and not {b}", f"{subject} was {b} and not {a}"]
            labels += [name(polarity), name(not polarity)]
        elif kind == 2:
            texts.append(f"{subject} was {rng.choice(('not', 'never'))} {a}")
            labels.append(name(not polarity))
        else:
            texts.append(f"{subject} was {a}")
            labels.append(name(polarity))
    texts, labels = texts[:n], labels[:n]
    return Examples(texts, labels, list(range(1, n + 1)), f"order task (seed {seed})")
