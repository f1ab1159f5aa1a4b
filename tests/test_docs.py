"""The worked example of docs/cells.md runs as written and computes the equations it states."""

import re
from pathlib import Path

import pytest
import torch

import rnnmath

DOC = Path(__file__).resolve().parents[1] / "docs" / "cells.md"


def worked_example() -> str:
    text = DOC.read_text()
    section = text[text.index("## A worked example"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "docs/cells.md lost its worked example"
    return blocks[0]


@pytest.fixture
def example(monkeypatch):
    """Run the doc's code block in a fresh namespace; its registration in CELLS is undone afterwards."""
    monkeypatch.setattr(rnnmath, "CELLS", dict(rnnmath.CELLS))
    namespace: dict = {}
    exec(compile(worked_example(), str(DOC), "exec"), namespace)
    return namespace


def cifg_reference(P, xs, h, c):
    """The doc's equations, one step at a time, gate rows sliced by hand: f | g | o, input gate 1 − f."""
    H = h.shape[1]
    hs = []
    for x in xs:
        pre = x @ P["weight_ih"].T + P["bias_ih"] + h @ P["weight_hh"].T + P["bias_hh"]
        f, g, o = torch.sigmoid(pre[:, :H]), torch.tanh(pre[:, H:2 * H]), torch.sigmoid(pre[:, 2 * H:])
        c = f * c + (1 - f) * g
        h = o * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs), h, c


def test_worked_example_runs_and_registers(example):
    assert rnnmath.CELLS["cifg_lstm"] is example["CIFGLSTMCell"]
    B, T = example["x"].shape[:2]
    assert example["output"].shape == (B, T, 32)
    assert example["forget_gate"].shape == (T, B, 16)
    assert example["forget_gate"][:, 3].isnan().all()  # length 0: nothing computed, nothing shown


def test_worked_example_computes_its_equations(example):
    torch.manual_seed(0)
    layer = rnnmath.Recurrent(example["CIFGLSTMCell"], 3, 5, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 4])
    output, (h_n, c_n) = layer(x, lengths=lengths)
    loss = output.square().sum() + h_n.sum() + c_n.sum()
    want_loss = 0
    for b, n in enumerate(lengths.tolist()):
        zero = torch.zeros(1, 5, dtype=torch.float64)
        for d in range(2):
            xs = x[:n, b:b + 1] if d == 0 else x[:n, b:b + 1].flip(0)
            hs, h, c = cifg_reference(layer.layer_params(0, d), xs, zero, zero)
            hs = hs if d == 0 else hs.flip(0)
            torch.testing.assert_close(output[:n, b:b + 1, 5 * d:5 * (d + 1)], hs)
            torch.testing.assert_close(h_n[d, b], h[0])
            torch.testing.assert_close(c_n[d, b], c[0])
            want_loss = want_loss + hs.square().sum() + h.sum() + c.sum()
    inputs = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want_loss, inputs)):
        torch.testing.assert_close(got, want)
