"""The wide part (rnnmath.wide): TF-IDF features and logistic regression against scikit-learn as the oracle,
the choice of C and λ, and the wide part in the model directory (saved, rebuilt with no flags, checked)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from rnnmath import data
from rnnmath.errors import UserError
from rnnmath.model import PRESETS, WIDE, WIDE_WEIGHTS, load_model
from rnnmath.train import train
from rnnmath.wide import Tfidf, choose, fit_logistic, grams, mix

TEXTS = ["the food was good", "Good good food!", "the service was slow but the food good", "Slow, slow, SLOW.",
         "nothing here", "", "ok ok ok ok the"]
LABELS = [0, 1, 2, 0, 1, 2, 1]
UNSEEN = ["good food unknown words the", "zzz", "the food the food the food", ""]
TINY = dataclasses.replace(PRESETS["default"], hidden=6, vocab_size=40, max_len=12, epochs=2, batch_size=16,
                           patience=2, dropout=0.2, ngram_buckets=50)


def sklearn_vectorizer():
    text = pytest.importorskip("sklearn.feature_extraction.text")  # the benchmarks extra
    return text.TfidfVectorizer(tokenizer=data.tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2),
                                sublinear_tf=True)


def test_grams_are_unigrams_then_bigrams():
    assert grams("The cat, the HAT") == ["the", "cat", "the", "hat", "the cat", "cat the", "the hat"]
    assert grams("") == [] and grams("one") == ["one"]


def test_features_by_hand_on_two_sentences():
    tfidf = Tfidf.fit(["a b a", "a"])
    assert tfidf.features == ["a", "a b", "b", "b a"]
    idf_a, idf_rare = 1.0, math.log(3 / 2) + 1  # ln((1+n)/(1+df)) + 1, n = 2: "a" in both, the others in one
    assert torch.allclose(tfidf.idf, torch.tensor([idf_a, idf_rare, idf_rare, idf_rare], dtype=torch.float64))
    row = torch.tensor([(1 + math.log(2)) * idf_a, idf_rare, idf_rare, idf_rare], dtype=torch.float64)  # tf(a) = 2
    x = tfidf.dense(["a b a", "a", "c d", "b"])
    assert torch.allclose(x[0], row / row.norm())
    assert torch.equal(x[1], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))  # one gram: norm 1
    assert torch.equal(x[2], torch.zeros(4, dtype=torch.float64))  # no known gram: zeros, not NaN
    assert torch.equal(x[3], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))


def test_features_equal_scikit_learn_tfidf_vectorizer():
    vectorizer = sklearn_vectorizer()
    expected = vectorizer.fit_transform(TEXTS).toarray()
    tfidf = Tfidf.fit(TEXTS)
    assert tfidf.features == list(vectorizer.get_feature_names_out())
    assert torch.allclose(tfidf.dense(TEXTS), torch.from_numpy(expected), rtol=0, atol=1e-12)
    assert torch.allclose(tfidf.dense(UNSEEN), torch.from_numpy(vectorizer.transform(UNSEEN).toarray()),
                          rtol=0, atol=1e-12)


def test_features_equal_scikit_learn_on_real_sentences():
    examples = data.make_order_task(120, 3)
    vectorizer = sklearn_vectorizer()
    expected = vectorizer.fit_transform(examples.texts[:100]).toarray()
    tfidf = Tfidf.fit(examples.texts[:100])
    assert torch.allclose(tfidf.dense(examples.texts[:100]), torch.from_numpy(expected), rtol=0, atol=1e-12)
    assert torch.allclose(tfidf.dense(examples.texts[100:]),
                          torch.from_numpy(vectorizer.transform(examples.texts[100:]).toarray()), rtol=0, atol=1e-12)


def test_max_features_keeps_the_most_frequent_grams_as_scikit_learn():
    examples = data.make_order_task(120, 4)
    vectorizer = sklearn_vectorizer().set_params(max_features=7)
    expected = vectorizer.fit_transform(examples.texts).toarray()
    tfidf = Tfidf.fit(examples.texts, max_features=7)
    assert tfidf.features == list(vectorizer.get_feature_names_out())
    assert torch.allclose(tfidf.dense(examples.texts), torch.from_numpy(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("C", [0.3, 10.0])
def test_logistic_regression_equals_scikit_learn(C):
    linear_model = pytest.importorskip("sklearn.linear_model")
    vectorizer = sklearn_vectorizer()
    x = vectorizer.fit_transform(TEXTS)
    reference = linear_model.LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(x, LABELS)  # multinomial (3)
    tfidf = Tfidf.fit(TEXTS)
    model = fit_logistic(tfidf.transform(TEXTS), torch.tensor(LABELS), len(tfidf), 3, C)
    with torch.no_grad():
        p = torch.softmax(model(*tfidf.transform(UNSEEN)), dim=1)
    assert torch.allclose(p, torch.from_numpy(reference.predict_proba(vectorizer.transform(UNSEEN))), atol=1e-5)


def test_logistic_regression_minimises_its_objective():
    """Without scikit-learn: at the optimum the gradient of mean CE + ||W||²/(2Cn) vanishes (b too)."""
    tfidf = Tfidf.fit(TEXTS)
    y, C = torch.tensor(LABELS), 3.0
    model = fit_logistic(tfidf.transform(TEXTS), y, len(tfidf), 3, C)
    loss = torch.nn.functional.cross_entropy(model(*tfidf.transform(TEXTS)), y) \
        + (model.weight**2).sum() / (2 * C * len(y))
    loss.backward()
    assert model.weight.grad.abs().max() < 1e-6 and model.bias.grad.abs().max() < 1e-6
    assert model.weight.abs().max() > 0.1  # it did learn something


def test_mix_is_each_half_at_the_ends_and_normalised_between():
    network = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]), dim=1)
    linear = torch.log_softmax(torch.tensor([[3.0, -1.0, 0.0], [2.0, 1.0, 0.0]]), dim=1)
    assert torch.allclose(mix(network, linear, 0.0), network)
    assert torch.allclose(mix(network, linear, 1.0), linear)
    half = mix(network, linear, 0.5)
    assert torch.allclose(half, torch.log_softmax((network + linear) / 2, dim=1))  # geometric mean, renormalised
    assert torch.allclose(half.exp().sum(1), torch.ones(2))


def test_choose_takes_the_weight_and_C_with_the_best_validation_accuracy():
    examples = data.make_order_task(240, 0)
    y = torch.tensor([sorted(set(examples.labels)).index(label) for label in examples.labels])
    uninformative = torch.zeros(40, 2)  # a network that says nothing: λ = 0 scores the first class only
    part, record = choose(examples.texts[:200], y[:200], examples.texts[200:], y[200:], uninformative, 2)
    by_weight = record["val_accuracy_by_weight"]
    assert record["val_accuracy"] == max(by_weight.values()) == by_weight[str(part.weight)]
    assert by_weight["0.0"] == (y[200:] == 0).double().mean().item()
    assert part.weight > 0 and record["val_accuracy"] > by_weight["0.0"]
    assert record["val_accuracy_by_C"][str(part.C)] == max(record["val_accuracy_by_C"].values())
    assert record["features"] == len(part.tfidf) == len(Tfidf.fit(examples.texts[:200]))


def task():
    examples = data.make_order_task(160, 0)
    fit, val = data.stratified_split(examples.labels, [0.75, 0.25], 0)
    return examples.subset(fit), examples.subset(val)


def test_wide_part_is_saved_and_rebuilt_with_no_flags(tmp_path):
    fit, val = task()
    history = train(TINY, fit, val, tmp_path / "m")
    document = json.loads((tmp_path / "m" / WIDE).read_text())
    assert document["format"] == "rnnmath-wide" and document["features"] == Tfidf.fit(fit.texts).features
    assert history["wide"]["weight"] == document["weight"] and history["wide"]["C"] == document["C"]
    assert json.loads((tmp_path / "m" / "history.json").read_text())["wide"] == history["wide"]
    trained = load_model(tmp_path / "m")
    assert trained.wide is not None and trained.wide.weight == document["weight"]
    texts = ["the food was good", "zzz", ""]
    network = load_model(tmp_path / "m", with_wide=False).predict(texts).log()
    linear = trained.predict(texts, weight=1.0).log()
    assert torch.allclose(trained.predict(texts, weight=0.0).log(), network, atol=1e-6)
    assert torch.allclose(trained.predict(texts), mix(network, linear, trained.wide.weight).exp(), atol=1e-6)
    # the wide part alone is the logistic regression on the features of the training sentences
    x = Tfidf.fit(fit.texts).dense(texts).float()
    z = x @ trained.wide.linear.weight.detach() + trained.wide.linear.bias.detach()
    assert torch.allclose(linear, torch.log_softmax(z, dim=1), atol=1e-6)
    # the validation accuracy it reports is that of the saved model
    predicted = trained.predict(val.texts).argmax(1)
    truth = torch.tensor([trained.labels.index(label) for label in val.labels])
    assert (predicted == truth).double().mean().item() == pytest.approx(history["wide"]["val_accuracy"])


def test_resuming_a_finished_run_keeps_its_wide_part(tmp_path):
    fit, val = task()
    train(TINY, fit, val, tmp_path / "m")
    before = {name: (tmp_path / "m" / name).read_bytes() for name in (WIDE, WIDE_WEIGHTS)}
    history = train(TINY, fit, val, tmp_path / "m", resume=True)
    assert {name: (tmp_path / "m" / name).read_bytes() for name in (WIDE, WIDE_WEIGHTS)} == before
    assert history["wide"]["C"] == json.loads(before[WIDE])["C"]


def test_a_run_stopped_before_its_wide_part_loads_as_the_network_until_finished_by_resume(tmp_path):
    fit, val = task()
    config = dataclasses.replace(TINY, epochs=3, patience=3)
    train(config, fit, val, tmp_path / "m")
    before = {name: (tmp_path / "m" / name).read_bytes() for name in (WIDE, WIDE_WEIGHTS)}
    for name in (WIDE, WIDE_WEIGHTS):  # as if killed between the last epoch and the wide part
        (tmp_path / "m" / name).unlink()
    with pytest.raises(UserError, match="finish the run with --resume"):
        load_model(tmp_path / "m")
    history = train(config, fit, val, tmp_path / "m", resume=True)
    assert {name: (tmp_path / "m" / name).read_bytes() for name in (WIDE, WIDE_WEIGHTS)} == before  # deterministic
    assert load_model(tmp_path / "m").wide is not None and "wide" in history
    # a run still in its epochs (history not done) has no wide part yet: it loads as the network so far
    document = json.loads((tmp_path / "m" / "history.json").read_text())
    (tmp_path / "m" / "history.json").write_text(json.dumps({**document, "done": False}))
    for name in (WIDE, WIDE_WEIGHTS):
        (tmp_path / "m" / name).unlink()
    assert load_model(tmp_path / "m").wide is None


def test_no_wide_part_when_the_config_has_none(tmp_path):
    fit, val = task()
    history = train(dataclasses.replace(TINY, wide=False), fit, val, tmp_path / "m")
    assert "wide" not in history and not (tmp_path / "m" / WIDE).exists()
    assert load_model(tmp_path / "m").wide is None


def test_ensemble_has_one_wide_part(tmp_path):
    fit, val = task()
    train(dataclasses.replace(TINY, ensemble=2, epochs=1), fit, val, tmp_path / "m")
    trained = load_model(tmp_path / "m")
    assert trained.wide is not None and not (tmp_path / "m" / "members").exists()
    network = load_model(tmp_path / "m", with_wide=False).predict(["the food"]).log()
    assert torch.allclose(trained.predict(["the food"]), mix(network, trained.wide.log_probs(["the food"]),
                                                              trained.wide.weight).exp(), atol=1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WIDE).unlink(), "wide.json is missing"),
    (lambda d: (d / WIDE_WEIGHTS).unlink(), "wide.safetensors is missing: the weights of the wide part"),
    (lambda d: (d / WIDE).write_text(json.dumps({**json.loads((d / WIDE).read_text()), "weight": 2})),
     "\"weight\" in [0, 1]"),
    (lambda d: (d / WIDE).write_text(json.dumps({**json.loads((d / WIDE).read_text()),
                                                 "features": json.loads((d / WIDE).read_text())["features"][1:]})),
     "are not the ones"),
    # two names swapped: the same shapes, but each n-gram would read the other's weights (an outside tester's case)
    (lambda d: (d / WIDE).write_text(json.dumps({**json.loads((d / WIDE).read_text()), "features": (lambda f: [
        f[1], f[0], *f[2:]])(json.loads((d / WIDE).read_text())["features"])})), "are not the ones"),
])
def test_damaged_wide_part_gives_a_clear_error(tmp_path, damage, message):
    fit, val = task()
    train(TINY, fit, val, tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(tmp_path / "m")


def test_cli_train_evaluate_predict_inspect_with_the_wide_part(tmp_path, capsys):
    from rnnmath.cli import main

    examples = data.make_order_task(160, 2)
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{t}\t{y}\n" for t, y in zip(examples.texts, examples.labels)))
    flags = ["--hidden", "4", "--vocab-size", "40", "--max-len", "12", "--epochs", "2", "--ngram-buckets", "50",
             "--threads", "1"]
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "m"), *flags]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "wide part: TF-IDF logistic regression on" in err and "against the network" in err
    document = json.loads((tmp_path / "m" / WIDE).read_text())
    # the summary leads with the accuracy of what predicts (the mix), then the network's alone
    assert f"validation accuracy {document['choice']['val_accuracy']:.4f} with the wide part" in captured.out
    assert "the network alone: best validation accuracy" in captured.out
    document["weight"] = 0.5  # make sure the wide part counts, whatever validation chose
    (tmp_path / "m" / WIDE).write_text(json.dumps(document))
    trained = load_model(tmp_path / "m")
    assert main(["predict", "--json", str(tmp_path / "m"), "the food was good"]) == 0
    printed = json.loads(capsys.readouterr().out)["probabilities"]
    expected = trained.predict(["the food was good"])[0]
    assert printed == pytest.approx({y: float(p) for y, p in zip(trained.labels, expected)}, abs=1e-6)
    assert main(["evaluate", str(tmp_path / "m"), "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    test = data.read_examples(path).subset(json.loads((tmp_path / "m" / "split.json").read_text())["parts"]["test"]
                                           ["lines"][i] - 1 for i in range(report["n"]))
    truth = torch.tensor([trained.labels.index(y) for y in test.labels])
    assert report["accuracy"] == pytest.approx((trained.predict(test.texts).argmax(1) == truth).double().mean().item())
    assert main(["inspect", str(tmp_path / "m"), "the food was good", "--out", str(tmp_path / "r")]) == 0
    assert "inspect reads the network: the probabilities shown are the network's alone" in capsys.readouterr().err
