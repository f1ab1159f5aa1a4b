"""Labelled sentences: file readers, the tokenizer, the vocabulary, encoding, splits, known datasets and the
built-in demo task.

Shape letters: N examples, T time (max_len).

Every reader returns ``Examples``: parallel lists of texts, labels (always strings: a JSON label ``1`` and a
TSV label ``1`` are the same class) and the 1-based line each record starts on, so that any later error can
name the file and line.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .common import atomic_write, readable  # noqa: F401  (atomic_write re-exported: it lived here first)
from .errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used, so that the CLI starts fast
    from torch import Tensor

FORMATS = ("auto", "tsv", "csv", "jsonl", "label-first", "fasttext")
ON_BAD_LINE = ("error", "skip")
FASTTEXT_PREFIX = "__label__"
MAX_LABELS = 50  # more distinct labels than this looks like a text column (--max-labels raises it)


# -- tokenizer ---------------------------------------------------------------------------------------------
# Scripts written without spaces between words: each of their characters (with its combining marks) is one
# token. Code point ranges of the Unicode blocks: Thai, Lao, Tibetan, Myanmar, Khmer, CJK radicals and
# symbols through Katakana and Bopomofo, CJK extension A, CJK unified ideographs, Yi, CJK compatibility
# ideographs, halfwidth Katakana (NFKC maps most of them to full width), and the supplementary ideographs.
_NO_SPACE = ((0x0E00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x31FF), (0x3400, 0x4DBF),
             (0x4E00, 0x9FFF), (0xA000, 0xA4CF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x3FFFF))
_ASCII_TOKEN = re.compile(r"[a-z0-9']+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})  # ’ and ʼ are written for ' ("don’t")


@functools.lru_cache(maxsize=65536)
def _kind(ch: str) -> int:
    """0: separates tokens; 1: part of a word; 2: a character of a no-space script; 3: a combining mark."""
    if ch == "'":
        return 1
    category = unicodedata.category(ch)
    if category[0] == "M":
        return 3
    if category[0] not in "LN":
        return 0
    code = ord(ch)
    return 2 if any(lo <= code <= hi for lo, hi in _NO_SPACE) else 1


def tokenize(text: str) -> list[str]:
    """The words of ``text``, in order: NFKC-normalised, case-folded runs of Unicode letters, digits and
    combining marks (categories L, N, M) and the apostrophe; everything else separates words.

    Scripts written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Myanmar, Tibetan, Yi) give one
    token per character, with the combining marks that follow it. ``’`` counts as ``'``.

    ``"Don't STOP!!"`` -> ``["don't", "stop"]``; ``"Привет, МИР"`` -> ``["привет", "мир"]``;
    ``"我爱猫 ok"`` -> ``["我", "爱", "猫", "ok"]``; ``"ﬁne Straße"`` -> ``["fine", "strasse"]``.
    On ASCII text the result equals the earlier rule, runs of ``[a-z0-9']`` of the lower-cased text.
    """
    if text.isascii():
        return _ASCII_TOKEN.findall(text.lower())
    text = unicodedata.normalize("NFKC", text.translate(_APOSTROPHES)).casefold()
    tokens: list[str] = []
    word: list[str] = []
    single = False  # word holds one character of a no-space script (and its marks)
    for ch in text:
        kind = _kind(ch)
        if kind == 3:
            if word:  # a mark continues its word or character; with nothing before it, it is dropped
                word.append(ch)
            continue
        if word and (kind != 1 or single):
            tokens.append("".join(word))
            word = []
        if kind:
            word.append(ch)
        single = kind == 2
    if word:
        tokens.append("".join(word))
    return tokens


# -- examples and readers ----------------------------------------------------------------------------------
@dataclass
class Examples:
    """Labelled texts read from ``source``; ``lines[i]`` is the 1-based line where record i starts.

    ``skipped`` holds the lines of bad records passed over with ``on_bad_line="skip"``; ``notes`` holds what
    the reader decided on its own and a user should hear (an encoding fallback), one sentence each;
    ``label_field`` says where the labels came from (``column 'label'``, ``column 2``, ...)."""

    texts: list[str]
    labels: list[str]
    lines: list[int]
    source: str = ""
    skipped: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_field: str = "label"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> Examples:
        indices = list(indices)
        return Examples(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices],
            [self.lines[i] for i in indices], self.source, label_field=self.label_field,
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        return Examples(
            [t for p in parts for t in p.texts], [label for p in parts for label in p.labels],
            [n for p in parts for n in p.lines], " + ".join(p.source for p in parts),
            [n for p in parts for n in p.skipped], [s for p in parts for s in p.notes],
            parts[0].label_field if parts else "label",
        )


def column_number(value: str | int) -> int | None:
    """The 1-based column number that a ``--text-column``/``--label-column`` value gives, or None for a name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def read_examples(
    path: str | os.PathLike,
    format: str = "auto",
    text_column: str | int = "text",
    label_column: str | int = "label",
    on_bad_line: str = "error",
    encoding: str = "utf-8",
    header: bool | None = None,
) -> Examples:
    """Read labelled texts from a file.

    Formats (``auto`` picks by extension: .jsonl/.ndjson/.json -> jsonl, .csv -> csv, anything else -> tsv):

    * ``tsv``: one record a line, fields separated by TAB, no quoting. If the first line's fields include
      ``text_column`` and ``label_column`` it is a header; otherwise every line is ``sentence<TAB>label``
      (the UCI Sentiment Labelled Sentences format).
    * ``csv``: comma-separated with a header row naming the columns; standard CSV (RFC 4180) quoting.
    * ``jsonl``: one JSON object a line with ``text_column`` and ``label_column`` keys.
    * ``label-first``: ``<label> <text>``, the label the first word of the line, then spaces, then the text
      (the files of Kim 2014's benchmarks: MR, Subj, TREC, CR). The text may be empty.
    * ``fasttext``: fastText's layout, ``__label__<name> <text>``; the words that start with ``__label__`` are
      labels, the others the text. A line must carry exactly one label.

    Columns: ``text_column``/``label_column`` name header columns (tsv, csv) or keys (jsonl); numbers (``2``,
    or the string ``"2"``) are 1-based column positions of a file WITHOUT a header (tsv, csv), where then
    every line is data. Both must be names or both numbers.

    Header (tsv, csv with column numbers; label-first): ``header=None`` stops with a UserError when line 1
    looks like a header (its label occurs on no other line while the other lines' labels repeat, as a
    header's "label" does), so that a header is never trained on as a class; ``True`` skips line 1, ``False``
    reads it as data. ``True`` with column names requires them in line 1 (tsv); ``False`` needs column numbers
    (or label-first). Label-first lines that mostly hold a TAB (a TSV file) are a UserError suggesting
    ``--format tsv``.

    Encoding: any codec name Python knows (``utf-8`` by default, a BOM allowed); ``auto`` reads UTF-8 and, if
    the bytes are not valid UTF-8, Windows-1252, adding a sentence saying so to ``Examples.notes``.

    Records are split on ``\\n`` only: a ``\\r`` before it is dropped, and characters that
    ``str.splitlines`` would also break on (``\\x85``, ``\\u2028``, ...) stay inside the sentence. Texts
    are stripped of surrounding white space; blank lines are ignored. Labels may be strings or integers.
    A bad record raises ``UserError`` naming the file and line, or with ``on_bad_line="skip"`` is counted in
    ``Examples.skipped``. Any other mistake (unknown format, encoding or column) is a UserError naming the
    flag.
    """
    if format not in FORMATS:
        raise UserError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if on_bad_line not in ON_BAD_LINE:
        raise UserError(f"--on-bad-line {on_bad_line!r} is not one of {', '.join(ON_BAD_LINE)}")
    name = str(path)
    if format == "auto":
        suffix = Path(path).suffix.lower()
        format = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(suffix, "tsv")
    i_text, i_label = column_number(text_column), column_number(label_column)
    if (i_text is None) != (i_label is None):
        raise UserError("--text-column and --label-column must both be column names (a file with a header) or "
                        f"both be 1-based column numbers (a file without one), got {text_column!r} and "
                        f"{label_column!r}")
    if header is False and i_text is None and format != "label-first":
        raise UserError("--no-header needs column numbers: give --text-column N and --label-column N (1-based)")
    if i_text is not None:
        if format not in ("tsv", "csv"):
            raise UserError(f"--text-column/--label-column numbers apply to tsv and csv files, not --format {format}")
        if i_text < 1 or i_label < 1 or i_text == i_label:
            raise UserError(f"--text-column {i_text} and --label-column {i_label} must be two different column "
                            "numbers from 1")
    text, notes = read_text(path, encoding)
    reader = _Reader(name, on_bad_line)
    reader.examples.notes += notes
    records = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    if format == "jsonl":
        reader.read_jsonl(records, str(text_column), str(label_column))
    elif format == "csv":
        reader.read_csv(records, text_column, label_column, i_text, i_label)
    elif format == "label-first":
        reader.read_label_first(records)
    elif format == "fasttext":
        reader.read_fasttext(records)
    else:
        reader.read_tsv(records, text_column, label_column, i_text, i_label, header is True)
    examples = reader.examples
    first = next((n for n, line in records if line.strip()), None)
    numbered = i_text is not None or format == "label-first"  # formats whose line 1 could be a header
    if numbered and header is True:  # skip line 1, the header
        keep = [i for i, n in enumerate(examples.lines) if n != first]
        notes, skipped = examples.notes, [n for n in examples.skipped if n != first]
        reader.examples = examples = examples.subset(keep)
        examples.notes, examples.skipped = notes, skipped
    elif numbered and header is None and len(examples) > 2 and examples.lines[0] == first \
            and examples.labels.count(examples.labels[0]) == 1 \
            and len(set(examples.labels[1:])) < len(examples) - 1:  # the other labels repeat: a label set
        names = (f"name the columns instead (--text-column {examples.texts[0]} --label-column "
                 f"{examples.labels[0]}), or " if i_text is not None else "")
        raise UserError(f"{readable(name)} line {first}: looks like a header (its label {examples.labels[0]!r} "
                        f"occurs on no other line), but --format {format} reads every line as data; {names}"
                        "pass --header to skip line 1 (--no-header to read it as data)")
    if not reader.examples.texts:
        if reader.examples.skipped:
            raise UserError(f"{name}: all {len(reader.examples.skipped)} records are bad; none left to use")
        raise UserError(f"{name}: the file holds no examples; expected at least one labelled record")
    return reader.examples


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> tuple[str, list[str]]:
    """The file's text and the notes for the user (see ``read_examples`` for ``encoding``).

    Raises UserError naming the file (missing, a directory, unreadable), the encoding (unknown), or the file,
    line and byte that the encoding cannot decode."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; expected a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot be read ({e.strerror})") from None
    notes = []
    if encoding == "auto":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            text = _decode(p, data, "cp1252")
            notes.append(f"{p} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); read it as Windows-1252")
    else:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise UserError(f"--encoding {encoding!r} is not an encoding Python knows; try utf-8, cp1252, latin-1 "
                            "or auto") from None
        text = _decode(p, data, "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{p} line {line}: holds a NUL byte, so it looks binary or UTF-16; expected a UTF-8 "
                        "text file (or give its --encoding, e.g. utf-16)")
    return text, notes


def _decode(p: Path, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        name = "UTF-8" if encoding == "utf-8-sig" else encoding
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        advice = "; try --encoding auto (UTF-8, else Windows-1252) or name the file's --encoding" \
            if encoding == "utf-8-sig" else ""
        raise UserError(f"{p} line {line}: byte 0x{data[e.start]:02x} is not valid {name}{hint}{advice}") from None


def check_labels(examples: Examples, max_labels: int | None = None) -> None:
    """A UserError if the labels look like text rather than a label set: more than ``max_labels`` distinct
    values (MAX_LABELS when None), or, when ``max_labels`` is None, more than 10 distinct values that make up
    over half of the rows. The message names the column, the count and the likely cause."""
    distinct = len(set(examples.labels))
    n = len(examples.labels)
    limit = MAX_LABELS if max_labels is None else max_labels
    too_many = distinct > limit
    mostly_unique = max_labels is None and distinct > 10 and distinct > n / 2
    if not (too_many or mostly_unique):
        return
    why = f"more than --max-labels {limit}" if too_many else "most rows have a label of their own"
    text_distinct = len(set(examples.texts))
    swapped = (" — the text column has only "
               f"{text_distinct} distinct value(s), so the columns look swapped") \
        if text_distinct <= limit and text_distinct * 2 <= n else ""  # few values, each on several rows: labels
    raise UserError(
        f"{examples.source}: the label {examples.label_field} holds {distinct} distinct values in {n} rows "
        f"({why}), which looks like text, not labels{swapped}; choose the columns with --text-column/"
        "--label-column (numbers for a file without a header), or pass --max-labels N for a task with that many "
        "classes"
    )


def _layout_hint(records: list[tuple[int, str]]) -> str:
    """A hint for lines without TABs read as TSV: the --format their layout suggests, or ''. Most lines start
    with ``__label__``: fasttext; their first words take few values (at most MAX_LABELS, each on several
    lines on average): label-first."""
    plain = [line.split(None, 1) for _, line in records if "\t" not in line and line.strip()]
    if not plain or len(plain) * 2 < len(records):
        return ""
    firsts = [words[0] for words in plain]
    if sum(w.startswith(FASTTEXT_PREFIX) for w in firsts) * 2 > len(firsts):
        return f"; its lines start with {FASTTEXT_PREFIX}: --format fasttext"
    distinct = len(set(firsts))
    if len(firsts) >= 4 and distinct <= MAX_LABELS and distinct * 2 <= len(firsts):
        return (f"; the first words of its lines take only {distinct} value(s), as labels do: --format "
                "label-first ('<label> <text>')")
    return ""


class _Lines:
    """The lines of a file for csv.reader, with a position that can be moved back (``pos``: lines read)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines, self.pos = lines, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


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
                "(choose columns with --text-column and --label-column; numbers for a file without a header)"
            )
        return header.index(text_column), header.index(label_column)

    def read_tsv(self, records, text_column, label_column, i_text: int | None, i_label: int | None,
                 header: bool = False) -> None:
        records = [(n, line) for n, line in records if line.strip()]
        if not records:
            return
        if i_text is not None:  # 1-based numbers: no header, every line is data
            i_text, i_label = i_text - 1, i_label - 1
            width = max(i_text, i_label) + 1
            self.examples.label_field = f"column {i_label + 1}"
            for n, line in records:
                fields = line.split("\t")
                if len(fields) < width:
                    self.bad(n, f"expected at least {width} tab-separated fields (--text-column {i_text + 1}, "
                                f"--label-column {i_label + 1}), found {len(fields)}")
                else:
                    self.add(n, fields[i_text], fields[i_label])
            return
        first = [f.strip() for f in records[0][1].split("\t")]
        if header or (text_column in first) != (label_column in first):  # a header that lacks a column
            self.columns(first, text_column, label_column, "TSV header")
        if text_column in first and label_column in first:
            i_text, i_label = first.index(text_column), first.index(label_column)
            width, records = len(first), records[1:]
            expected = f"{width} tab-separated fields as in the header"
            self.examples.label_field = f"column {label_column!r}"
        else:
            i_text, i_label, width = 0, 1, 2
            expected = ("'sentence<TAB>label' (2 tab-separated fields; other layouts: --text-column/--label-column"
                        f"{_layout_hint(records)})")
            self.examples.label_field = "column 2 (a file without a header is read as sentence<TAB>label)"
        for n, line in records:
            fields = line.split("\t")
            if len(fields) != width:
                self.bad(n, f"expected {expected}, found {len(fields)} field(s)")
            else:
                self.add(n, fields[i_text], fields[i_label])

    def read_csv(self, records, text_column, label_column, i_text: int | None, i_label: int | None) -> None:
        """Standard CSV quoting, fields of any size. A quote that opens a field and never closes would make
        the rest of the file one field: a record that spans several lines and does not give a row of the
        expected width is bad at the line where it starts, and reading resumes at the line after it."""
        # csv gets the lines we split on "\n" (not io's line splitting), so \x85 and \u2028 stay in fields
        source = _Lines([line + "\n" for _, line in records])
        reader = csv.reader(source, strict=True)
        header = width = None
        if i_text is not None:  # 1-based numbers: no header, every row is data
            i_text, i_label = i_text - 1, i_label - 1
            width = max(i_text, i_label) + 1
            self.examples.label_field = f"column {i_label + 1}"
        limit = csv.field_size_limit()
        csv.field_size_limit(2**31 - 1)  # the default 131072 characters refuses long reviews
        try:
            while True:
                start = source.pos + 1
                try:
                    row = next(reader)
                    error = None
                except StopIteration:
                    break
                except csv.Error as e:
                    row, error = None, str(e)
                spans = source.pos - start + 1
                expected = width if width is not None else len(header) if header is not None else None
                if row is not None and expected is not None and spans > 1 and (
                        len(row) < expected if width is not None else len(row) != expected):
                    row, error = None, f"expected {expected} fields"
                if row is None:
                    if spans > 1:  # resume at the next line, not where the csv module stopped
                        source.pos = start
                        error = (f"a quoted field opens on this line and does not close before line "
                                 f"{start + spans - 1} ({error}); expected a closing quote (\") on this line "
                                 "or a properly quoted multi-line field")
                    else:
                        error = f"broken CSV ({error}); expected properly quoted fields"
                    if header is None and width is None:
                        raise UserError(f"{self.name} line {start}: broken CSV header: {error}") from None
                    self.bad(start, error)
                    continue
                if not any(f.strip() for f in row):
                    continue
                if width is not None:
                    if len(row) < width:
                        self.bad(start, f"expected at least {width} comma-separated fields (--text-column "
                                        f"{i_text + 1}, --label-column {i_label + 1}), found {len(row)}")
                    else:
                        self.add(start, row[i_text], row[i_label])
                elif header is None:
                    header = [f.strip() for f in row]
                    i_text, i_label = self.columns(header, text_column, label_column, "CSV header")
                    self.examples.label_field = f"column {label_column!r}"
                elif len(row) != len(header):
                    self.bad(start, f"expected {len(header)} comma-separated fields as in the header, "
                                    f"found {len(row)}")
                else:
                    self.add(start, row[i_text], row[i_label])
        finally:
            csv.field_size_limit(limit)

    def read_label_first(self, records) -> None:
        self.examples.label_field = "(the first word of each line)"
        lines = [n for n, line in records if line.strip()]
        tabbed = [n for n, line in records if "\t" in line.strip()]
        if tabbed and len(tabbed) * 2 > len(lines):  # TSV read as '<label> <text>': labels would be words
            raise UserError(f"{readable(self.name)}: {len(tabbed)} of {len(lines)} lines hold a TAB (line "
                            f"{tabbed[0]} first), so this looks like a tab-separated file, not --format "
                            "label-first ('<label> <text>' separated by a space); use --format tsv (with "
                            "--text-column/--label-column to choose its columns)")
        for n, line in records:
            if not line.strip():
                continue
            parts = line.strip().split(None, 1)
            self.add(n, parts[1] if len(parts) > 1 else "", parts[0])

    def read_fasttext(self, records) -> None:
        self.examples.label_field = f"(the {FASTTEXT_PREFIX} words)"
        for n, line in records:
            words = line.split()
            if not words:
                continue
            labels = [w[len(FASTTEXT_PREFIX):] for w in words if w.startswith(FASTTEXT_PREFIX)]
            if len(labels) != 1:
                self.bad(n, f"expected one {FASTTEXT_PREFIX}<name> word, found {len(labels)} (rnnmath trains one "
                            "label per sentence)")
                continue
            self.add(n, " ".join(w for w in words if not w.startswith(FASTTEXT_PREFIX)), labels[0])

    def read_jsonl(self, records, text_column: str, label_column: str) -> None:
        self.examples.label_field = f"key {label_column!r}"
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


def sentence_key(text: str) -> str | None:
    """A 64-bit hash (16 hex digits) of the sentence's tokens, so that two sentences that differ only in case,
    punctuation or spacing get the same key; None for a sentence without tokens. Used to find evaluated
    sentences that were also trained on."""
    tokens = tokenize(text)
    return hashlib.sha256(" ".join(tokens).encode("utf-8")).hexdigest()[:16] if tokens else None


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
    import torch

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
    import urllib.error
    import urllib.request

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
