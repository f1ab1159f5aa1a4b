"""Readers, tokenizer, vocabulary, encoding, splits, the dataset registry and the demo task."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rnnmath import data
from rnnmath.data import Examples, Vocabulary, encode, read_examples, stratified_split, tokenize
from rnnmath.errors import UserError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
UCI = SHARED / "sentiment_labelled_sentences"
needs_shared = pytest.mark.skipif(not UCI.is_dir(), reason="../shared/data is not present")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# -- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenize_lowercases_and_keeps_apostrophes_and_digits():
    assert tokenize("Don't STOP!! It's 42x...") == ["don't", "stop", "it's", "42x"]
    assert tokenize("café\u2028naïve\x85end") == ["café", "naïve", "end"]
    assert tokenize("") == [] and tokenize("?!  \t") == []


@pytest.mark.parametrize("text, tokens", [
    ("Привет, МИР!", ["привет", "мир"]),                            # Cyrillic, case-folded
    ("Καλημέρα ΚΌΣΜΕ", ["καλημέρα", "κόσμε"]),                       # Greek
    ("مرحبا بالعالم ١٢٣", ["مرحبا", "بالعالم", "١٢٣"]),              # Arabic letters and digits
    ("שָׁלוֹם עולם", ["שָׁלוֹם", "עולם"]),                              # Hebrew with points (marks)
    ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),                              # Devanagari: vowel signs, virama
    ("Straße ﬁne ＡＢＣ", ["strasse", "fine", "abc"]),               # casefold, NFKC ligature and width
    ("don’t", ["don't"]),                                           # typographic apostrophe
    ("我爱猫 ok", ["我", "爱", "猫", "ok"]),                           # Chinese: one token a character
    ("日本語のテキストです", list("日本語のテキストです")),               # Japanese kanji and kana
    ("ｶﾀｶﾅ", ["カ", "タ", "カ", "ナ"]),                                # halfwidth katakana, NFKC
    ("ภาษาไทย", ["ภ", "า", "ษ", "า", "ไ", "ท", "ย"]),                 # Thai: characters
    ("กิน", ["กิ", "น"]),                                              # a Thai mark stays on its character
    ("abc中文def", ["abc", "中", "文", "def"]),
])
def test_tokenize_reads_every_script(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_ascii_is_the_old_rule():
    import re

    text = "It's 10/10 -- WOULD buy again!!! e-mail me@x.org; can't"
    assert tokenize(text) == re.findall(r"[a-z0-9']+", text.lower())


# -- headerless TSV, the UCI format ------------------------------------------------------------------------
def test_headerless_tsv_with_uci_quirks(tmp_path):
    content = (
        'Great phone "really" works   \t1\n'           # quotes, trailing spaces before the TAB
        "Bad\x85really bad\u2028awful\t0\n"            # characters str.splitlines() breaks on
        '"Unclosed quote does not swallow\t1\n'
        "\n"                                           # blank lines are ignored
        "Windows line\t0\r\n"
    )
    examples = read_examples(write(tmp_path, "uci.txt", content))
    assert examples.texts == ['Great phone "really" works', "Bad\x85really bad\u2028awful",
                              '"Unclosed quote does not swallow', "Windows line"]
    assert examples.labels == ["1", "0", "1", "0"]
    assert examples.lines == [1, 2, 3, 5]


@needs_shared
@pytest.mark.parametrize("name", ["amazon_cells_labelled.txt", "yelp_labelled.txt"])
def test_real_uci_files(name):
    examples = read_examples(UCI / name)
    assert len(examples) == 1000
    assert Counter(examples.labels) == {"0": 500, "1": 500}
    assert all(t == t.strip() and t for t in examples.texts)
    # a csv reader with default quoting would merge lines at the stray quotes; we keep one record a line
    assert examples.lines == list(range(1, 1001))


@needs_shared
def test_real_uci_facts_from_sources_md():
    examples = Examples.concat([read_examples(UCI / "amazon_cells_labelled.txt"),
                                read_examples(UCI / "yelp_labelled.txt")])
    vocab = Vocabulary.build(examples.texts, 400)
    ids, lengths = encode(examples.texts, vocab, 30)
    assert (lengths == 0).sum() == 0
    covered = sum(1 for t in examples.texts for w in tokenize(t) if w in vocab.index)
    total = sum(len(tokenize(t)) for t in examples.texts)
    assert 0.70 < covered / total < 0.80  # "the top-400 words cover about 72% of tokens"
    assert (ids == 1).any()  # UNK
    all_unknown = [(row[:n] == 1).all() for row, n in zip(ids, lengths)]
    assert any(all_unknown)  # "some sentences contain no top-400 word at all"


# -- TSV/CSV with a header, JSON Lines ---------------------------------------------------------------------
def test_tsv_with_header_and_configurable_columns(tmp_path):
    path = write(tmp_path, "d.tsv", "id\tsentiment\tsentence\n7\tpos\tnice one\n8\tneg\tnope\n")
    examples = read_examples(path, text_column="sentence", label_column="sentiment")
    assert examples.texts == ["nice one", "nope"] and examples.labels == ["pos", "neg"]
    assert examples.lines == [2, 3]


def test_csv_with_quoting_and_bom(tmp_path):
    content = '\ufefftext,label\n"hello, world",yes\n"two\nlines",no\nplain \u2028 sep,yes\n'
    examples = read_examples(write(tmp_path, "d.csv", content))
    assert examples.texts == ["hello, world", "two\nlines", "plain \u2028 sep"]
    assert examples.labels == ["yes", "no", "yes"]
    assert examples.lines == [2, 3, 5]


def test_csv_missing_column_lists_columns_found(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nhi,1\n")
    with pytest.raises(UserError, match=r"d.csv line 1: .*no column 'text'; found 'sentence', 'label'"):
        read_examples(path)


def test_jsonl_with_string_and_int_labels(tmp_path):
    lines = [json.dumps({"text": "good", "label": 1}), json.dumps({"text": "bad", "label": "0", "x": 3}),
             json.dumps({"body": "ok", "y": "neutral"})]
    examples = read_examples(write(tmp_path, "d.jsonl", "\n".join(lines[:2]) + "\n"))
    assert examples.texts == ["good", "bad"] and examples.labels == ["1", "0"]
    other = read_examples(write(tmp_path, "o.jsonl", lines[2]), text_column="body", label_column="y")
    assert other.labels == ["neutral"]


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", "ok\t1\nno label here\nok\t0\n", r"a.txt line 2: expected 'sentence<TAB>label'.*found 1 field"),
    ("b.txt", "ok\t1\nextra\t1\t2\n", r"b.txt line 2: .*found 3 field"),
    ("c.txt", "ok\t1\nempty label\t \n", r"c.txt line 2: expected a label"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"d.jsonl line 2: .*broken JSON"),
    ("e.jsonl", '{"text": "a"}\n', r"e.jsonl line 1: expected key 'label'"),
    ("f.jsonl", '[1, 2]\n', r"f.jsonl line 1: expected a JSON object"),
    ("g.jsonl", '{"text": "a", "label": 1.5}\n', r"g.jsonl line 1: .*string or integer"),
    ("h.csv", 'text,label\na,1\nb,1,2\n', r"h.csv line 3: expected 2 comma-separated"),
])
def test_bad_records_name_file_and_line(tmp_path, name, content, message):
    with pytest.raises(UserError, match=message):
        read_examples(write(tmp_path, name, content))


def test_skip_bad_lines_counts_them(tmp_path):
    path = write(tmp_path, "s.txt", "ok\t1\nbroken\nfine\t0\nalso\tbroken\tyes\n")
    examples = read_examples(path, on_bad_line="skip")
    assert examples.texts == ["ok", "fine"] and examples.skipped == [2, 4]


@pytest.mark.parametrize("content, message", [
    (b"", "holds no examples"),
    (b"\n\n", "holds no examples"),
    (b"ok\t1\n\xff\xfe bad\t0\n", r"line 2: byte 0xff is not valid UTF-8"),
    (b"\x00\x01\x02binary", "NUL byte"),
])
def test_unusable_files(tmp_path, content, message):
    with pytest.raises(UserError, match=message):
        read_examples(write(tmp_path, "x.txt", content))


# -- layouts: label-first, fastText, column numbers, encodings ----------------------------------------------
KIM = SHARED / "kim2014"
needs_kim = pytest.mark.skipif(not KIM.is_dir(), reason="../shared/data/kim2014 is not present")


def test_label_first_layout(tmp_path):
    path = write(tmp_path, "k.txt", "1 a fine film . \n0  two spaces after the label \n3\n\n2 last\n")
    examples = read_examples(path, "label-first")
    assert examples.texts == ["a fine film .", "two spaces after the label", "", "last"]
    assert examples.labels == ["1", "0", "3", "2"] and examples.lines == [1, 2, 3, 5]


def test_fasttext_layout(tmp_path):
    path = write(tmp_path, "f.txt", "__label__pos great  stuff\n__label__neg bad\nno label\n__label__a __label__b x\n")
    with pytest.raises(UserError, match=r"f.txt line 3: expected one __label__<name> word, found 0"):
        read_examples(path, "fasttext")
    examples = read_examples(path, "fasttext", on_bad_line="skip")
    assert examples.texts == ["great stuff", "bad"] and examples.labels == ["pos", "neg"]
    assert examples.skipped == [3, 4]


@pytest.mark.parametrize("name, content, fmt", [
    ("l.tsv", "spam\tWin money now\nham\tsee you at 5\n", "tsv"),
    ("l.csv", 'spam,"Win money, now"\nham,see you at 5\n', "csv"),
])
def test_column_numbers_for_files_without_header(tmp_path, name, content, fmt):
    examples = read_examples(write(tmp_path, name, content), fmt, text_column="2", label_column=1)
    assert examples.texts == ["Win money, now" if fmt == "csv" else "Win money now", "see you at 5"]
    assert examples.labels == ["spam", "ham"] and examples.label_field == "column 1"


@pytest.mark.parametrize("kwargs, message", [
    ({"text_column": "2"}, "both be column names .* or both be 1-based column numbers"),
    ({"text_column": "1", "label_column": "1"}, "two different column numbers"),
    ({"text_column": "0", "label_column": "1"}, "two different column numbers from 1"),
    ({"text_column": "3", "label_column": "1"}, r"line 1: expected at least 3 tab-separated fields"),
    ({"format": "jsonl", "text_column": "1", "label_column": "2"}, "apply to tsv and csv"),
    ({"encoding": "klingon"}, "--encoding 'klingon' is not an encoding"),
])
def test_column_and_encoding_mistakes(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        read_examples(write(tmp_path, "x.txt", "a\tb\n"), **kwargs)


def test_encodings(tmp_path):
    path = write(tmp_path, "w.txt", "1 caf\xe9 \x93great\x94\n0 bad\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"w.txt line 1: byte 0xe9 is not valid UTF-8; try --encoding auto"):
        read_examples(path, "label-first")
    examples = read_examples(path, "label-first", encoding="auto")
    assert examples.texts[0] == "café \u201cgreat\u201d"
    assert examples.notes == [f"{path} is not UTF-8 (byte 0xe9 on line 1); read it as Windows-1252"]
    assert read_examples(path, "label-first", encoding="cp1252").texts == examples.texts
    assert read_examples(path, "label-first", encoding="latin-1").texts[0] == "café \x93great\x94"
    utf8 = write(tmp_path, "u.txt", "1 café\n")
    assert read_examples(utf8, "label-first", encoding="auto").notes == []


@needs_kim
@pytest.mark.parametrize("name, n, counts", [
    ("rt-polarity.all", 10662, {"0": 5331, "1": 5331}),
    ("subj.all", 10000, {"0": 5000, "1": 5000}),
    ("TREC.train.all", 5452, {"0": 1162, "1": 1250, "2": 86, "3": 1223, "4": 835, "5": 896}),
    ("TREC.test.all", 500, {"0": 138, "1": 94, "2": 9, "3": 65, "4": 81, "5": 113}),
    ("custrev.all", 3775, {"0": 1368, "1": 2407}),
])
def test_kim2014_files_read_as_they_are(name, n, counts):
    examples = read_examples(KIM / name, "label-first", encoding="auto")
    assert len(examples) == n and Counter(examples.labels) == counts
    assert bool(examples.notes) == (name in ("rt-polarity.all", "subj.all", "TREC.train.all"))
    if name == "rt-polarity.all":
        assert any("\u00e9" in t for t in examples.texts)  # é from the Windows-1252 byte 0xE9
    if name == "custrev.all":
        assert [examples.lines[i] for i, t in enumerate(examples.texts) if not t] == [769, 1368, 3691, 3775]


# -- a label column that is text ----------------------------------------------------------------------------
def test_check_labels_catches_text_in_the_label_column():
    texts = [f"sentence number {i}" for i in range(200)]
    swapped = Examples(["ham", "spam"] * 100, texts, list(range(1, 201)), "sms.txt", label_field="column 2")
    with pytest.raises(UserError, match=r"sms.txt: the label column 2 holds 200 distinct values in 200 rows .*"
                                        r"columns look swapped.*--text-column/--label-column.*--max-labels"):
        data.check_labels(swapped)
    data.check_labels(Examples(texts, ["a", "b"] * 100, list(range(1, 201)), "ok.txt"))
    many = Examples(texts, [str(i % 60) for i in range(200)], list(range(1, 201)), "m.txt")
    with pytest.raises(UserError, match="60 distinct values .*more than --max-labels 50"):
        data.check_labels(many)
    data.check_labels(many, max_labels=60)
    unique = Examples(texts[:40], [str(i) for i in range(40)], list(range(1, 41)), "u.txt")
    with pytest.raises(UserError, match="most rows have a label of their own") as caught:
        data.check_labels(unique)
    assert "swapped" not in str(caught.value)  # 40 distinct texts in 40 rows are no label set (an outside tester's)
    data.check_labels(unique, max_labels=40)  # a stated many-class task passes


# -- CSV robustness ------------------------------------------------------------------------------------------
def csv_rows(n: int, broken: int) -> str:
    rows = ["text,label"] + [f"sentence {i},{i % 2}" for i in range(2, n + 2)]
    rows[broken - 1] = f'"sentence {broken} opens a quote,1'
    return "\n".join(rows) + "\n"


def test_unterminated_quote_skips_one_line_and_resumes(tmp_path):
    path = write(tmp_path, "q.csv", csv_rows(200, 61))
    examples = read_examples(path, on_bad_line="skip")
    assert examples.skipped == [61] and len(examples) == 199
    assert examples.lines[58:60] == [60, 62]
    with pytest.raises(UserError, match=r"q.csv line 61: a quoted field opens on this line and does not close"):
        read_examples(path)


def test_multiline_quoted_field_is_still_read(tmp_path):
    path = write(tmp_path, "m.csv", 'text,label\n"two\nlines",1\nnext,0\n')
    examples = read_examples(path)
    assert examples.texts == ["two\nlines", "next"] and examples.lines == [2, 4]


def test_csv_field_larger_than_the_csv_module_default(tmp_path):
    review = "word " * 30_000  # 150 KB in one quoted field
    path = write(tmp_path, "big.csv", f'text,label\n"{review}",1\nshort,0\n')
    examples = read_examples(path)
    assert len(examples.texts[0]) == len(review.strip()) and examples.labels == ["1", "0"]
    import csv

    assert csv.field_size_limit() == 131072  # the module's limit is restored afterwards


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_examples(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="is a directory"):
        read_examples(tmp_path)


# -- vocabulary and encoding -------------------------------------------------------------------------------
def test_vocabulary_most_frequent_with_alphabetic_ties():
    texts = ["b a c", "a b", "d a", "c"]  # a:3, b:2, c:2, d:1
    vocab = Vocabulary.build(texts, 3)
    assert vocab.words == [data.PAD, data.UNK, "a", "b", "c"]
    assert len(vocab) == 5
    assert vocab.ids("A d zebra c") == [2, 1, 1, 4]
    assert Vocabulary.build(list(reversed(texts)), 3).words == vocab.words


def test_encode_pads_truncates_and_keeps_lengths():
    vocab = Vocabulary(["x", "y"])
    ids, lengths = encode(["x y x y", "y", "", "?? !!"], vocab, max_len=3)
    assert ids.tolist() == [[2, 3, 2], [3, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0, 0]
    assert ids.dtype == lengths.dtype == torch.long


# -- split -------------------------------------------------------------------------------------------------
def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    parts = stratified_split(labels, [0.8, 0.1, 0.1], seed=3)
    assert sorted(i for p in parts for i in p) == list(range(100))
    assert [Counter(labels[i] for i in p) for p in parts] == [
        {"a": 40, "b": 24, "c": 16}, {"a": 5, "b": 3, "c": 2}, {"a": 5, "b": 3, "c": 2}]
    assert stratified_split(labels, [0.8, 0.1, 0.1], seed=3) == parts
    assert stratified_split(labels, [0.8, 0.1, 0.1], seed=4) != parts


# -- datasets ----------------------------------------------------------------------------------------------
def test_registry_has_uci_and_tiny_shakespeare():
    uci = data.DATASETS["sentiment-labelled-sentences"]
    assert uci.url == "https://archive.ics.uci.edu/static/public/331/sentiment+labelled+sentences.zip"
    shakespeare = data.DATASETS["tiny-shakespeare"]
    assert shakespeare.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@needs_shared
def test_offline_copy_is_verified_and_used():
    for name in data.DATASETS:
        assert data.locate(name, data_dir=SHARED) == SHARED


def test_offline_copy_with_wrong_bytes_is_refused(tmp_path):
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_text("not shakespeare")
    with pytest.raises(UserError, match="not usable: .*has sha256"):
        data.locate("tiny-shakespeare", data_dir=tmp_path)


def _fake_uci(tmp_path: Path) -> tuple[data.RemoteDataset, bytes]:
    """The UCI registry entry pointing at a zip built here (file:// URL), same layout as the real one."""
    members = {"amazon_cells_labelled.txt": b"Good\t1\n", "yelp_labelled.txt": b"Bad\t0\n",
               "imdb_labelled.txt": b"Meh\t0\n", "readme.txt": b"read me\n"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(f"sentiment labelled sentences/{name}", content)
        archive.writestr("__MACOSX/sentiment labelled sentences/._readme.txt", b"junk")
    blob = buffer.getvalue()
    (tmp_path / "archive.zip").write_bytes(blob)
    real = data.DATASETS["sentiment-labelled-sentences"]
    files = tuple(replace(f, sha256=hashlib.sha256(members[f.member]).hexdigest()) for f in real.files)
    fake = replace(real, url=(tmp_path / "archive.zip").as_uri(), sha256=hashlib.sha256(blob).hexdigest(), files=files)
    return fake, blob


def test_download_verifies_and_extracts_into_cache(tmp_path, monkeypatch):
    fake, _ = _fake_uci(tmp_path)
    monkeypatch.setitem(data.DATASETS, fake.name, fake)
    monkeypatch.delenv("RNNMATH_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    root = data.locate(fake.name, cache_dir=cache)
    assert root == cache
    assert (cache / "sentiment_labelled_sentences" / "amazon_cells_labelled.txt").read_bytes() == b"Good\t1\n"
    assert not list(cache.rglob("*.tmp"))
    # a second call finds the verified copy and does not download again
    monkeypatch.setitem(data.DATASETS, fake.name, replace(fake, url="file:///nonexistent.zip"))
    assert data.locate(fake.name, cache_dir=cache) == cache


def test_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake, _ = _fake_uci(tmp_path)
    monkeypatch.setitem(data.DATASETS, fake.name, replace(fake, sha256="0" * 64))
    monkeypatch.delenv("RNNMATH_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="downloaded sha256 .* expected 0000"):
        data.locate(fake.name, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "sentiment_labelled_sentences").exists()


def test_download_failure_suggests_offline_copy(tmp_path, monkeypatch):
    fake = replace(data.DATASETS["tiny-shakespeare"], url=(tmp_path / "missing.txt").as_uri())
    monkeypatch.setitem(data.DATASETS, fake.name, fake)
    monkeypatch.delenv("RNNMATH_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="could not download .*--data-dir or RNNMATH_DATA_DIR"):
        data.locate(fake.name, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(os.environ.get("RNNMATH_NETWORK") != "1",
                    reason="downloads from the internet; set RNNMATH_NETWORK=1")
@pytest.mark.parametrize("name", list(data.DATASETS))
def test_real_download(tmp_path, name, monkeypatch):
    monkeypatch.delenv("RNNMATH_DATA_DIR", raising=False)
    assert not data.check_copy(data.DATASETS[name], data.locate(name, cache_dir=tmp_path))


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    data.atomic_write(path, b"one")
    data.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


# -- the demo task -----------------------------------------------------------------------------------------
def test_order_task_is_seeded_and_has_twins_with_opposite_labels():
    task = data.make_order_task(400, seed=1)
    assert task.texts == data.make_order_task(400, seed=1).texts
    assert task.texts != data.make_order_task(400, seed=2).texts
    assert set(task.labels) == {"positive", "negative"}
    assert 0.4 < Counter(task.labels)["positive"] / 400 < 0.6
    labels_by_bag: dict[tuple, set] = {}
    for text, label in zip(task.texts, task.labels):
        labels_by_bag.setdefault(tuple(sorted(tokenize(text))), set()).add(label)
    twins = sum(len(labels) == 2 for labels in labels_by_bag.values())
    assert twins > 50
    index = task.texts.index(next(t for t in task.texts if " but " in t))
    a, b = task.texts[index].split(" was ")[1].split(" but ")
    twin = task.texts[index].replace(f"{a} but {b}", f"{b} but {a}")
    assert task.texts[index + 1] == twin and task.labels[index + 1] != task.labels[index]


def test_column_numbers_on_a_file_with_a_header_stop_unless_told(tmp_path):
    path = write(tmp_path, "h.tsv", "sentiment\treview\npos\tgood\nneg\tbad\npos\tfine\n")
    with pytest.raises(UserError, match=r"h.tsv line 1: looks like a header \(its label 'sentiment' occurs on no "
                                        r"other line\).*--text-column review --label-column sentiment.*--header"):
        read_examples(path, text_column=2, label_column=1)
    assert read_examples(path, text_column=2, label_column=1, header=True).labels == ["pos", "neg", "pos"]
    examples = read_examples(path, text_column=2, label_column=1, header=False)
    assert examples.labels == ["sentiment", "pos", "neg", "pos"] and examples.lines == [1, 2, 3, 4]
