"""Traces, gradient flow and the inspect report against independent recomputations.

Oracles: each cell class called step by step on one sequence at a time (no layer, no masks), the NumPy
reference, autograd on that step-by-step recomputation (retain_grad, autograd.functional.jacobian), finite
differences, and headless Chromium for the report's images.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rnnmath
from rnnmath import flow, plots, reference
from rnnmath.cells import HiddenState
from rnnmath.cli import main
from rnnmath.data import Vocabulary
from rnnmath.model import PRESETS, Classifier, TrainedModel, save_description, save_weights

T, B, I, H = 6, 3, 4, 3
LENGTHS = torch.tensor([6, 2, 4])
CHROMIUM = "/usr/bin/chromium"


class LeakyCell(rnnmath.Cell):
    r"""A user-written cell: a leak gate a decides how much of the state is replaced::

        a = σ(x_a + h W_ha + b_ha)
        u = tanh(x_u + h W_hu + b_hu)
        h' = a ⊙ u + (1 − a) ⊙ h
    """

    num_gates = 2
    gate_names = ("a", "u")

    def step(self, p, x, state):
        x_a, x_u = x.chunk(2, dim=1)
        h_a, h_u = F.linear(state.h, p["weight_hh"], p["bias_hh"]).chunk(2, dim=1)
        a, u = torch.sigmoid(x_a + h_a), torch.tanh(x_u + h_u)
        self.record(a=a, u=u)
        return HiddenState(a * u + (1 - a) * state.h)


CELL_CLASSES = {**rnnmath.CELLS, "user_leaky": LeakyCell}


def make_layer(cell_class, num_layers=2, bidirectional=True, seed=0):
    torch.manual_seed(seed)
    return rnnmath.Recurrent(cell_class, I, H, num_layers=num_layers, bidirectional=bidirectional).double()


def standalone_cells(layer):
    """One standalone cell per (layer, direction) holding that layer's parameters: the oracle's cells."""
    cells = {}
    for k, meta in enumerate(layer.cells):
        for d in range(layer.num_directions):
            cell = type(meta)(meta.input_size, meta.hidden_size, meta.bias).double()
            with torch.no_grad():
                for name, value in layer.layer_params(k, d).items():
                    if value is not None:
                        getattr(cell, name).copy_(value)
            cells[k, d] = cell
    return cells


def step_by_step(layer, x, lengths, retain=False):
    """The layer recomputed one sequence at a time with the cell classes called step by step.

    Returns per sequence b: {(k, d): [state per step in reading order]}, {(k, d): [gate dicts]}, the top
    layer's output (n_b, D·H) and the final h per (k, d)."""
    cells = standalone_cells(layer)
    D = layer.num_directions
    result = []
    for b in range(x.shape[1]):
        n = int(lengths[b])
        layer_input = x[:n, b : b + 1]  # (n, 1, I)
        states, gates, finals = {}, {}, {}
        for k in range(layer.num_layers):
            outputs = []
            for d in range(D):
                cell, seq = cells[k, d], layer_input if d == 0 else layer_input.flip(0)
                recorded = []
                state = None
                hs, per_step = [], []
                for t in range(n):
                    recorded.append({})
                    cell._recorder = recorded[-1].update  # what the cell records at this step
                    out = cell(seq[t], state if state is None or len(state) > 1 else state[0])  # h alone, as torch.nn
                    state = out if isinstance(out, tuple) else (out,)
                    if retain:
                        state[0].retain_grad()
                    per_step.append(state)
                    hs.append(state[0])
                cell._recorder = None
                states[k, d], gates[k, d], finals[k, d] = per_step, recorded, per_step[-1][0]
                h = torch.cat(hs) if hs else torch.zeros(0, H, dtype=x.dtype)  # (n, H)
                outputs.append(h if d == 0 else h.flip(0))
            layer_input = torch.cat(outputs, dim=1).unsqueeze(1)  # (n, 1, D·H)
        result.append((states, gates, layer_input[:, 0], finals))
    return result


def input_time(d, t, n):
    """The input position of loop step t of direction d in a sequence of length n."""
    return t if d == 0 else n - 1 - t


