"""Figures and the self-contained HTML report. Plotting only reads plain tensors, lists and dicts.

Every function returns a ``matplotlib.figure.Figure`` drawn with the Agg renderer (no display, no pyplot
state). Time runs left to right with the sentence's words on the axis; ``tokens`` may be None for
sequences without words (the axis then counts steps from 1).

Shape letters: T time, H hidden units, C classes.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.text

matplotlib.use("Agg")  # before anything imports pyplot: files only, never a window

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from .common import readable  # noqa: E402
from .data import atomic_write  # noqa: E402
from .errors import UserError  # noqa: E402

MAX_UNITS = 32  # more rows than this in a heatmap are no longer readable: show the units that vary most
SIGMOID_GATES = ("i", "f", "o", "r", "z")  # gates in [0, 1]; others (g, n, h, c) are shown symmetric about 0


def _array(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, Tensor) else np.asarray(t, dtype=float)


def _width(T: int) -> float:
    """Figure width in inches: room for each word's label, within sensible bounds."""
    return min(max(7.5, 0.32 * T + 2.5), 30.0)


def _time_axis(ax, T: int, tokens: Sequence[str] | None) -> None:
    """Words (or step numbers) on the x axis, rotated so neighbours never overlap."""
    if tokens is None:
        step = max(1, T // 10)
        ax.set_xticks(range(0, T, step), [str(t + 1) for t in range(0, T, step)])
        ax.set_xlabel("time step")
        return
    ax.set_xticks(range(T), list(tokens), rotation=60 if T > 6 else 0, ha="right" if T > 6 else "center",
                  fontsize=9 if T <= 40 else 7)
    ax.tick_params(axis="x", length=2)


def top_variance_units(values: Tensor, k: int = MAX_UNITS) -> list[int]:
    """Indices (ascending) of the k units of values (T, H) whose activation varies most over time."""
    a = _array(values)
    H = a.shape[1]
    if H <= k:
        return list(range(H))
    variance = np.nan_to_num(np.nanvar(a, axis=0), nan=-1.0)  # (H,)
    return sorted(np.argsort(-variance, kind="stable")[:k].tolist())


def _heatmap(ax, values: np.ndarray, units: list[int], name: str, fig: Figure) -> None:
    """One time × units panel of values (T, H), rows = `units`."""
    a = values[:, units].T  # (units, T)
    if name in SIGMOID_GATES:
        vmin, vmax, cmap = 0.0, 1.0, "viridis"
    else:
        bound = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0
        bound = max(bound, 1e-6)
        vmin, vmax, cmap = -bound, bound, "RdBu_r"
    image = ax.imshow(a, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    n = len(units)
    step = 1 if n <= 16 else 2 if n <= 32 else max(1, n // 16)
    ax.set_yticks(range(0, n, step), [str(u) for u in units[::step]], fontsize=7 if n > 16 else 8)
    ax.set_ylabel("unit")
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)


def _unit_note(units: list[int], H: int) -> str:
    return f"all {H} units" if len(units) == H else f"the {len(units)} of {H} units that vary most over time"


def state_heatmaps(states: dict[str, Tensor], tokens: Sequence[str] | None, name: str = "h",
                   max_units: int = MAX_UNITS) -> Figure:
    """Hidden state over time: one time × units heatmap per layer and direction.

    ``states`` maps a label ('layer 1 forward') to values (T, H). For H > max_units the panel shows the
    max_units units of highest variance over time, and its title says so."""
    labels = list(states)
    T = _array(states[labels[0]]).shape[0]
    heights = [min(len(top_variance_units(states[k], max_units)), max_units) for k in labels]
    fig = Figure(figsize=(_width(T), sum(1.2 + 0.14 * h for h in heights) + 1.2), layout="constrained")
    axes = fig.subplots(len(labels), 1, squeeze=False, height_ratios=[1 + 0.12 * h for h in heights])[:, 0]
    for ax, label in zip(axes, labels):
        a = _array(states[label])  # (T, H)
        units = top_variance_units(states[label], max_units)
        _heatmap(ax, a, units, name, fig)
        ax.set_title(f"{name}, {label}: {_unit_note(units, a.shape[1])}", fontsize=10, loc="left")
        _time_axis(ax, T, tokens)
    fig.suptitle(f"hidden state {name}_t after each word", fontsize=12)
    return fig


def gate_heatmaps(gates: dict[str, Tensor], tokens: Sequence[str] | None, title: str,
                  units: list[int] | None = None, max_units: int = MAX_UNITS) -> Figure:
    """Each recorded gate (and extra state field such as the LSTM's c) over time, one panel per name.

    ``gates`` maps a name ('i', 'f', 'g', 'o', 'c') to values (T, H). ``units`` selects the rows, the same in
    every panel so that a unit's gates line up (default: the units of highest variance of the first gate).
    Gates in [0, 1] (σ) use one colour scale from 0 to 1; the others are centred on 0."""
    names = list(gates)
    first = _array(gates[names[0]])
    T, H = first.shape
    units = units if units is not None else top_variance_units(gates[names[0]], max_units)
    per_panel = 1.0 + 0.09 * len(units)
    fig = Figure(figsize=(_width(T), per_panel * len(names) + 1.0), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False, sharex=True)[:, 0]
    for ax, name in zip(axes, names):
        _heatmap(ax, _array(gates[name]), units, name, fig)
        ax.set_title(name, fontsize=10, loc="left")
    _time_axis(axes[-1], T, tokens)
    fig.suptitle(f"{title}\n{_unit_note(units, H)}", fontsize=11)
    return fig


def class_probabilities(probabilities: Tensor, tokens: Sequence[str] | None, labels: Sequence[str]) -> Figure:
    """p(class) after each word (T, C): one line per class."""
    p = _array(probabilities)
    T, C = p.shape
    fig = Figure(figsize=(_width(T), 3.6), layout="constrained")
    ax = fig.subplots()
    for c in range(C):
        ax.plot(range(T), p[:, c], marker="o", markersize=4, label=labels[c])
    if C == 2:
        ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("probability")
    ax.set_title("prediction after each word (the sentence read up to that word)", fontsize=11, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    _time_axis(ax, T, tokens)
    return fig


def _log_curves(ax, curves: dict[str, Tensor], ylabel: str, start: int = 0) -> None:
    for label, values in curves.items():
        v = _array(values)
        v = np.where(v > 0, v, np.nan)  # log scale: exact zeros (no path) are left out, not drawn at -inf
        ax.plot(range(start, start + len(v)), v, marker="o" if len(v) <= 60 else None, markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False, loc="best")


def gradient_norms(grad: dict[str, Tensor], tokens: Sequence[str] | None,
                   jacobian: dict[str, Tensor] | None = None, title: str = "") -> Figure:
    """‖∂L/∂h_t‖ over t (log scale), one line per label; with ``jacobian``, a second panel ‖∂h_T/∂h_t‖_F."""
    T = len(_array(next(iter(grad.values()))))
    panels = 2 if jacobian else 1
    fig = Figure(figsize=(_width(T), 3.2 * panels + 0.6), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    _log_curves(axes[0], grad, "‖∂L/∂h_t‖")
    axes[0].set_title(title or "gradient of the loss reaching each step's state (log scale)", fontsize=11,
                      loc="left")
    if jacobian:
        _log_curves(axes[1], jacobian, "‖∂h_T/∂h_t‖ (Frobenius)")
        axes[1].set_title("how much the final state depends on each step's state (log scale)", fontsize=11,
                          loc="left")
    _time_axis(axes[-1], T, tokens)
    return fig


def attribution(values: dict[str, Tensor], tokens: Sequence[str], target: str) -> Figure:
    """Per-word attribution as bars, one panel per method; green supports ``target``, red speaks against."""
    T = len(tokens)
    methods = list(values)
    fig = Figure(figsize=(_width(T), 2.8 * len(methods) + 0.8), layout="constrained")
    axes = fig.subplots(len(methods), 1, squeeze=False, sharex=True)[:, 0]
    captions = {"integrated_gradients": "integrated gradients of the log-odds F, from the all-zero input",
                "grad_x_input": "gradient × input: ∂F / ∂x_t at the word's id",
                "occlusion": "occlusion: F − F(word replaced by UNK)"}
    for ax, method in zip(axes, methods):
        v = _array(values[method])
        ax.bar(range(T), v, color=["#2a9d4b" if x >= 0 else "#d1495b" for x in v], width=0.7)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_title(captions.get(method, method), fontsize=10, loc="left")
        ax.grid(alpha=0.3, axis="y")
    _time_axis(axes[-1], T, tokens)
    fig.suptitle(f"each word's part in the log-odds F of '{target}': green for, red against", fontsize=12)
    return fig


def vanishing_figure(curves: dict[str, Tensor], title: str) -> Figure:
    """‖∂L/∂h_t‖ over t per cell kind (log scale), for ``rnnmath flow``."""
    T = len(_array(next(iter(curves.values()))))
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    _log_curves(ax, curves, "‖∂L/∂h_t‖ (mean over sequences)", start=1)
    ax.set_xlabel(f"time step t (the loss reads h_T, T = {T})")
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlim(0, T + 1)
    return fig


# -- files and the report ------------------------------------------------------------------------------------
# Fonts tried after DejaVu Sans (matplotlib's own, which covers Latin, Greek, Cyrillic, Hebrew and some
# Arabic) for the words of a sentence: matplotlib >= 3.6 falls back from one family to the next glyph by glyph.
# Those installed are used; where none covers a script, its words show as boxes in the PNGs (the HTML page
# writes the sentence as text, which the browser shows with its own fonts).
FALLBACK_FONTS = ("Noto Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Noto Sans Arabic",
                  "Noto Sans Devanagari", "Noto Sans Thai", "Noto Sans Hebrew", "WenQuanYi Zen Hei",
                  "Droid Sans Fallback", "Source Han Sans", "Arial Unicode MS")


@functools.cache
def font_families() -> list[str]:
    """DejaVu Sans, then the installed ones of ``FALLBACK_FONTS``."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, its text in ``font_families()``; a glyph no installed font has is drawn as a
    box without matplotlib's warning for each one (a sentence in another script would flood standard
    error)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": font_families()}):
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from")
        warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support")
        for text in fig.findobj(matplotlib.text.Text):
            text.set_fontfamily(font_families())
        fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_report(out_dir: str | Path, title: str, figures: list[tuple[str, str, Figure]],
                 intro_html: str = "") -> Path:
    """Write each figure as ``out_dir/<name>.png`` and ``out_dir/report.html`` holding them all.

    ``figures`` is a list of (file name without .png, caption, figure). The page is self-contained: the PNGs
    are embedded as base64 data URIs and nothing outside it is referenced, so it opens offline. Every file
    is written atomically (a temporary file, then os.replace). Returns the report's path."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a read-only or impossible place: the user's --out to change
        why = "a file of that name exists; expected a directory" if isinstance(e, FileExistsError) else e.strerror
        raise UserError(f"--out {readable(out_dir)}: cannot be written ({why})") from None
    sections = []
    for name, caption, fig in figures:
        data = png_bytes(fig)
        atomic_write(out_dir / f"{name}.png", data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        sections.append(f'<figure id="{html.escape(name)}"><img src="{uri}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em; color: #222; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.9em; }} table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }}
.answer {{ font-size: 1.3em; }} .sentence {{ font-size: 1.6em; line-height: 1.8; }}
.word {{ padding: 0 3px; border-radius: 3px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{intro_html}
{chr(10).join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write(path, readable(page).encode("utf-8"))  # a non-UTF-8 byte of a path shows as \xe9
    return path


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A small HTML table; floats with 3 significant digits."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def reading_figures(reading) -> list[tuple[str, str, Figure]]:
    """The report's figures for a :class:`rnnmath.flow.Reading` (read as plain tensors and dicts)."""
    tokens = [w + ("*" if unk else "") for w, unk in zip(reading.tokens, reading.unknown)]
    target = reading.labels[reading.predicted]
    figures = [
        ("probabilities", "Class probabilities after each word (* marks a word outside the vocabulary, read as UNK).",
         class_probabilities(reading.probabilities, tokens, reading.labels)),
        ("states", "Hidden state h_t of every layer and direction, time × units.",
         state_heatmaps({k: v["h"] for k, v in reading.states.items()}, tokens)),
    ]
    for i, (key, values) in enumerate(reading.states.items()):
        gates = {name: v for name, v in values.items() if name != "h"}
        if gates:
            units = top_variance_units(values["h"])
            figures.append((f"gates_{i + 1}", f"Gates (and cell state) of {key}, the units of the state heatmap.",
                            gate_heatmaps(gates, tokens, f"{reading.cell.upper()} gates, {key}", units)))
    figures.append(("gradients", "Gradient of L = −log p(predicted class) with respect to each step's state, "
                    "and the norm of ∂h_T/∂h_t, on a log scale.",
                    gradient_norms(reading.grad_norm, tokens, reading.jacobian_norm or None)))
    figures.append(("attribution", f"Per-word attribution for the predicted class '{target}'.",
                    attribution(reading.attribution, tokens, target)))
    return figures


def coloured_sentence(tokens: Sequence[str], values: Sequence[float], unknown: Sequence[bool]) -> str:
    """The words as HTML spans, green where a word supports the prediction and red where it speaks against,
    the colour's strength proportional to |value| / max |value|; each span's title holds the value."""
    scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0) or 1.0
    spans = []
    for word, v, unk in zip(tokens, values, unknown):
        strength = min(1.0, abs(v) / scale) if math.isfinite(v) else 0.0
        rgb = (42, 157, 75) if v >= 0 else (209, 73, 91)
        label = html.escape(word + ("*" if unk else ""))
        spans.append(f'<span class="word" style="background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, '
                     f'{0.85 * strength:.2f})" title="{v:+.3f}">{label}</span>')
    return " ".join(spans)


def write_reading_report(reading, out_dir: str | Path, model: dict | None = None) -> Path:
    """report.html and the PNGs for one sentence read by the classifier (a :class:`rnnmath.flow.Reading`).

    The page answers first: the predicted label and its probability, then the sentence with each word coloured
    by its integrated-gradients attribution on the log-odds of that label; then the model (``model``: its
    ``directory``, ``cell``, ``test_accuracy``, any may be missing) and the label names; then the per-word
    table (probabilities to 3 decimals, attributions signed to 3 decimals) and the figures."""
    model = model or {}
    p = reading.probabilities[-1]
    predicted = reading.labels[reading.predicted]
    ig = [float(v) for v in reading.attribution["integrated_gradients"]]
    accuracy = model.get("test_accuracy")
    facts = [f"model <code>{html.escape(str(model['directory']))}</code>" if model.get("directory") else None,
             f"cell {html.escape(reading.cell.upper())}",
             f"test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else "test accuracy not recorded",
             "labels " + ", ".join(f"<b>{html.escape(y)}</b>" for y in reading.labels)]
    intro = (
        f'<p class="answer">Prediction: <b>{html.escape(predicted)}</b>, probability '
        f"{float(p[reading.predicted]):.3f}, log-odds {reading.log_odds:+.3f}.</p>"
        f'<p class="sentence">{coloured_sentence(reading.tokens, ig, reading.unknown)}</p>'
        f"<p>Green words support <b>{html.escape(predicted)}</b>, red ones speak against it: integrated gradients "
        f"of the log-odds of {html.escape(predicted)} (log p − log(1 − p)), which sum to its change from the "
        f"all-zero input ({reading.baseline_log_odds:+.3f}) to the sentence ({reading.log_odds:+.3f}). Hover a "
        "word for its value; * marks a word outside the vocabulary, read as UNK.</p>"
        f"<p>{'; '.join(f for f in facts if f)}.</p>"
        + html_table(["word", *[f"p({y})" for y in reading.labels], "integrated gradients", "gradient × input",
                      "occlusion"],
                     [[w, *[f"{float(x):.3f}" for x in reading.probabilities[t]],
                       *[f"{float(reading.attribution[m][t]):+.3f}" for m in
                         ("integrated_gradients", "grad_x_input", "occlusion")]]
                      for t, w in enumerate(reading.tokens)])
        + "<p>Probabilities are after each word: what the model would answer had the sentence ended there.</p>"
    )
    return write_report(out_dir, f"rnnmath inspect: why '{predicted}'", reading_figures(reading), intro)


def write_flow_report(results, out_dir: str | Path, steps: int, forget_bias: float = 0.0) -> Path:
    """report.html, flow.png (untrained) and flow_trained.png (when trained) for ``rnnmath flow``; ``results``
    is the list of :class:`rnnmath.flow.CellFlow` from :func:`rnnmath.flow.vanishing_gradients`."""
    init = "torch.nn's default initialisation" + (f", LSTM forget bias +{forget_bias:g}" if forget_bias else "")
    figures = []
    for trained, name in [(False, "flow"), (True, "flow_trained")]:
        curves = {r.cell: r.norms for r in results if r.trained == trained}
        if curves:
            state = "after training on the adding problem" if trained else f"untrained ({init})"
            figures.append((name, f"‖∂L/∂h_t‖ over t, {state}; L reads the last state of {steps} steps.",
                            vanishing_figure(curves, f"gradient through time, {state}")))
    rows = [[r.cell, "trained" if r.trained else "untrained", r.ratio, r.mse, f"{r.seconds:.1f} s"]
            for r in results]
    intro = ("<p>The same adding-problem sequences for every cell kind. A tanh RNN multiplies the gradient by "
             "diag(tanh′) W_hh at every step back; an LSTM also passes it along the cell, multiplied only by the "
             "forget gate.</p>" + html_table(["cell", "weights", "‖∂L/∂h_1‖ / ‖∂L/∂h_T‖", "test MSE", "training"],
                                             rows))
    return write_report(out_dir, f"rnnmath flow: vanishing gradients over {steps} steps", figures, intro)
