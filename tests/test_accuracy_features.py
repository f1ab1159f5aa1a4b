"""Issue 13's additions: the embedding layer and the fastText-style n-gram bag of the classifier, pretrained
word vectors (--embeddings), and cross-validation (rnnmath cv)."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from rnnmath import cli, data
from rnnmath.crossval import fold_parts, stratified_folds
from rnnmath.embeddings import initialise_embeddings, read_vectors, vector_size
from rnnmath.errors import UserError
from rnnmath.model import Classifier, Config, config_from_dict, load_model

TINY = ["--hidden", "8", "--vocab-size", "60", "--max-len", "12", "--epochs", "2", "--batch-size", "16"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    task = data.make_order_task(200, seed=3)
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("".join(f"{t}\t{y}\n" for t, y in zip(task.texts, task.labels)))
    return path


# -- the classifier's feature layer ------------------------------------------------------------------------
def test_ngram_bag_is_the_mean_of_word_and_hashed_bigram_rows():
    torch.manual_seed(0)
    config = Config(embedding_dim=5, hidden=4, ngram_dim=3, ngram_buckets=7)
    model = Classifier(config, vocab_size=10, num_classes=2)
    ids = torch.tensor([[2, 5, 9, 0], [3, 0, 0, 0], [0, 0, 0, 0]])
    lengths = torch.tensor([3, 1, 0])
    bag = model.ngram_bag(ids, lengths)
    W = model.ngrams.weight
    expected0 = torch.stack([W[2], W[5], W[9], W[10 + (2 * 1_000_003 + 5) % 7], W[10 + (5 * 1_000_003 + 9) % 7]])
    torch.testing.assert_close(bag[0], expected0.mean(0))
    torch.testing.assert_close(bag[1], W[3])
    torch.testing.assert_close(bag[2], torch.zeros(3))  # an empty sentence
    # the features hold it beside the recurrent part, and padding is never read
    other = ids.clone()
    other[0, 3], other[1, 1:] = 7, 4
    model.eval()
    torch.testing.assert_close(model(ids, lengths), model(other, lengths))
    assert model.features(ids, lengths).shape == (3, 2 * 4 * 2)  # the bag joins after dropout


def test_gradients_reach_the_embedding_and_the_bag():
    torch.manual_seed(1)
    model = Classifier(Config(embedding_dim=6, hidden=5, ngram_dim=4, ngram_buckets=11), 12, 3)
    ids = torch.randint(2, 12, (4, 6))
    lengths = torch.tensor([6, 3, 1, 5])
    torch.nn.functional.nll_loss(model(ids, lengths), torch.tensor([0, 1, 2, 1])).backward()
    assert model.embedding.weight.grad[ids[0]].abs().sum() > 0
    assert model.embedding.weight.grad[0].abs().sum() == 0  # PAD
    assert model.ngrams.weight.grad.abs().sum() > 0


def test_a_model_saved_before_the_new_fields_loads_as_it_was():
    old = {k: v for k, v in vars(Config(embedding_dim=64, ngram_dim=32)).items()
           if k not in ("embedding_dim", "ngram_dim", "ngram_buckets", "embeddings", "freeze_embeddings")}
    config = config_from_dict(old, "config.json")
    assert config.embedding_dim == 0 and config.ngram_dim == 0  # one-hot ids, no bag: the old model


# -- pretrained vectors ------------------------------------------------------------------------------------
def write_vectors(path: Path, lines: list[str], header: str | None = None) -> Path:
    text = "".join(line + "\n" for line in ([header] if header else []) + lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name,header", [("v.txt", None), ("v.vec", "3 2"), ("v.txt.gz", "3 2"), ("g.gz", None)])
def test_read_vectors_formats(tmp_path, name, header):
    path = write_vectors(tmp_path / name, ["good 0.5 -1", "Bad 2 3e-1 ", "new york 1 2"], header)
    assert vector_size(path) == 2
    size, vectors = read_vectors(path)
    assert size == 2 and list(vectors) == ["good", "Bad", "new york"]
    torch.testing.assert_close(vectors["Bad"], torch.tensor([2.0, 0.3]))
    assert set(read_vectors(path, keep={"good"})[1]) == {"good"}


@pytest.mark.parametrize("lines,message", [
    (["a 1 2", "b 1"], r"line 2: expected a word and 2 numbers \(as the first vector, line 1, has\), found 1"),
    (["2 2", "a 1 2", "b 1"], r"line 3: expected a word and 2 numbers \(as the header says\), found 1"),
    (["a 1 2", "b 1 x"], "line 2: 'x' is not"),
    (["a 1 2", "b nan 1"], "line 2:"),
    (["a 1 2", "", "c 1 2 3 4 5 x"], "line 3: 'x' is not"),
    ([""], "holds no vectors"),
    # one number too many: not a word "phone 0.1" (an outside tester's case)
    (["a 1 2", "phone 1 2 3"], r"line 2: 3 numbers after the word, expected 2 \(as the first vector, line 1, has\)"),
    (["3 2", "a 1 2", "phone 1 2 3"], r"line 3: 3 numbers after the word, expected 2 \(as the header says\)"),
])
def test_malformed_vector_files_name_the_line(tmp_path, lines, message):
    path = write_vectors(tmp_path / "bad.txt", lines)
    with pytest.raises(UserError, match=message):
        read_vectors(path)
    with pytest.raises(UserError, match=message):  # also for lines of words the vocabulary lacks
        read_vectors(path, keep={"zzz"})


def test_initialise_exact_then_case_folded_and_coverage(tmp_path):
    path = write_vectors(tmp_path / "v.txt", ["Good 9 9", "good 1 2", "BAD 3 4", "Bad 5 6", "other 7 8"])
    vocab = data.Vocabulary(["good", "bad", "film"])
    weight = torch.zeros(5, 2)
    coverage = initialise_embeddings(weight, vocab, ["good good film", "bad unknownword"], path)
    torch.testing.assert_close(weight[2], torch.tensor([1.0, 2.0]))  # exact beats an earlier case-folded line
    torch.testing.assert_close(weight[3], torch.tensor([3.0, 4.0]))  # first case-folded match
    assert weight[4].abs().sum() == 0 and weight[:2].abs().sum() == 0  # film, PAD, UNK untouched
    assert coverage["words_covered"] == 2 and coverage["words"] == 3
    assert coverage["tokens"] == 5 and coverage["tokens_covered"] == 3
    assert math.isclose(coverage["token_share"], 0.6)
    with pytest.raises(UserError, match="--embedding-dim 2"):
        initialise_embeddings(torch.zeros(5, 3), vocab, [], path)


def test_train_with_frozen_embeddings_keeps_the_vectors(train_file, tmp_path, capsys):
    words = Counter(w for line in train_file.read_text().splitlines() for w in data.tokenize(line.split("\t")[0]))
    common = [w for w, _ in words.most_common(20)]
    lines = [f"{w.upper() if i % 2 else w} " + " ".join(f"{(i * 7 + j) % 5 - 2:.1f}" for j in range(6))
             for i, w in enumerate(common)]
    vectors = write_vectors(tmp_path / "vec.txt", lines, f"{len(lines)} 6")
    out = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(out), *TINY,
                       "--embeddings", str(vectors), "--freeze-embeddings")
    assert code == 0, err
    assert "--embedding-dim 6" in err and "% of the vocabulary" in err and "% of the training tokens" in err
    trained = load_model(out)
    assert trained.config.embedding_dim == 6
    _, file_vectors = read_vectors(vectors)
    for word, v in file_vectors.items():
        torch.testing.assert_close(trained.model.embedding.weight[trained.vocab.index[word.lower()]], v)
    history = json.loads((out / "history.json").read_text())
    assert history["embeddings"]["words_covered"] == 20

    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(tmp_path / "m2"), *TINY,
                       "--embeddings", str(write_vectors(tmp_path / "bad.txt", ["a 1 2", "b 1"])))
    assert code == 2 and err.count("rnnmath: error:") == 1 and "bad.txt line 2: expected a word" in err
    assert not (tmp_path / "m2").exists()  # checked before anything is written
    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(tmp_path / "m3"), *TINY,
                       "--freeze-embeddings")
    assert code == 2 and "--freeze-embeddings needs --embeddings" in err


# -- cross-validation --------------------------------------------------------------------------------------
def test_stratified_folds_partition_and_balance():
    labels = ["a"] * 23 + ["b"] * 11 + ["c"] * 6
    folds = stratified_folds(labels, 5, seed=4)
    assert sorted(i for f in folds for i in f) == list(range(40))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for label, total in Counter(labels).items():
        counts = [sum(labels[i] == label for i in f) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == total
    assert folds == stratified_folds(labels, 5, seed=4) and folds != stratified_folds(labels, 5, seed=5)
    examples = data.Examples([str(i) for i in range(40)], labels, list(range(1, 41)))
    train, val, test = fold_parts(examples, folds, 2, seed=0)
    assert sorted(map(int, train.texts + val.texts + test.texts)) == list(range(40))
    assert sorted(map(int, test.texts)) == folds[2] and len(val) == 4
    with pytest.raises(UserError, match="--folds 1"):
        stratified_folds(labels, 1, 0)


def test_cv_command(train_file, tmp_path, capsys):
    out = tmp_path / "cv"
    code, stdout, err = run(capsys, "cv", "--data", str(train_file), "--folds", "3", "--out", str(out), *TINY,
                            "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2]
    assert sum(f["test"] for f in result["folds"]) == 200
    accuracies = [f["accuracy"] for f in result["folds"]]
    assert math.isclose(result["accuracy"]["mean"], sum(accuracies) / 3)
    saved = json.loads((out / "cv.json").read_text())
    assert saved["format"] == "rnnmath-cv" and saved["folds"] == result["folds"]
    for f in range(3):
        assert (out / f"fold-{f}" / "model.safetensors").is_file()
        assert not (out / f"fold-{f}" / "checkpoint.safetensors").exists()  # cv has no resume: 51 MB a fold on CR
    texts = {i + 1: line.split("\t")[0] for i, line in enumerate(train_file.read_text().splitlines())}
    for f in range(3):  # the overlap counted from the fold's split.json: the same tokens
        parts = json.loads((out / f"fold-{f}" / "split.json").read_text())["parts"]
        seen = {" ".join(data.tokenize(texts[n])) for n in parts["train"]["lines"]}
        overlap = sum(" ".join(data.tokenize(texts[n])) in seen for n in parts["test"]["lines"])
        assert result["folds"][f]["train_overlap"] == overlap
    # a fold's split.json: evaluate --split test re-reads exactly the fold's test part (an outside tester's case)
    code, stdout, err = run(capsys, "evaluate", str(out / "fold-1"), "--split", "test", "--json")
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == result["folds"][1]["accuracy"]
    assert json.loads(stdout)["n"] == result["folds"][1]["test"]
    for f in range(3):  # val_accuracy: of what predicts (the mix); best_val_accuracy: the network's alone
        history = json.loads((out / f"fold-{f}" / "history.json").read_text())
        assert result["folds"][f]["val_accuracy"] == history["wide"]["val_accuracy"]
        assert result["folds"][f]["best_val_accuracy"] == history["best_val_accuracy"]
    code, _, err = run(capsys, "cv", "--data", str(train_file), "--folds", "3", "--out", str(out), *TINY)
    assert code == 2 and "already holds" in err


def test_cv_warns_when_a_file_repeats_sentences(train_file, tmp_path, capsys):
    """Every line twice: the copies fall on both sides of the folds and the accuracy is inflated; cv says so."""
    doubled = tmp_path / "doubled.tsv"
    doubled.write_text(train_file.read_text() * 2)
    code, stdout, err = run(capsys, "cv", "--data", str(doubled), "--folds", "3", "--out", str(tmp_path / "cv"),
                            *TINY, "--no-wide", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    overlap = sum(f["train_overlap"] for f in result["folds"])
    once = json.loads(run(capsys, "cv", "--data", str(train_file), "--folds", "3", "--out", str(tmp_path / "cv1"),
                          *TINY, "--no-wide", "--json")[1])
    assert overlap > 200 and result["repeated_lines"] == 200 + once["repeated_lines"]
    assert (f"warning: {overlap} of 400 test sentences ({overlap / 400:.1%}) have the same words as a training "
            f"sentence of their fold, because {doubled} repeats sentences ({result['repeated_lines']} line(s) repeat "
            "an earlier one)") in err


@pytest.mark.parametrize("swap", ["columns", "free text"])
def test_cv_checks_the_label_column_as_train_does(train_file, tmp_path, capsys, swap):
    rows = [line.split("\t") for line in train_file.read_text().splitlines()]
    if swap == "columns":
        lines = [f"{y}\t{t}" for t, y in rows]
    else:
        lines = [f"{t}\t{t.split()[0]} note {i}" for i, (t, _) in enumerate(rows)]
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "cv", "--data", str(path), "--folds", "3", "--out", str(tmp_path / "cv"), *TINY)
    assert code == 2 and err.count("\n") == 1 and "distinct values" in err, err
    assert not (tmp_path / "cv").exists()


def test_one_hot_rows_give_the_same_output_and_word_gradients():
    """inspect differentiates with respect to one-hot rows (B, T, V): the embedding and the bag must read them
    as they read ids, and pass gradients to them."""
    torch.manual_seed(2)
    for embedding_dim in (0, 5):
        model = Classifier(Config(embedding_dim=embedding_dim, hidden=4, ngram_dim=3, ngram_buckets=7), 9, 2)
        model.eval()
        ids = torch.tensor([[2, 5, 8, 0], [3, 4, 0, 0]])
        lengths = torch.tensor([3, 2])
        x = torch.nn.functional.one_hot(ids, 9).double().requires_grad_(True)
        model.double()
        torch.testing.assert_close(model(x, lengths), model(ids, lengths))
        model(x, lengths)[:, 1].sum().backward()
        assert x.grad[0, :3].abs().sum() > 0 and x.grad[0, 3].abs().sum() == 0  # padding gets no gradient
        half = model(0.5 * x.detach(), lengths)  # a point of integrated gradients' path: finite, different
        assert torch.isfinite(half).all() and not torch.allclose(half, model(ids, lengths))


# -- --ensemble N ------------------------------------------------------------------------------------------
ENSEMBLE_RUN = [*TINY, "--threads", "1", "--seed", "5", "--ngram-buckets", "500"]


def test_ensemble_probabilities_are_the_mean_of_its_members(train_file, tmp_path, capsys):
    from rnnmath.model import Ensemble, held_out, member_config
    from rnnmath.train import train

    out = tmp_path / "ens"
    code, stdout, err = run(capsys, "train", "--data", str(train_file), "--out", str(out), *ENSEMBLE_RUN,
                            "--ensemble", "3")
    assert code == 0, err
    assert "trained an ensemble of 3" in stdout and "member 3/3: epoch 2/2" in err
    assert not (out / "members").exists()  # the member runs are removed once their weights are in one file
    trained = load_model(out)
    assert isinstance(trained.model, Ensemble) and len(trained.model.members) == 3
    texts = data.make_order_task(20, seed=9).texts
    ids, lengths = data.encode(texts, trained.vocab, trained.config.max_len)
    members = torch.stack([m.log_probs(ids, lengths).exp() for m in trained.model.members])  # (3, N, C)
    torch.testing.assert_close(trained.predict(texts, weight=0.0), members.mean(0), rtol=1e-6, atol=1e-7)
    assert not torch.equal(members[0], members[1])  # different seeds, different networks
    history = json.loads((out / "history.json").read_text())
    assert [m["seed"] for m in history["members"]] == [5, 6, 7] and history["done"]
    assert "accuracy" in history["test"]

    # member k is the single network of seed 5 + k: one network of seed 6 on the same parts has member 1's weights
    single = tmp_path / "single"
    train(member_config(trained.config, 1), held_out(out, "train"), held_out(out, "val"), single)
    one = load_model(single)
    assert one.config.seed == 6 and one.config.ensemble == 1
    for name, value in one.model.state_dict().items():
        assert torch.equal(value, trained.model.members[1].state_dict()[name]), name

    # predict, evaluate and inspect read the one directory
    code, stdout, err = run(capsys, "predict", str(out), "--json", texts[0])
    assert code == 0, err
    probabilities = json.loads(stdout)["probabilities"]
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-5)
    assert math.isclose(probabilities[trained.labels[0]], float(trained.predict(texts[:1])[0, 0]), rel_tol=1e-5)
    code, stdout, err = run(capsys, "evaluate", str(out), "--split", "test", "--json")
    assert code == 0, err
    assert math.isclose(json.loads(stdout)["accuracy"], history["test"]["accuracy"])
    code, stdout, err = run(capsys, "inspect", str(out), texts[0], "--out", str(tmp_path / "report"))
    assert code == 0, err
    assert "inspect reads its member 1" in err and (tmp_path / "report" / "report.html").is_file()


def test_ensemble_resumed_after_a_stop_equals_an_uninterrupted_one(train_file, tmp_path, capsys, monkeypatch):
    from rnnmath import train as trainmod
    from rnnmath.errors import Interrupted

    whole = tmp_path / "whole"
    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(whole), *ENSEMBLE_RUN,
                       "--ensemble", "2")
    assert code == 0, err
    original = trainmod.train

    def stop_at_member_1(config, train_set, val_set, out, **kwargs):
        if Path(out).name == "1" and Path(out).parent.name == "members":
            raise Interrupted("stopped before member 2")
        return original(config, train_set, val_set, out, **kwargs)

    monkeypatch.setattr(trainmod, "train", stop_at_member_1)
    stopped = tmp_path / "stopped"
    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(stopped), *ENSEMBLE_RUN,
                       "--ensemble", "2")
    assert code == 130 and "stopped before member 2" in err
    assert (stopped / "members" / "0" / "model.safetensors").is_file() and not (stopped / "model.safetensors").exists()
    code, _, err = run(capsys, "predict", str(stopped), "a b")
    assert code == 2 and "have not all finished training" in err and "--resume" in err
    monkeypatch.setattr(trainmod, "train", original)
    code, _, err = run(capsys, "train", "--data", str(train_file), "--out", str(stopped), "--resume",
                       "--threads", "1")
    assert code == 0, err
    assert "member 1/2: epoch" not in err  # the finished member was kept, not trained again
    assert (stopped / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    code, stdout, err = run(capsys, "train", "--data", str(train_file), "--out", str(stopped), "--resume",
                            "--threads", "1")  # a finished ensemble: nothing to do
    assert code == 0 and "member" not in err and "trained an ensemble of 2" in stdout, err
    examples = data.read_examples(train_file)
    with pytest.raises(UserError, match="holds no run to resume"):
        trainmod.train(Config(ensemble=2), examples, examples, tmp_path / "nothing", resume=True)