# -- traces -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CELL_CLASSES))
def test_trace_equals_step_by_step_recomputation(name, monkeypatch):
    layer = make_layer(CELL_CLASSES[name])
    layer.fast = False  # tracing runs the readable loop; a cell's fast_scan is held to it in test_fused.py
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain_out, plain_h = layer(x, lengths=LENGTHS)
    with rnnmath.trace(layer) as tr:
        out, h_n = layer(x, lengths=LENGTHS)
    assert torch.equal(out, plain_out)  # tracing changes nothing, bit for bit
    for a, b in zip(plain_h if isinstance(plain_h, tuple) else (plain_h,), h_n if isinstance(h_n, tuple) else (h_n,)):
        assert torch.equal(a, b)
    layer.fast = True
    fast_out, _ = layer(x, lengths=LENGTHS)  # for RNN, LSTM, GRU: torch's fused operator, equal within rounding
    torch.testing.assert_close(fast_out, out, rtol=1e-12, atol=1e-12)
    if name in ("rnn", "lstm", "gru"):  # their hand-written fused loops are bit-identical to the readable one
        monkeypatch.setattr(rnnmath.layers, "torch_kernels", False)
        assert torch.equal(layer(x, lengths=LENGTHS)[0], out)
    assert torch.equal(tr.valid, torch.arange(T).unsqueeze(1) < LENGTHS)
    fields = layer.cells[0].State._fields
    for b, (states, gates, _, _) in enumerate(step_by_step(layer, x, LENGTHS)):
        n = int(LENGTHS[b])
        for (k, d), per_step in states.items():
            values = tr[k, d]
            assert set(values) == set(fields) | set(gates[k, d][0] if gates[k, d] else ())
            assert torch.isnan(values["h"][n:, b]).all()  # past the length: marked, not invented
            for t in range(n):
                s = input_time(d, t, n)
                for i, field in enumerate(fields):
                    torch.testing.assert_close(values[field][s, b], per_step[t][i][0], rtol=1e-12, atol=1e-12)
                for gate, value in gates[k, d][t].items():
                    torch.testing.assert_close(values[gate][s, b], value[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_trace_equals_numpy_reference(name):
    layer = make_layer(rnnmath.CELLS[name], num_layers=1, bidirectional=False)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with rnnmath.trace(layer) as tr:
        layer(x, lengths=LENGTHS)
    params = {n: v.detach().numpy() for n, v in layer.layer_params(0, 0).items()}
    h0 = np.zeros((B, H))
    forward = {"rnn": lambda: reference.rnn_forward(params, x.numpy(), h0, LENGTHS.numpy()),
               "lstm": lambda: reference.lstm_forward(params, x.numpy(), h0, h0, LENGTHS.numpy()),
               "gru": lambda: reference.gru_forward(params, x.numpy(), h0, LENGTHS.numpy())}[name]
    out, *_, cache = forward()
    valid = tr.valid.numpy()
    np.testing.assert_allclose(np.where(valid[..., None], tr[0, 0]["h"].numpy(), 0.0), out, rtol=1e-12, atol=1e-12)
    for gate in layer.cells[0].gate_names:
        expected = np.stack([s[gate] for s in cache["steps"]])  # (T, B, H)
        np.testing.assert_allclose(tr[0, 0][gate].numpy()[valid], expected[valid], rtol=1e-12, atol=1e-12)


# -- gradients through time -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "user_leaky"])
def test_gradient_norms_equal_autograd_on_step_by_step_recomputation(name):
    layer = make_layer(CELL_CLASSES[name])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=g)
    R_out = torch.randn(T, B, 2 * H, dtype=torch.float64, generator=g)
    R_h = torch.randn(4, B, H, dtype=torch.float64, generator=g)

    def loss():
        out, h_n = layer(x, lengths=LENGTHS)
        h_n = h_n[0] if isinstance(h_n, tuple) else h_n
        return (out * R_out).sum() + (h_n * R_h).sum()

    result = flow.gradient_flow(layer, loss)
    for b, (states, _, top, finals) in enumerate(step_by_step(layer, x, LENGTHS, retain=True)):
        n = int(LENGTHS[b])
        total = (top * R_out[:n, b]).sum() + sum((finals[k, d][0] * R_h[2 * k + d, b]).sum() for k, d in finals)
        total.backward()
        for (k, d), per_step in states.items():
            expected = torch.stack([s[0].grad[0].norm() for s in per_step])  # reading order
            got = torch.stack([result.norms[k, d][input_time(d, t, n), b] for t in range(n)])
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
            assert torch.isnan(result.norms[k, d][n:, b]).all()


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_jacobian_norms_equal_autograd_functional_jacobian(name):
    layer = make_layer(rnnmath.CELLS[name], num_layers=1, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    result = flow.jacobian_flow(layer, lambda: layer(x, lengths=LENGTHS))
    cells = standalone_cells(layer)
    for b, (states, _, _, _) in enumerate(step_by_step(layer, x, LENGTHS)):
        n = int(LENGTHS[b])
        for d in range(2):
            seq = x[:n, b : b + 1] if d == 0 else x[:n, b : b + 1].flip(0)
            for t in range(n):
                rest = states[0, d][t][1:]  # c_t is held fixed: ∂h_T/∂h_t is the partial through h_t

                def final_h(h, t=t, rest=rest, seq=seq, d=d, n=n):
                    state = (h, *rest)
                    for s in range(t + 1, n):
                        out = cells[0, d](seq[s], state if len(state) > 1 else state[0])
                        state = out if isinstance(out, tuple) else (out,)
                    return state[0]

                J = torch.autograd.functional.jacobian(final_h, states[0, d][t][0].detach())  # (1, H, 1, H)
                expected = J.reshape(H, H).norm()
                torch.testing.assert_close(result.norms[0, d][input_time(d, t, n), b], expected, rtol=1e-10,
                                           atol=1e-14)


# -- the classifier, word by word --------------------------------------------------------------------------
WORDS = ["the", "food", "was", "good", "but", "slow", "not", "bad"]


def classifier(preset="seed", **changes):
    config = dataclasses.replace(PRESETS[preset], **changes)
    vocab = Vocabulary(WORDS)
    torch.manual_seed(0)
    model = Classifier(config, len(vocab), 2).double().eval()
    return TrainedModel(config, vocab, ["negative", "positive"], model)


def test_reading_probabilities_are_the_head_on_each_state_and_attributions_check_out():
    trained = classifier("seed")  # one direction, last pooling: the head applied to h_t
    text = "the food was good but xyzzy slow"
    reading = flow.read_sentence(trained, text)
    m = trained.model
    h = reading.states["layer 1 forward"]["h"]  # (T, H)
    z = h
    for dense in m.dense:
        z = torch.tanh(dense(z))
    torch.testing.assert_close(reading.probabilities, F.softmax(m.out(z), dim=1), rtol=1e-10, atol=1e-12)
    assert reading.unknown == [False] * 5 + [True, False] and len(reading.tokens) == 7
    target = reading.predicted
    assert target == int(trained.predict([text])[0].argmax())

    ids = torch.tensor(trained.vocab.ids(text))

    def odds(p):  # log-odds of the target from probabilities (N, C), the plain way
        return torch.log(p[:, target]) - torch.log(1 - p[:, target])

    f = odds(trained.predict([text]))[0]
    assert reading.log_odds == pytest.approx(float(f), rel=1e-9)
    for t in range(len(ids)):  # occlusion: the log-odds with that word replaced by UNK, run directly
        occluded = " ".join("zzzunknown" if i == t else w for i, w in enumerate(reading.tokens))
        expected = f - odds(trained.predict([occluded]))[0]
        torch.testing.assert_close(reading.attribution["occlusion"][t], expected, rtol=1e-7, atol=1e-10)

    # gradient × input: a central finite difference of the log-odds in the one-hot entry x_t[id_t]
    eps = 1e-6
    x = F.one_hot(ids, len(trained.vocab)).double().unsqueeze(0)  # (1, T, V)
    lengths = torch.tensor([len(ids)])
    for t in range(len(ids)):
        up, down = x.clone(), x.clone()
        up[0, t, ids[t]] += eps
        down[0, t, ids[t]] -= eps
        numeric = (odds(m(up, lengths).exp()) - odds(m(down, lengths).exp()))[0] / (2 * eps)
        torch.testing.assert_close(reading.attribution["grad_x_input"][t], numeric, rtol=1e-5, atol=1e-9)
    # the one-hot input gives the same values as the token ids
    torch.testing.assert_close(m(x, lengths), m(ids.unsqueeze(0), lengths), rtol=0, atol=1e-14)


def test_bidirectional_reading_is_the_prediction_on_each_prefix():
    trained = classifier("default", hidden=8)
    text = "the food was not good"
    reading = flow.read_sentence(trained, text)
    words = text.split()
    expected = trained.predict([" ".join(words[: t + 1]) for t in range(len(words))])
    torch.testing.assert_close(reading.probabilities, expected, rtol=1e-10, atol=1e-12)
    assert set(reading.grad_norm) == {"layer 1 forward", "layer 1 reverse"}
    assert set(reading.states["layer 1 forward"]) == {"h", "r", "z", "n"}


# -- the report, rendered ----------------------------------------------------------------------------------
def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("RNNMATH_REQUIRE_CHROMIUM") == "1" or os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs it (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is not installed")


def rendered_image_sizes(report, tmp_path) -> list[tuple[int, int]]:
    """Load the report in headless Chromium and return each <img>'s natural size after loading."""
    probe = report.read_text().replace("</body>", """<script>
window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => i.naturalWidth + "x" + i.naturalHeight).join(",");
  document.body.insertAdjacentHTML("beforeend", "<pre>SIZ" + "ES[" + sizes + "]</pre>");
});
</script></body>""")
    page = tmp_path / "probe.html"
    page.write_text(probe)
    command = [chromium_or_skip(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
               page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<pre>SIZES\[(.*?)\]</pre>", dom)
    assert found, f"Chromium did not run the probe: {dom[-500:]}"
    return [tuple(int(v) for v in s.split("x")) for s in found.group(1).split(",") if s]


@pytest.mark.parametrize("preset, changes, figures", [
    ("seed", {}, ["probabilities", "states", "gradients", "attribution"]),
    ("default", {"hidden": 256, "cell": "lstm"}, ["probabilities", "states", "gates_1", "gates_2", "gradients",
                                                  "attribution"]),
])
def test_report_has_every_figure_and_each_renders_in_chromium(tmp_path, preset, changes, figures):
    trained = classifier(preset, **changes)
    reading = flow.read_sentence(trained, "the food was good but slow and not bad at all")
    report = plots.write_reading_report(reading, tmp_path / "report")
    page = report.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing outside the page
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == len(figures)
    for name, source in zip(figures, sources):
        png = (tmp_path / "report" / f"{name}.png").read_bytes()
        assert base64.b64decode(source) == png and png.startswith(b"\x89PNG")
        assert f'id="{name}"' in page
    sizes = rendered_image_sizes(report, tmp_path)
    assert len(sizes) == len(figures) and all(w > 0 and h > 0 for w, h in sizes)


def test_state_heatmap_of_a_large_state_shows_the_most_varying_units():
    values = torch.zeros(5, 256)
    values[:, 7] = torch.arange(5.0)  # the only unit that varies
    assert 7 in plots.top_variance_units(values, 32) and len(plots.top_variance_units(values, 32)) == 32
    fig = plots.state_heatmaps({"layer 1 forward": values}, list("abcde"))
    assert "the 32 of 256 units that vary most" in fig.axes[0].get_title(loc="left")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcde")


# -- the commands ------------------------------------------------------------------------------------------
def test_inspect_command_writes_the_report_and_prints_the_numbers(tmp_path, capsys):
    trained = classifier("seed")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    trained.model.float()
    save_description(model_dir, trained.config, trained.vocab, trained.labels)
    save_weights(model_dir, trained.model)
    assert main(["inspect", str(model_dir), "The food was good, but slow.", "--out", str(tmp_path / "out"),
                 "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["tokens"] == ["the", "food", "was", "good", "but", "slow"]
    assert len(numbers["probabilities"]) == 6 and all(abs(sum(p) - 1) < 1e-5 for p in numbers["probabilities"])
    assert len(numbers["grad_norm"]["layer 1 forward"]) == 6
    assert {len(v) for v in numbers["attribution"].values()} == {6}
    for name in ["report.html", "probabilities.png", "states.png", "gradients.png", "attribution.png"]:
        assert (tmp_path / "out" / name).is_file()
    assert set(numbers["attribution"]) == {"integrated_gradients", "grad_x_input", "occlusion"}
    assert numbers["attribution_target"] == "log-odds of the predicted class"
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    answer, sentence = page.index('class="answer"'), page.index('class="sentence"')
    assert answer < sentence < page.index("<figure")  # the answer first, then the coloured sentence, then details
    assert f"<code>{model_dir}</code>" in page and "cell RNN" in page and "test accuracy not recorded" in page
    assert "labels <b>negative</b>, <b>positive</b>" in page
    assert page.count('<span class="word"') == 6


def test_inspect_with_non_utf8_bytes_in_the_argument(tmp_path, capsys):
    """`rnnmath inspect m $'caf\\xe9 good'`: one clear error (exit 2) naming the byte, never an internal error."""
    trained = classifier("seed")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    trained.model.float()
    save_description(model_dir, trained.config, trained.vocab, trained.labels)
    save_weights(model_dir, trained.model)
    for command in (["inspect", str(model_dir)], ["predict", str(model_dir)]):
        argv = [*command, b"caf\xe9 good".decode("utf-8", "surrogateescape"), "--out", str(tmp_path / "r")]
        if command[0] == "predict":
            argv = argv[:3]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('rnnmath: error: TEXT "caf\\xe9 good" holds the byte 0xe9, which is not UTF-8')
        assert err.count("\n") == 1
    result = subprocess.run([sys.executable.encode(), b"-m", b"rnnmath", b"inspect", str(model_dir).encode(),
                             b"caf\xe9 good", b"--out", str(tmp_path / "r").encode()], capture_output=True,
                            timeout=120)
    assert result.returncode == 2 and b"holds the byte 0xe9" in result.stderr and b"Traceback" not in result.stderr


def test_flow_reproduces_vanishing_gradients(tmp_path, capsys):
    """At 100 steps a tanh RNN's ‖∂L/∂h_1‖/‖∂L/∂h_T‖ is below 1e-12. Measured at torch.nn's default
    initialisation the LSTM's vanishes as well (its forget gate starts near σ(0) = ½, and ½^100 ≈ 1e-30);
    with the common forget-gate bias of 1 it is more than a million times the RNN's."""
    default = {r.cell: r.ratio for r in flow.vanishing_gradients(["rnn", "lstm"], steps=100, batch=8)}
    assert default["rnn"] < 1e-12 and default["lstm"] < 1e-12
    biased = {r.cell: r.ratio for r in flow.vanishing_gradients(["rnn", "lstm"], steps=100, batch=8,
                                                                  forget_bias=1.0)}
    assert biased["rnn"] == default["rnn"]  # the same sequences and weights: the bias touches only the LSTM
    assert biased["lstm"] > 1e6 * biased["rnn"]

    assert main(["flow", "--cells", "rnn,lstm", "--steps", "30", "--batch", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rnn" in printed and "lstm" in printed and str(tmp_path / "report.html") in printed
    assert (tmp_path / "flow.png").read_bytes().startswith(b"\x89PNG")


def test_chromium_is_required_in_ci(monkeypatch):
    """The report test must fail, not skip, in CI when Chromium is missing."""
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setenv("RNNMATH_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception):
        chromium_or_skip()


# -- attribution on the log-odds: integrated gradients ---------------------------------------------------------
@pytest.mark.parametrize("preset, changes", [("seed", {}), ("default", {"hidden": 8})])
def test_integrated_gradients_completeness(preset, changes):
    """Σ_t IG_t = F(x) − F(0) (Sundararajan et al. 2017), F the log-odds: the midpoint rule's error shrinks
    as 1/steps², so 256 points are much closer than 8."""
    trained = classifier(preset, **changes)
    ids = torch.tensor(trained.vocab.ids("the food was good but slow"))
    target = int(trained.predict(["the food was good but slow"])[0].argmax())
    errors = []
    for steps in (8, 256):
        ig, f_x, f_0 = flow.integrated_gradients(trained.model, ids, target, len(trained.vocab), steps=steps)
        errors.append(abs(float(ig.sum()) - (f_x - f_0)))
    assert errors[1] < 1e-4 * max(1.0, abs(f_x - f_0)) and errors[1] < errors[0] / 100
    with torch.no_grad():
        f = trained.model(ids.unsqueeze(0), torch.tensor([len(ids)]))[0]  # F(x) agrees with the token-id path
    assert f_x == pytest.approx(float(flow.log_odds(f, target)), rel=1e-9)


def test_attribution_does_not_saturate_on_a_confident_prediction():
    """A prediction at p ≈ 1 − 1e-7: attribution on the probability would be ~1e-7 for every word; on the
    log-odds the deciding word still carries an attribution of order one."""
    trained = classifier("seed")
    with torch.no_grad():
        trained.model.out.bias += torch.tensor([-9.0, 9.0], dtype=torch.float64)  # push p(positive) to ~1
    reading = flow.read_sentence(trained, "the food was good")
    p = float(reading.probabilities[-1, reading.predicted])
    assert p > 1 - 1e-6
    for method in ("integrated_gradients", "grad_x_input", "occlusion"):
        assert float(reading.attribution[method].abs().max()) > 1e-3, method

