"""Export a trained classifier to ONNX, to run it outside Python: ``rnnmath export DIR --format onnx --out FILE``.

Needs the ``export`` extra (``pip install rnnmath[export]``: onnx, onnxscript, onnxruntime). The graph::

    inputs   ids        int64 (B, T)   token ids: PAD 0, UNK 1, word k of the vocabulary file k + 2
             lengths    int64 (B,)     true number of words of each row, 0 <= length <= T
    output   probabilities  float32 (B, C)   column c is labels[c]

B and T are dynamic: any batch size and any padded length (up to the model's ``max_len`` words are what
training saw; ``rnnmath predict`` cuts a sentence there). The recurrent layers become ONNX ``Scan`` nodes
(:mod:`rnnmath.scan_op`). Beside FILE go ``<FILE without .onnx>.vocab.json`` (the words, ``max_len`` and
the tokenizer rule) and ``<...>.labels.json``; the graph's metadata holds the labels too.

To tokenise outside Python, apply the tokenizer rule of ``rnnmath.data.tokenize`` (README, "Tokenizer"), map
each token to its id (unknown words to UNK = 1), keep the first ``max_len`` ids, pad rows with 0, and pass
the true lengths; docs/serving.md shows it in a few lines.

Before returning, :func:`export_onnx` runs the written file in onnxruntime at several (B, T), lengths 0
included, and compares it with the PyTorch model: a difference above 1e-5 is an error, not a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import atomic_write
from .errors import UserError
from .model import TrainedModel, load_model, write_json
from .wide import mix

TOLERANCE = 1e-5
CHECK_SHAPES = ((1, 1), (3, 7), (17, None))  # (B, T); None: the model's max_len


class Probabilities(nn.Module):
    """The classifier with the graph's contract: (ids (B, T), lengths (B,)) -> probabilities (B, C); with a
    wide part also (grams (B, K), gram_weights (B, K)), each sentence's TF-IDF entries padded with weight 0,
    whose logistic regression is mixed in as ``rnnmath.wide.mix`` does."""

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__()
        self.classifier = trained.model
        self.linear = trained.wide.linear if trained.wide is not None else None
        self.weight = trained.wide.weight if trained.wide is not None else 0.0  # λ

    def forward(self, ids: Tensor, lengths: Tensor, grams: Tensor | None = None,
                gram_weights: Tensor | None = None) -> Tensor:
        log_p = self.classifier(ids, lengths)  # (B, C)
        if self.linear is not None:
            z = (self.linear.weight[grams] * gram_weights.unsqueeze(2)).sum(1) + self.linear.bias  # (B, C)
            log_p = mix(log_p, torch.log_softmax(z, dim=1), self.weight)
        return log_p.exp()


@dataclass
class Exported:
    onnx: Path
    vocab: Path
    labels: Path
    wide: Path | None  # the wide part's features and idf, for a model that has one
    max_difference: float  # largest |onnxruntime - torch| over the checked shapes
    checked: str  # the shapes checked, in words


def sidecar_paths(out: Path) -> tuple[Path, Path, Path]:
    """``model.onnx`` -> ``model.vocab.json``, ``model.labels.json``, ``model.wide.json``."""
    stem = out.with_suffix("") if out.suffix == ".onnx" else out
    return tuple(stem.with_name(stem.name + suffix) for suffix in (".vocab.json", ".labels.json", ".wide.json"))


def wide_inputs(rows: list[list[tuple[int, float]]]) -> tuple[Tensor, Tensor]:
    """The graph's (grams (B, K) int64, gram_weights (B, K) float32) from each sentence's (feature, weight)
    pairs, padded with (0, 0.0) to the longest row (K >= 1)."""
    K = max([1, *map(len, rows)])
    grams = torch.zeros(len(rows), K, dtype=torch.long)
    weights = torch.zeros(len(rows), K)
    for r, row in enumerate(rows):
        for k, (j, w) in enumerate(row):
            grams[r, k], weights[r, k] = j, w
    return grams, weights


def export_program(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names):
    """``torch.onnx.export`` through torch.export (dynamo=True), under ``torch.no_grad()`` (an inference graph:
    with gradients on, torch's scan operator also traces a backward, which fails for ops such as the
    LayerNorm-LSTM's var), quietly: its progress lines and warnings are not the user's business. Returns the
    ONNXProgram."""
    logger = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms", ...
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     input_names=input_names, output_names=output_names, verbose=False)
    finally:
        logger.setLevel(level)


def export_onnx(directory: str | Path, out: str | Path, check: bool = True) -> Exported:
    """Write the classifier of model directory ``directory`` as ONNX to ``out``, with its vocabulary and labels
    beside it (see the module docstring). Every file is written atomically.

    Raises UserError for a bad model directory (a language model's too) or an ``out`` that cannot be
    written; RuntimeError if onnxruntime's probabilities differ from the model's by more than 1e-5 (nothing
    is then left at ``out``).
    """
    with contextlib.suppress(OSError, ValueError):
        document = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
        if isinstance(document, dict) and document.get("task") == "lm":
            raise UserError(f"{directory} holds a language model; ONNX export is for classifiers (serve a "
                            "language model with 'rnnmath serve', sample it with 'rnnmath generate')")
    trained = load_model(directory)
    out = Path(out)
    vocab_path, labels_path, wide_path = sidecar_paths(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    module = Probabilities(trained).eval()
    B, T, K = torch.export.Dim("batch"), torch.export.Dim("time"), torch.export.Dim("grams")
    example = (torch.tensor([[2, 3, 4, 5, 6], [2, 1, 0, 0, 0], [0, 0, 0, 0, 0]]) % len(trained.vocab),
               torch.tensor([5, 2, 0]))
    shapes, names = {"ids": {0: B, 1: T}, "lengths": {0: B}}, ["ids", "lengths"]
    if trained.wide is not None:
        F_ = len(trained.wide.tfidf)
        example += wide_inputs([[(0, 0.6), (1 % F_, 0.8)], [(2 % F_, 1.0)], []])
        shapes |= {"grams": {0: B, 1: K}, "gram_weights": {0: B, 1: K}}
        names += ["grams", "gram_weights"]
    program = export_program(module, example, shapes, names, ["probabilities"])
    proto = program.model_proto
    for key, value in (("rnnmath.labels", json.dumps(trained.labels)), ("rnnmath.max_len", str(trained.config.max_len)),
                       ("rnnmath.cell", trained.config.cell)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    blob = proto.SerializeToString()
    max_difference, checked = 0.0, "no shapes (check=False)"
    if check:
        max_difference, checked = check_onnx(blob, trained)
        if not max_difference <= TOLERANCE:
            raise RuntimeError(f"onnxruntime's probabilities differ from the model's by {max_difference:.3g} "
                               f"(more than {TOLERANCE}) on {checked}; nothing was written")
    try:
        atomic_write(out, blob)
        write_json(vocab_path, "onnx-vocab", words=trained.vocab.words[2:], first_word_id=2, pad_id=0, unk_id=1,
                   max_len=trained.config.max_len,
                   tokenizer="rnnmath.data.tokenize: see the README section 'Tokenizer' for the rule")
        write_json(labels_path, "onnx-labels", labels=trained.labels)
        if trained.wide is not None:
            write_json(wide_path, "onnx-wide", features=trained.wide.tfidf.features,
                       idf=trained.wide.tfidf.idf.tolist(), rule=WIDE_RULE)
    except OSError as e:
        raise UserError(f"--out {out}: cannot be written ({e.strerror})") from None
    return Exported(out, vocab_path, labels_path, wide_path if trained.wide is not None else None,
                    max_difference, checked)


WIDE_RULE = ("grams: the tokens of the whole sentence (rnnmath.data.tokenize, no max_len cut), then its word "
             "bigrams joined by one space; keep those in features (row j = features[j]); weight of gram j = (1 + "
             "ln count) * idf[j], then divide by the L2 norm of the sentence's weights; pass them as the graph's "
             "grams (B, K) and gram_weights (B, K), padded with 0 and weight 0.0")


def check_onnx(model: bytes | str | Path, trained: TrainedModel, shapes=CHECK_SHAPES,
               seed: int = 0) -> tuple[float, str]:
    """Largest |onnxruntime − torch| of the probabilities over random ids at each (B, T) of ``shapes``
    (lengths random in [0, T], one row of full length); and the shapes, in words."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model),
                                           providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst, names = 0.0, []
    for B, T in shapes:
        T = T or trained.config.max_len
        ids = torch.randint(0, len(trained.vocab), (B, T), generator=generator)
        lengths = torch.randint(0, T + 1, (B,), generator=generator)
        lengths[0] = T
        ids = ids.masked_fill(torch.arange(T) >= lengths.unsqueeze(1), 0)  # PAD past each length
        inputs = {"ids": ids, "lengths": lengths}
        if trained.wide is not None:  # each row: up to 6 distinct features, random weights, normalised
            F_ = len(trained.wide.tfidf)
            rows = []
            for _ in range(B):
                chosen = torch.randperm(F_, generator=generator)[: int(torch.randint(0, 7, (), generator=generator))]
                w = torch.rand(len(chosen), generator=generator)
                rows.append(list(zip(chosen.tolist(), (w / w.norm().clamp(min=1e-12)).tolist())))
            inputs["grams"], inputs["gram_weights"] = wide_inputs(rows)
        with torch.no_grad():
            expected = Probabilities(trained)(**inputs).numpy()
        (got,) = session.run(["probabilities"], {k: v.numpy() for k, v in inputs.items()})
        difference = float(abs(got - expected).max())
        if math.isnan(difference) or difference > worst:  # a NaN stays the worst
            worst = difference
        names.append(f"B={B} T={T}")
    return worst, ", ".join(names)
