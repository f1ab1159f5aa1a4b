"""ONNX export: the layers themselves (every cell, directions, stacking, lengths) keep dynamic batch and time
axes and onnxruntime equals torch; ``rnnmath export`` of a trained classifier equals ``predict``.

Oracle: the PyTorch module the graph was exported from (and, for the classifier, ``rnnmath predict``).
"""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch
from torch import nn

import rnnmath

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rnnmath.export import export_program  # noqa: E402  (after the skips: needs torch.onnx's dependencies)

SHAPES = [(1, 1), (2, 3), (7, 1), (9, 5), (30, 17)]  # (T, B): T=1 and B=1 included, none of them traced


def run_onnx(program, inputs: dict) -> list:
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


class Layers(nn.Module):
    """torch.nn-style layers side by side, fed the same (T, B, I) input and lengths; every output and h_n."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x, lengths):
        outs = []
        for layer in self.layers.values():
            output, h_n = layer(x, lengths=lengths)
            outs += [output, *(h_n if isinstance(h_n, tuple) else (h_n,))]
        return tuple(outs)


def export_and_compare(module: nn.Module, input_size: int, shapes=SHAPES, tolerance: float = 1e-5) -> None:
    module.eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    example = (torch.randn(6, 3, input_size), torch.tensor([6, 2, 4]))
    program = export_program(module, example, {"x": {0: T, 1: B}, "lengths": {0: B}}, ["x", "lengths"], None)
    for steps, batch in shapes:
        x = torch.randn(steps, batch, input_size)
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
        with torch.no_grad():
            expected = module(x, lengths)
        got = run_onnx(program, {"x": x, "lengths": lengths})
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape), (steps, batch)
            assert abs(torch.from_numpy(g) - e).max() <= tolerance, (steps, batch)


def test_builtin_layers_export_with_dynamic_batch_and_time():
    torch.manual_seed(0)
    export_and_compare(Layers({
        "rnn": rnnmath.RNN(5, 7, num_layers=2, bidirectional=True),
        "relu_rnn": rnnmath.RNN(5, 4, nonlinearity="relu"),
        "lstm": rnnmath.LSTM(5, 6, num_layers=2, bidirectional=True),
        "gru": rnnmath.GRU(5, 8, num_layers=2, bidirectional=True),
    }), 5)


def test_every_cell_exports():
    torch.manual_seed(1)
    layers = {name: rnnmath.Recurrent(cell, 4, 5) for name, cell in rnnmath.CELLS.items()}
    layers["lstm_zoneout"] = rnnmath.LSTM(4, 5, zoneout=0.3)  # evaluation: (1 - z) new + z old, deterministic
    export_and_compare(Layers(layers), 4, shapes=SHAPES[:4])


def test_exported_layer_without_lengths_equals_torch_nn():
    """No lengths, batch_first: the graph equals torch.nn.GRU given the same weights; afterwards the layer's
    own eager paths are unchanged."""
    torch.manual_seed(2)
    ours = rnnmath.GRU(3, 6, batch_first=True).eval()
    theirs = nn.GRU(3, 6, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    B, T = torch.export.Dim("B"), torch.export.Dim("T")
    program = export_program(ours, (torch.randn(2, 5, 3),), ({0: B, 1: T},), ["x"], ["output", "h_n"])
    for steps, batch in SHAPES:
        x = torch.randn(batch, steps, 3)
        output, h_n = run_onnx(program, {"x": x})
        with torch.no_grad():
            expected_output, expected_h_n = theirs(x)
        assert abs(torch.from_numpy(output) - expected_output).max() <= 1e-5
        assert abs(torch.from_numpy(h_n) - expected_h_n).max() <= 1e-5
    # the export left the eager paths alone: fast path and readable loop still equal torch.nn
    x = torch.randn(2, 7, 3)
    for fast in (True, False):
        ours.fast = fast
        torch.testing.assert_close(ours(x)[0], theirs(x)[0])


def test_cells_export_with_dynamic_batch():
    torch.manual_seed(3)

    class Cells(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.lstm, self.gru = rnnmath.RNNCell(4, 5), rnnmath.LSTMCell(4, 5), rnnmath.GRUCell(4, 5)

        def forward(self, x, h):
            return (self.rnn(x, h), *self.lstm(x, (h, h)), self.gru(x, h))

    cells = Cells().eval()
    B = torch.export.Dim("B")
    program = export_program(cells, (torch.randn(3, 4), torch.randn(3, 5)), {"x": {0: B}, "h": {0: B}},
                             ["x", "h"], None)
    for batch in (1, 2, 9):
        x, h = torch.randn(batch, 4), torch.randn(batch, 5)
        with torch.no_grad():
            expected = cells(x, h)
        for g, e in zip(run_onnx(program, {"x": x, "h": h}), expected):
            assert abs(torch.from_numpy(g) - e).max() <= 1e-5


def test_the_tracing_exporter_is_refused_rather_than_fix_the_length(tmp_path):
    """torch.onnx.export(dynamo=False) traces: the graph would hold the traced number of steps (seen: T=6 fed
    T=9 answered with 6 steps), so the layer refuses it with a message naming dynamo=True."""
    layer = rnnmath.GRU(3, 4).eval()
    for fast in (True, False):
        layer.fast = fast
        with pytest.raises(Exception, match=r"dynamo=True"), torch.no_grad():
            torch.onnx.export(layer, (torch.randn(6, 2, 3),), str(tmp_path / "g.onnx"), dynamo=False,
                              dynamic_axes={"input": {0: "T", 1: "B"}})


# -- rnnmath export ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rnnmath.data import make_order_task, stratified_split
    from rnnmath.model import Config
    from rnnmath.train import train

    examples = make_order_task(120, 0)
    train_idx, val_idx = stratified_split(examples.labels, [0.8, 0.2], 0)
    out = tmp_path_factory.mktemp("export") / "model"
    config = Config(cell="lstm", hidden=6, layers=2, epochs=1, max_len=12, vocab_size=40)
    train(config, examples.subset(train_idx), examples.subset(val_idx), out)
    return out


def test_rnnmath_export_equals_predict(model_dir, tmp_path, capsys):
    from rnnmath.cli import main

    out = tmp_path / "model.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime agrees" in capsys.readouterr().out
    vocab = json.loads((tmp_path / "model.vocab.json").read_text())
    labels = json.loads((tmp_path / "model.labels.json").read_text())["labels"]
    assert vocab["pad_id"] == 0 and vocab["unk_id"] == 1 and vocab["first_word_id"] == 2
    texts = ["the food was good but slow", "", "not bad at all, really", "zzz unknown words only",
             "the service was slow " * 5, "good"]
    assert main(["predict", "--threads", "1", "--json", str(model_dir), *texts]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    # tokenise as a program outside rnnmath would: the vocabulary file, the tokenizer, max_len, padding
    from rnnmath.data import tokenize

    index = {w: i + vocab["first_word_id"] for i, w in enumerate(vocab["words"])}
    rows = [[index.get(w, vocab["unk_id"]) for w in tokenize(t)][: vocab["max_len"]] for t in texts]
    # the wide part's inputs, by the rule in model.wide.json: TF-IDF of the word 1-2-grams of the whole text
    wide = json.loads((tmp_path / "model.wide.json").read_text())
    assert json.loads((model_dir / "wide.json").read_text())["weight"] > 0  # the wide part counts in this model
    feature = {f: j for j, f in enumerate(wide["features"])}
    entries = []
    for t in texts:
        words = tokenize(t)
        counts = collections.Counter(g for g in words + [f"{a} {b}" for a, b in zip(words, words[1:])] if g in feature)
        weights = {feature[g]: (1 + math.log(c)) * wide["idf"][feature[g]] for g, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        entries.append([(j, w / norm) for j, w in weights.items()])
    assert any(entries) and not all(entries)  # known grams, and a sentence without any
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for order in (list(range(len(texts))), [4], [1, 3]):  # several B and T (T = the longest row of the batch)
        T = max(1, *(len(rows[i]) for i in order))
        ids = torch.zeros(len(order), T, dtype=torch.long)
        K = max(1, *(len(entries[i]) for i in order))
        grams, gram_weights = torch.zeros(len(order), K, dtype=torch.long), torch.zeros(len(order), K)
        for r, i in enumerate(order):
            ids[r, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            for k, (j, w) in enumerate(entries[i]):
                grams[r, k], gram_weights[r, k] = j, w
        lengths = torch.tensor([len(rows[i]) for i in order])
        (probabilities,) = session.run(["probabilities"], {"ids": ids.numpy(), "lengths": lengths.numpy(),
                                                           "grams": grams.numpy(),
                                                           "gram_weights": gram_weights.numpy()})
        assert probabilities.dtype.name == "float32" and probabilities.shape == (len(order), len(labels))
        for r, i in enumerate(order):
            for c, label in enumerate(labels):
                assert abs(probabilities[r, c] - expected[i]["probabilities"][label]) <= 1e-5


def test_a_model_without_the_wide_part_exports_ids_and_lengths_only(tmp_path):
    from rnnmath.data import make_order_task, stratified_split
    from rnnmath.export import export_onnx
    from rnnmath.model import Config
    from rnnmath.train import train

    examples = make_order_task(80, 1)
    train_idx, val_idx = stratified_split(examples.labels, [0.8, 0.2], 0)
    config = Config(hidden=4, epochs=1, max_len=8, vocab_size=30, ngram_buckets=20, wide=False)
    train(config, examples.subset(train_idx), examples.subset(val_idx), tmp_path / "m")
    result = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert result.wide is None and not (tmp_path / "m.wide.json").exists() and result.max_difference <= 1e-5
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["ids", "lengths"]


def test_export_errors_are_one_line(model_dir, tmp_path, capsys):
    from rnnmath.cli import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith("rnnmath: error:")
    assert main(["export", str(model_dir), "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(model_dir), "--format", "tflite", "--out", str(tmp_path / "m.onnx")])
    assert exit_.value.code == 2 and "--format" in capsys.readouterr().err


def test_export_of_a_language_model_says_it_is_for_classifiers(tmp_path, capsys):
    from rnnmath.cli import main

    lm = tmp_path / "lm"  # what 'rnnmath train --task lm' writes: the task in config.json, LM fields (bptt)
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"task": "lm", "level": "char", "cell": "lstm", "bptt": 16}))
    assert main(["export", str(lm), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnmath: error:") and "holds a language model" in err and "for classifiers" in err
    assert "bptt" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
