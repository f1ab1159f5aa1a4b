"""The sentence classifier, its one config dataclass, and the model directory it is saved in.

Shape letters: B batch, T time, V vocabulary ids (words + PAD + UNK), H hidden, D directions, F features,
C classes.

With ``embedding_dim`` 0 the classifier has no embedding layer: the recurrent layer takes token ids, i.e.
one-hot vectors over V, whose input projection W_ih x is a row lookup of W_ih (an embedding by another
name); with ``embedding_dim`` E it reads rows of an embedding matrix (V, E), which ``--embeddings`` can
initialise from pretrained vectors (rnnmath.embeddings)::

    x_t = ids_t, or embedding[ids_t]         # (B, T) or (B, T, E)
    output, h_n = rnn(x, lengths)            # (B, T, D·H); h_n: the state at each sentence's true last word
    last = h_n of the top layer, directions side by side                         # (B, D·H)
    pooled = max over t < length of output   # only with pooling "max" or "last+max"  (B, D·H)
    x = dropout([last | pooled])                                                 # (B, F)
    x = [x | bag]     only with ngram_dim N: the mean of the sentence's word and hashed word-bigram
                      embeddings, fastText's sentence vector (Joulin et al. 2017)  # (B, F + N)
    x = activation(W_k x + b_k) for each dense layer
    log p(class) = log_softmax(W_out x + b_out)                                  # (B, C)

Model directory (every file written atomically; nothing is ever pickled)::

    config.json        {"format": "rnnmath-config", "format_version": 1, "config": {...Config...}}
    vocab.json         {"format": "rnnmath-vocab", "format_version": 1, "words": [...]}  (PAD, UNK implied)
    labels.json        {"format": "rnnmath-labels", "format_version": 1, "labels": [...]}
    model.safetensors  the weights of the best epoch (by validation accuracy)
    history.json       per-epoch loss and validation accuracy, best epoch, test metrics (kept small: no
                       confusion matrix beyond 100 classes)
    split.json         the split record: the files read (resolved path, sha256, reader options), the
                       1-based lines of each part (train / val / test), a fingerprint of the training data
                       and the 64-bit keys of the training sentences (``data.sentence_key``), so that
                       ``evaluate --split test`` re-reads exactly the held-out part and ``evaluate`` warns
                       when evaluated sentences were trained on
    checkpoint.safetensors  the last epoch's weights, Adam state, RNG state and (in its metadata, as JSON)
                       the loop's scalars, for ``--resume``
    wide.json, wide.safetensors  with ``wide``: the wide part (rnnmath.wide), fitted after the network's
                       last epoch: n-gram features, C, λ (JSON); idf, W, b (safetensors). ``TrainedModel.predict``
                       mixes its log-probabilities with the network's:
                       log_softmax((1 − λ) log p_network + λ log p_wide)

An ensemble (``ensemble`` N > 1 in config.json) is one such directory: model.safetensors holds the N members'
weights under ``members.<k>.`` (k = 0 .. N-1; member k was trained from seed ``seed + k``), history.json their
histories under "members" and the ensemble's own validation accuracy. While it trains, member k's run lives in
``members/<k>/`` (a model directory of its own, with its checkpoint); those are removed once the ensemble's
weights are written. Probabilities are the mean of the members' (``Ensemble``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from . import Recurrent
from .cells import CELLS
from .common import json_bytes, readable
from .config import ACTIVATION_NAMES, POOLINGS, PRESETS, Config  # noqa: F401  (re-exported)
from .data import Examples, Vocabulary, atomic_write, encode, read_examples, sentence_key
from .errors import UserError
from .wide import LinearPart, Tfidf, WidePart, mix

FORMAT_VERSION = 1
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}  # the names are config.ACTIVATION_NAMES


class Classifier(nn.Module):
    """Token ids -> log-probabilities over classes; see the module docstring for the math."""

    def __init__(self, config: Config, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        E = config.embedding_dim
        self.embedding = nn.Embedding(vocab_size, E, padding_idx=0) if E else None  # (V, E)
        if self.embedding is not None and config.freeze_embeddings:
            self.embedding.weight.requires_grad_(False)
        self.rnn = Recurrent(
            CELLS[config.cell], E or vocab_size, config.hidden, num_layers=config.layers, batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0, bidirectional=config.bidirectional,
            recurrent_dropout=config.recurrent_dropout, zoneout=config.zoneout,
        )
        directions = 2 if config.bidirectional else 1
        width = directions * config.hidden * (2 if config.pooling == "last+max" else 1)  # F
        self.ngrams = None
        if config.ngram_dim:  # rows: the V words, then the bigram buckets
            self.ngrams = nn.Embedding(vocab_size + config.ngram_buckets, config.ngram_dim)
            nn.init.uniform_(self.ngrams.weight, -1 / config.ngram_dim, 1 / config.ngram_dim)  # as fastText
            width += config.ngram_dim
        self.dense = nn.ModuleList()
        for size in config.dense:
            self.dense.append(nn.Linear(width, size))
            width = size
        self.out = nn.Linear(width, num_classes)

    def features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Sentence features (B, F) from ids (B, T) and true lengths (B,); padding is never read."""
        x = ids  # (B, T) ids, or (B, T, V) one-hot rows (inspect's attributions differentiate with respect to them)
        if self.embedding is not None:
            x = self.embedding(ids) if not ids.is_floating_point() else ids @ self.embedding.weight  # (B, T, E)
        output, h_n = self.rnn(x, lengths=lengths)  # (B, T, D·H), (L·D, B, H)
        if isinstance(h_n, tuple):  # several state fields (LSTM: h, c): the first is h
            h_n = h_n[0]
        D = 2 if self.config.bidirectional else 1
        last = h_n[-D:].transpose(0, 1).reshape(ids.shape[0], -1)  # (B, D·H): top layer, at the true last word
        if self.config.pooling == "last":
            features = last
        else:
            T = output.shape[1]
            padding = torch.arange(T, device=ids.device).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)
            pooled = output.masked_fill(padding.unsqueeze(2), -math.inf).amax(dim=1)  # (B, D·H)
            pooled = pooled.masked_fill((lengths == 0).unsqueeze(1), 0.0)  # a sentence without words
            features = pooled if self.config.pooling == "max" else torch.cat([last, pooled], dim=1)
        return features

    def ngram_bag(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Mean embedding (B, N) of a sentence's words and of its hashed word bigrams, as fastText's
        supervised model reads a sentence (Joulin et al. 2017, "Bag of Tricks for Efficient Text
        Classification"). Bigram (a, b) of word ids goes to row V + (a·1000003 + b) mod buckets; an empty
        sentence gives zeros.

        ``ids`` may also be one-hot rows x (B, T, V) (scaled ones too, as on integrated gradients' path): a
        word then contributes x_t W_words, and a bigram its row times x_t[a]·x_t+1[b], the product of its
        words' entries; the two readings agree on one-hot rows."""
        W = self.ngrams.weight  # (V + buckets, N)
        V = W.shape[0] - self.config.ngram_buckets
        T = ids.shape[1]
        t = torch.arange(T, device=ids.device).unsqueeze(0)  # (1, T)
        words_valid = (t < lengths.unsqueeze(1)).to(W.dtype)  # (B, T)
        pairs_valid = words_valid[:, 1:]  # (B, T-1): bigram (t-1, t) exists iff word t does
        if ids.is_floating_point():
            x, ids = ids, ids.argmax(dim=2)  # (B, T, V), (B, T)
            entry = x.gather(2, ids.unsqueeze(2)).squeeze(2)  # (B, T)
            words = x @ W[:V]  # (B, T, N)
            pair_weight = entry[:, :-1] * entry[:, 1:]  # (B, T-1)
        else:
            words = F.embedding(ids, W)  # (B, T, N)
            pair_weight = torch.ones_like(pairs_valid)
        bigrams = V + (ids[:, :-1] * 1_000_003 + ids[:, 1:]) % self.config.ngram_buckets  # (B, T-1)
        total = (words * words_valid.unsqueeze(2)).sum(1) \
            + (F.embedding(bigrams, W) * (pairs_valid * pair_weight).unsqueeze(2)).sum(1)  # (B, N)
        count = words_valid.sum(1) + pairs_valid.sum(1)  # (B,)
        return total / count.clamp(min=1).unsqueeze(1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        x = F.dropout(self.features(ids, lengths), self.config.dropout, self.training)  # (B, F)
        if self.ngrams is not None:  # beside the dropped-out recurrent features, as fastText reads it: no dropout
            x = torch.cat([x, self.ngram_bag(ids, lengths)], dim=1)  # (B, F + N)
        for layer in self.dense:
            x = ACTIVATIONS[self.config.activation](layer(x))
        return F.log_softmax(self.out(x), dim=1)  # (B, C)

    @torch.no_grad()
    def log_probs(self, ids: Tensor, lengths: Tensor, batch_size: int = 256) -> Tensor:
        """Log-probabilities (N, C) of many sentences, in evaluation mode, a batch at a time."""
        was_training = self.training
        self.eval()
        parts = [self(*trim(ids[i : i + batch_size], lengths[i : i + batch_size]))
                 for i in range(0, len(ids), batch_size)]
        self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.out.out_features)


class Ensemble(nn.Module):
    """N classifiers of one config, member k initialised from seed ``seed + k``; the ensemble's probability
    is the mean of the members' probabilities (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive
    Uncertainty Estimation using Deep Ensembles"), returned as a log-probability like ``Classifier``'s::

        log p(class) = logsumexp_k(log p_k(class)) - log N                           # (B, C)
    """

    def __init__(self, config: Config, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(Classifier(member_config(config, k), vocab_size, num_classes)
                                     for k in range(config.ensemble))

    @property
    def out(self) -> nn.Linear:
        """The first member's output layer (log_probs reads its number of classes for an empty input)."""
        return self.members[0].out

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        log_p = torch.stack([member(ids, lengths) for member in self.members])  # (N, B, C)
        return torch.logsumexp(log_p, dim=0) - math.log(len(self.members))  # (B, C)

    log_probs = Classifier.log_probs


def member_config(config: Config, k: int) -> Config:
    """The config of member k of an ensemble: a single network from seed ``seed + k``, without the wide part
    (the ensemble has one, fitted once its members are trained)."""
    return dataclasses.replace(config, ensemble=1, seed=config.seed + k, wide=False)  # one wide part, the ensemble's


def build_model(config: Config, vocab_size: int, num_classes: int) -> Classifier | Ensemble:
    """A ``Classifier``, or an ``Ensemble`` when ``config.ensemble`` > 1."""
    if config.ensemble > 1:
        return Ensemble(config, vocab_size, num_classes)
    return Classifier(config, vocab_size, num_classes)


def trim(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the padding columns that no sentence of the batch reaches (keeping at least one): the math is
    unchanged, and the time loop gets shorter."""
    T = max(1, int(lengths.max())) if len(lengths) else 1
    return ids[:, :T], lengths


# -- the model directory -----------------------------------------------------------------------------------
CONFIG, VOCAB, LABELS, WEIGHTS, HISTORY, CHECKPOINT, SPLIT, WIDE, WIDE_WEIGHTS = (
    "config.json", "vocab.json", "labels.json", "model.safetensors", "history.json", "checkpoint.safetensors",
    "split.json", "wide.json", "wide.safetensors")
RUN_FILES = (CONFIG, VOCAB, LABELS, WEIGHTS, HISTORY, CHECKPOINT, SPLIT, WIDE, WIDE_WEIGHTS)  # what --overwrite removes
MEMBERS = "members"  # an ensemble's member runs while it trains (--overwrite removes it too)


@dataclass
class TrainedModel:
    """What evaluate and predict need, rebuilt from a model directory with no flags."""

    config: Config
    vocab: Vocabulary
    labels: list[str]
    model: Classifier | Ensemble
    wide: WidePart | None = None  # with config.wide: the TF-IDF logistic regression and its weight λ

    def predict(self, texts: list[str], weight: float | None = None) -> Tensor:
        """Probabilities (N, C) of ``texts``, columns in the order of ``labels``: the network's, mixed with the
        wide part's by ``rnnmath.wide.mix`` at the chosen λ (``weight`` overrides it: 0 is the network alone,
        1 the wide part alone)."""
        ids, lengths = encode(texts, self.vocab, self.config.max_len)
        device = self.model.out.weight.device
        log_p = self.model.log_probs(ids.to(device), lengths.to(device)).cpu()  # (N, C)
        if self.wide is not None:
            log_p = mix(log_p, self.wide.log_probs(texts), self.wide.weight if weight is None else weight)
        return log_p.exp()


def write_json(path: Path, kind: str, **content: Any) -> None:
    """Write ``{"format": "rnnmath-<kind>", "format_version": 1, ...content}`` atomically, deterministically."""
    document = {"format": f"rnnmath-{kind}", "format_version": FORMAT_VERSION, **content}
    atomic_write(path, json_bytes(document, indent=1, sort_keys=True))


def read_json(path: Path, kind: str) -> dict:
    """Read a JSON document written by ``write_json``, checking its format and version."""
    if not path.is_file():
        raise UserError(f"{path} is missing; expected a model directory written by 'rnnmath train'")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the model directory is damaged") from None
    if not isinstance(document, dict) or document.get("format") != f"rnnmath-{kind}":
        raise UserError(f"{path}: expected a JSON object with \"format\": \"rnnmath-{kind}\"")
    if document.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {document.get('format_version')!r} is not supported "
                        f"(this rnnmath reads version {FORMAT_VERSION})")
    return document


# the value a field had before it existed: a model saved then lacks the field and is rebuilt as it was trained
LEGACY = {"embedding_dim": 0, "ngram_dim": 0, "embeddings": "", "freeze_embeddings": False, "ensemble": 1,
          "wide": False}


def config_from_dict(values: Any, source: str) -> Config:
    if not isinstance(values, dict):
        raise UserError(f"{source}: \"config\" must be a JSON object")
    values = {**{k: v for k, v in LEGACY.items() if k not in values}, **values}
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown config field {unknown[0]!r}")
    try:
        return Config(**values).validate()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def save_description(directory: Path, config: Config, vocab: Vocabulary, labels: list[str]) -> None:
    """Write config.json, vocab.json and labels.json: everything but the weights and the history."""
    write_json(directory / CONFIG, "config", config=dataclasses.asdict(config))
    write_json(directory / VOCAB, "vocab", words=vocab.words[2:])
    write_json(directory / LABELS, "labels", labels=labels)


MAX_PARAMETERS = 2**30  # 4 GiB of float32 weights, about 16 GiB to train with Adam


def check_size(config: Config, vocab_size: int, num_classes: int, source: str = "") -> None:
    """A UserError if the classifier would have more than MAX_PARAMETERS parameters (counted on the meta
    device, which allocates nothing and draws no random numbers): a clear message, not an out-of-memory crash."""
    with torch.device("meta"):
        count = sum(p.numel() for p in build_model(config, vocab_size, num_classes).parameters())
    if count > MAX_PARAMETERS:
        raise UserError(f"{source + ': ' if source else ''}the model would have {count:,} parameters "
                        f"({count * 4 / 2**30:.0f} GiB of weights), more than the {MAX_PARAMETERS:,} allowed; "
                        "lower --hidden, --layers, --dense or --vocab-size")


def load_description(directory: Path) -> tuple[Config, Vocabulary, list[str]]:
    if not directory.exists():
        raise UserError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise UserError(f"{directory}: is not a directory; expected a model directory")
    config = config_from_dict(read_json(directory / CONFIG, "config").get("config"), str(directory / CONFIG))
    words = read_json(directory / VOCAB, "vocab").get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise UserError(f"{directory / VOCAB}: \"words\" must be a list of strings")
    try:
        vocab = Vocabulary(words)
    except ValueError as e:
        raise UserError(f"{directory / VOCAB}: {e}") from None
    labels = read_json(directory / LABELS, "labels").get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(y, str) for y in labels) \
            or len(set(labels)) != len(labels):
        raise UserError(f"{directory / LABELS}: \"labels\" must be a list of at least 2 distinct strings")
    check_size(config, len(vocab), len(labels), str(directory / CONFIG))
    return config, vocab, labels


def write_safetensors(path: Path, kind: str, tensors: dict[str, Tensor], **content: Any) -> None:
    """Write tensors atomically, with ``{"format": "rnnmath-<kind>", "format_version": 1, ...content}`` as
    JSON under the one metadata key "rnnmath" (one key: safetensors does not keep the order of several, and
    the file must be byte-for-byte reproducible)."""
    document = {"format": f"rnnmath-{kind}", "format_version": FORMAT_VERSION, **content,
                "sha256": tensors_sha256(tensors)}
    blob = save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()},
                            metadata={"rnnmath": json.dumps(document, sort_keys=True)})
    atomic_write(path, blob)


def read_safetensors(path: Path, kind: str) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata document of a file written by ``write_safetensors``; a UserError naming the
    file if it is missing, damaged or of another format."""
    if not path.is_file():
        raise UserError(f"{path} is missing; expected a model directory written by 'rnnmath train'")
    try:  # read here, not by safetensors' safe_open, whose Rust side takes only UTF-8 paths
        blob = path.read_bytes()
    except OSError as e:
        raise UserError(f"{readable(path)}: cannot be read ({e.strerror})") from None
    try:
        metadata = safetensors_metadata(blob)
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{readable(path)}: not a readable safetensors file ({e}); it may be truncated or "
                        "damaged") from None
    try:
        document = json.loads(metadata.get("rnnmath", ""))
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict) or document.get("format") != f"rnnmath-{kind}":
        raise UserError(f"{path}: not an rnnmath {kind} file (its metadata lacks \"format\": \"rnnmath-{kind}\")")
    if document.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {document.get('format_version')!r} is not supported "
                        f"(this rnnmath reads version {FORMAT_VERSION})")
    # files written before the checksum was added have none: they still load (it guards against damage, not
    # against a forger, who could recompute it)
    if "sha256" in document and document["sha256"] != tensors_sha256(tensors):
        raise UserError(f"{path}: the tensors do not match the checksum stored with them; the file is damaged")
    return tensors, document


def safetensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` map of a safetensors file's bytes: the format starts with the header's length
    (8 bytes, little-endian unsigned) and the header, a JSON object (https://github.com/huggingface/safetensors,
    "Format"). ValueError if the bytes do not start that way."""
    if len(blob) < 8:
        raise ValueError("shorter than the 8-byte header length")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError(f"header length {size} beyond the end of the file")
    try:
        header = json.loads(blob[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not JSON: {e}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of ``tensors``: safetensors checks only its header, so a
    flipped byte inside a weight would otherwise load silently."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_weights(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """Copy ``tensors`` into ``model``, checking names and shapes against the config's model first."""
    expected = model.state_dict()
    for name, value in expected.items():
        if name not in tensors:
            raise UserError(f"{path}: lacks the weight {name!r} that config.json's model needs")
        if tensors[name].shape != value.shape:
            raise UserError(f"{path}: weight {name!r} has shape {tuple(tensors[name].shape)}, "
                            f"but config.json's model needs {tuple(value.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{path}: holds the weight {extra[0]!r} that config.json's model does not have")
    model.load_state_dict({k: tensors[k] for k in expected})


def save_weights(directory: Path, model: nn.Module) -> None:
    write_safetensors(directory / WEIGHTS, "weights", model.state_dict())


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"auto"`` (CUDA when torch sees a GPU, else the CPU) as a
    torch.device; a UserError naming ``--device`` when CUDA is asked for but not available."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(directory: str | Path, device: str | torch.device = "cpu", with_wide: bool = True) -> TrainedModel:
    """Rebuild the trained classifier from a model directory (config, vocabulary, labels, weights, and the
    wide part where the config has one, unless ``with_wide`` is False), on ``device`` (see ``resolve_device``;
    the wide part stays on the CPU). A run whose network has not finished has no wide part yet: it loads as
    the network's best epoch so far."""
    device = resolve_device(device)
    directory = Path(directory)
    config, vocab, labels = load_description(directory)
    model = build_model(config, len(vocab), len(labels))
    path = directory / WEIGHTS
    if not path.is_file() and config.ensemble > 1 and (directory / MEMBERS).is_dir():
        raise UserError(f"{path} is missing: the {config.ensemble} members of the ensemble in {directory} have "
                        "not all finished training (see its members/); continue with --resume")
    if not path.is_file() and (directory / CONFIG).is_file():
        raise UserError(f"{path} is missing: training has not finished its first epoch in {directory}, "
                        "or the file was removed")
    tensors, _ = read_safetensors(path, "weights")
    load_weights(model, tensors, path)
    model.to(device).eval()
    wide = load_wide(directory, len(labels)) if config.wide and with_wide and not _unfinished(directory) else None
    return TrainedModel(config, vocab, labels, model, wide)


def _unfinished(directory: Path) -> bool:
    """True for a run whose network has not finished training (stopped, or still running) and whose wide part
    is therefore not there yet: it loads as the network so far, as before the wide part existed."""
    if (directory / WIDE).exists():
        return False
    history = read_json(directory / HISTORY, "history") if (directory / HISTORY).exists() else {}
    return not history.get("done")


def save_wide(directory: Path, part: WidePart, record: dict) -> None:
    """Write wide.safetensors (idf (F,) float64, W (F, C), b (C,)) and then wide.json (the F feature names in
    the order of idf's rows, C, λ, and ``record``: how they were chosen). wide.json last: it is what
    ``load_wide`` asks for first, so a run stopped between the two writes has no half wide part."""
    write_safetensors(directory / WIDE_WEIGHTS, "wide", {"idf": part.tfidf.idf, **part.linear.state_dict()},
                      features_sha256=_features_sha256(part.tfidf.features))
    write_json(directory / WIDE, "wide", features=part.tfidf.features, C=part.C, weight=part.weight,
               ngram_range=[1, 2], choice=record)


def _features_sha256(features: Sequence[str]) -> str:
    """Fingerprint of the feature names in order: which weight row each n-gram reads."""
    return hashlib.sha256(json.dumps(list(features), ensure_ascii=False).encode("utf-8")).hexdigest()


def load_wide(directory: Path, num_classes: int) -> WidePart:
    """The wide part saved by ``save_wide``; a UserError naming the file if it is missing or does not match."""
    path = directory / WIDE
    if not path.is_file():
        raise UserError(f"{path} is missing: config.json asks for the wide part (\"wide\": true), which training "
                        "writes after the network's last epoch; finish the run with --resume, or the file was removed")
    document = read_json(path, "wide")
    features, weight, C = document.get("features"), document.get("weight"), document.get("C")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features) \
            or not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1 \
            or not isinstance(C, (int, float)) or isinstance(C, bool):
        raise UserError(f"{path}: expected \"features\" (a list of strings), \"weight\" in [0, 1] and \"C\"; "
                        "the model directory is damaged")
    if not (directory / WIDE_WEIGHTS).is_file():
        raise UserError(f"{directory / WIDE_WEIGHTS} is missing: the weights of the wide part that {path} describes "
                        "(the file was removed, or only wide.json was copied); the model directory is damaged")
    tensors, meta = read_safetensors(directory / WIDE_WEIGHTS, "wide")
    if "features_sha256" in meta and meta["features_sha256"] != _features_sha256(features):
        raise UserError(f"{path}: its \"features\" are not the ones {directory / WIDE_WEIGHTS} was written with "
                        "(edited, or from another run); the model directory is damaged")
    F_, shapes = len(features), {"idf": (len(features),), "weight": (len(features), num_classes),
                                 "bias": (num_classes,)}
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise UserError(f"{directory / WIDE_WEIGHTS}: expected {name} of shape {shape} for the {F_} features "
                            f"of {path} and {num_classes} labels; the model directory is damaged")
    try:
        tfidf = Tfidf(features, tensors["idf"])
    except ValueError as e:
        raise UserError(f"{path}: {e}; the model directory is damaged") from None
    linear = LinearPart(F_, num_classes)
    linear.load_state_dict({"weight": tensors["weight"].float(), "bias": tensors["bias"].float()})
    return WidePart(tfidf, linear, float(weight), float(C))


# -- the split record --------------------------------------------------------------------------------------
PARTS = ("train", "val", "test")


def write_split_record(directory: Path, parts: dict[str, Examples], reader: dict[str, Any]) -> None:
    """Write split.json: for each part (train / val / test) its file and 1-based lines, each file's resolved
    path and sha256, the reader options (``read_examples``'s keyword arguments), the fingerprint of the
    training texts and labels, and the sorted keys of the training sentences."""
    files: dict[str, dict] = {}
    record: dict[str, Any] = {}
    for name, examples in parts.items():
        source = examples.source
        if source not in files:
            path = Path(source)
            files[source] = {"path": str(path.resolve()),
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None}
        record[name] = {"file": source, "lines": list(examples.lines), "n": len(examples)}
    train = parts["train"]
    keys = sorted({k for k in map(sentence_key, train.texts) if k is not None})
    document = {"format": "rnnmath-split", "format_version": FORMAT_VERSION, "parts": record, "files": files,
                "reader": reader, "train_keys": keys,
                "fingerprint": hashlib.sha256(json.dumps([train.texts, train.labels]).encode()).hexdigest()}
    # compact, unlike the other JSON files: its lists grow with the data (about 25 bytes a training sentence)
    atomic_write(directory / SPLIT, json_bytes(document, sort_keys=True, separators=(",", ":")))


def read_split_record(directory: str | Path) -> dict | None:
    """split.json of a model directory as written by ``write_split_record``; None if the directory has none
    (a model trained before it existed). A damaged file is a UserError naming it."""
    path = Path(directory) / SPLIT
    if not path.exists():
        return None
    document = read_json(path, "split")
    parts, files = document.get("parts"), document.get("files")
    if not isinstance(parts, dict) or not isinstance(files, dict) or not isinstance(document.get("train_keys"), list) \
            or not isinstance(document.get("reader"), dict):
        raise UserError(f"{path}: expected \"parts\", \"files\", \"reader\" and \"train_keys\"; the model "
                        "directory is damaged")
    return document


def training_overlap(record: dict, texts: Sequence[str]) -> int:
    """How many of ``texts`` have the key of a training sentence (same tokens; see ``data.sentence_key``)."""
    keys = set(record["train_keys"])
    return sum(1 for text in texts if sentence_key(text) in keys)


def repeated_sentences(record: dict, part: str) -> tuple[str, int]:
    """The file that ``part`` of a run came from, and how many of its sentences repeat an earlier one of it
    (same key, see ``data.sentence_key``): the copies that a split can put on both sides of it."""
    file = record["files"].get(record["parts"][part]["file"], {})
    path = file.get("path", "")
    examples = read_examples(path, **record["reader"])
    keys = [k for k in map(sentence_key, examples.texts) if k is not None]
    return path, len(keys) - len(set(keys))


def held_out(directory: str | Path, part: str = "test") -> Examples:
    """Re-read exactly the ``part`` (train / val / test) of the run in ``directory`` from its original file,
    with the reader options of the run. UserError if the directory has no split record, the file is gone or
    its bytes changed since training (sha256), or a recorded line is no longer a record."""
    directory = Path(directory)
    record = read_split_record(directory)
    if record is None:
        raise UserError(f"{directory} has no {SPLIT} (trained by an older rnnmath); evaluate with --data FILE")
    entry = record["parts"].get(part)
    if not isinstance(entry, dict):
        raise UserError(f"{directory / SPLIT}: the run has no {part} part")
    file = record["files"].get(entry.get("file"), {})
    path = Path(file.get("path", ""))
    if not path.is_file():
        raise UserError(f"{path}: the {part} data of {directory} is no longer there; evaluate with --data FILE")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != file.get("sha256"):
        raise UserError(f"{path} changed since {directory} was trained (sha256 {digest[:12]}..., recorded "
                        f"{str(file.get('sha256'))[:12]}...); its {part} part cannot be recovered")
    examples = read_examples(path, **record["reader"])
    wanted = set(entry["lines"])
    chosen = [i for i, line in enumerate(examples.lines) if line in wanted]
    if len(chosen) != len(wanted):
        raise UserError(f"{path}: {len(wanted) - len(chosen)} recorded {part} line(s) are no longer records")
    subset = examples.subset(chosen)
    subset.notes = examples.notes
    return subset

