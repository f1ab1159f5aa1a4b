"""Language models of characters or words, trained with truncated backpropagation through time (TBPTT).

A tool built on the library's layers. Shape letters: N tokens of the text, B parallel streams, T steps of one
window, E embedding, H hidden, L layers, V vocabulary (tokens + UNK).

The model (:class:`LanguageModel`), for token ids x (T, B)::

    e = dropout(embedding[x])              # (T, B, E); with embedding 0, x goes in as one-hot vectors over V
    h, state = rnn(e, state)               # (T, B, H): any rnnmath cell, L layers, dropout between them
    logits = decoder(dropout(h))           # (T, B, V); with weight tying decoder.weight is embedding.weight
    loss = cross_entropy(logits, next tokens)      # nats per token

Training (:func:`train_lm`) is that of Zaremba, Sutskever & Vinyals (2014, "Recurrent Neural Network
Regularization", and their code) and of Karpathy's char-rnn (2015): the training text is one stream of ids cut
into B parallel streams (:func:`tbptt_batches`); each step reads the next window of T steps of every stream,
starting from the state the previous window ended in, detached so that gradients stop at the window's start
(truncated BPTT); the state is reset to zeros at the start of each epoch. Evaluation (:func:`evaluate`) reads
a whole text as one stream (B = 1), carrying the state from window to window, so its loss is exactly that of
one pass over the text.

Model directory (every file written atomically; nothing pickled)::

    config.json        {"format": "rnnmath-config", "format_version": 1, "task": "lm", "config": {...LMConfig}}
    vocab.json         {"format": "rnnmath-lm-vocab", ..., "level": "char"|"word", "tokens": [...], "unk": i}
    model.safetensors  the weights with the best validation loss (without --val: the last)
    history.json       every evaluation: epoch, window, training and validation loss (nats/token)
    checkpoint.safetensors  weights, optimizer state, RNG state and the carried state, for --resume
    timing.json        wall time and tokens/s of every evaluation (not reproducible; the others are)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import CELLS, Recurrent, compiled
from .errors import UserError
from .lm_config import LM_PRESETS, LMConfig  # noqa: F401  (LM_PRESETS re-exported: part of this API)
from .model import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    MAX_PARAMETERS,
    RUN_FILES,
    VOCAB,
    WEIGHTS,
    load_weights,
    read_json,
    read_safetensors,
    resolve_device,
    write_json,
    write_safetensors,
)
from .train import Interrupted, _StopOnCtrlC

TASK = "lm"
TIMING = "timing.json"
UNK = "<unk>"  # PTB's own unknown-word token; at character level an extra symbol no character can be
EOS = "<eos>"  # word level: the end of each line (Zaremba et al.'s reader)


# -- tokens ------------------------------------------------------------------------------------------------
def tokenize(text: str, level: str) -> list[str]:
    """Characters, or words split on white space with ``<eos>`` at the end of every line."""
    if level == "char":
        return list(text)
    return text.replace("\n", f" {EOS} ").split()


@dataclass
class TokenVocabulary:
    """The tokens a language model knows, each at its id; ``unk`` is the id every other token maps to."""

    level: str
    tokens: list[str]
    unk: int

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("the tokens must be distinct")
        if not 0 <= self.unk < len(self.tokens):
            raise ValueError(f"unk id {self.unk} out of range")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, text: str, level: str, max_size: int = 0) -> TokenVocabulary:
        """The tokens of ``text``, most frequent first (ties in code-point order), cut to ``max_size``
        (0: all), plus ``<unk>`` if the text lacks it (PTB has its own)."""
        counts = Counter(tokenize(text, level))
        if level == "char":  # a character vocabulary reads best in code-point order, after UNK
            tokens = sorted(counts)
            if max_size:
                tokens = sorted(sorted(counts, key=lambda t: (-counts[t], t))[:max_size])
            return cls(level, [UNK, *tokens], 0)
        tokens = sorted(counts, key=lambda t: (-counts[t], t))
        if max_size:
            tokens = tokens[:max_size]
        if UNK not in tokens:
            tokens.append(UNK)
        return cls(level, tokens, tokens.index(UNK))

    def encode(self, text: str) -> tuple[Tensor, int]:
        """Token ids (N,) of ``text`` and how many of its tokens were unknown (mapped to UNK)."""
        ids = [self.index.get(t, -1) for t in tokenize(text, self.level)]
        unknown = sum(1 for i in ids if i < 0)
        return torch.tensor([self.unk if i < 0 else i for i in ids], dtype=torch.long), unknown

    def text_of(self, token: str, previous: str | None = None) -> str:
        """How a sampled token is printed after the token ``previous`` (None: nothing before it): characters as
        they are; <eos> as a newline; a word after a space where it follows another word."""
        if self.level == "char":
            return token
        if token == EOS:
            return "\n"
        return token if previous is None or previous == EOS else " " + token


# -- the model ---------------------------------------------------------------------------------------------
class LanguageModel(nn.Module):
    """Embedding -> any rnnmath recurrent layer -> dropout -> decoder over the vocabulary (see the module
    docstring for the math).

    Args: ``vocab_size`` V; ``cell`` a name of ``rnnmath.CELLS``; ``hidden`` H; ``layers`` L; ``embedding`` E
    (0: no embedding, the layer reads one-hot vectors, as char-rnn); ``dropout`` on the embedding, between
    layers and before the decoder; ``tie_weights`` shares the decoder's weight (V, H) with the embedding (V, E),
    which needs E = H.

    ``forward(ids, state=None)``: ids (T, B) int64 -> (logits (T, B, V), state), ``state`` as the layer's
    ``h_n``: (L, B, H) per state field (a tuple (h, c) for an LSTM); pass it back to continue the text.
    """

    def __init__(self, vocab_size: int, cell: str = "lstm", hidden: int = 128, layers: int = 2, embedding: int = 0,
                 dropout: float = 0.0, tie_weights: bool = False) -> None:
        super().__init__()
        if tie_weights and embedding != hidden:
            raise ValueError(f"tie_weights needs embedding == hidden, got {embedding} and {hidden}")
        self.vocab_size, self.dropout, self.tie_weights = vocab_size, dropout, tie_weights
        self.embedding = nn.Embedding(vocab_size, embedding) if embedding else None
        self.rnn = Recurrent(CELLS[cell], embedding or vocab_size, hidden, num_layers=layers,
                             dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    @classmethod
    def from_config(cls, config: LMConfig, vocab_size: int) -> LanguageModel:
        return cls(vocab_size, config.cell, config.hidden, config.layers, config.embedding, config.dropout,
                   config.tie_weights)

    def forward(self, ids: Tensor, state=None):
        if self.embedding is not None:
            x = F.dropout(self.embedding(ids), self.dropout, self.training)  # (T, B, E)
        else:
            x = ids  # (T, B): the layer's one-hot input, a row lookup of W_ih
        h, state = self.rnn(x, state)  # (T, B, H)
        return self.decoder(F.dropout(h, self.dropout, self.training)), state  # (T, B, V)


def initialize(model: LanguageModel, config: LMConfig) -> None:
    """The classic initialisations: every weight from U(-r, r) (Zaremba: 0.1, char-rnn: 0.08), then the LSTM's
    input-side forget-gate bias b_if set to ``forget_bias`` (char-rnn: 1)."""
    with torch.no_grad():
        if config.init_range:
            for p in model.parameters():
                p.uniform_(-config.init_range, config.init_range)
        if config.forget_bias and config.cell == "lstm":
            H = config.hidden
            for k in range(config.layers):
                bias = getattr(model.rnn, f"bias_ih_l{k}", None)
                if bias is not None:
                    bias[H : 2 * H] = config.forget_bias  # gates i | f | g | o


def detach(state):
    """The carried state without its history: gradients stop at the start of the next window."""
    if state is None:
        return None
    return state.detach() if isinstance(state, Tensor) else tuple(s.detach() for s in state)


# -- batches -----------------------------------------------------------------------------------------------
def tbptt_batches(ids: Tensor, batch_size: int, bptt: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The windows of truncated BPTT over one text.

    ``ids`` (N,) is cut into B = ``batch_size`` streams of n = N // B consecutive tokens (the last N mod B
    tokens are dropped), side by side as columns: stream b is ids[b·n : (b+1)·n]. Yields (x, y) per window,
    both (T, B) int64 with T = ``bptt`` (the last window may be shorter): x = streams[i : i+T], the targets
    y = streams[i+1 : i+T+1] are the next tokens. Row t of window w+1 continues row t of window w, so the state
    a window ends in is the right start for the next one. ceil((n − 1) / T) windows in all.

    Raises ValueError if a stream has fewer than 2 tokens.
    """
    n = ids.shape[0] // batch_size
    if n < 2:
        raise ValueError(f"{ids.shape[0]} tokens cannot make {batch_size} streams of at least 2 tokens")
    streams = ids[: n * batch_size].view(batch_size, n).t()  # (n, B)
    for i in range(0, n - 1, bptt):
        T = min(bptt, n - 1 - i)
        yield streams[i : i + T], streams[i + 1 : i + 1 + T]


def windows_per_epoch(num_tokens: int, batch_size: int, bptt: int) -> int:
    return math.ceil((num_tokens // batch_size - 1) / bptt)


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, window: int = 256) -> dict:
    """Loss of ``model`` over the text ``ids`` (N,) read as one stream, the state carried from each window of
    ``window`` steps to the next: equal to one pass over the whole text. Every token but the first is
    predicted. Returns {"loss": nats per token, "perplexity": e^loss, "bits_per_token": loss / ln 2,
    "tokens": N − 1}. Raises ValueError if N < 2."""
    if ids.shape[0] < 2:
        raise ValueError("a text of fewer than 2 tokens has nothing to predict")
    was_training = model.training
    model.eval()
    stream = ids.view(-1, 1)  # (N, 1)
    stream = stream.to(next(model.parameters()).device)  # the model's device (ids may come from the CPU)
    state, total = None, 0.0
    with compiled.by_shape():  # the same loss for the same model, however often the process has run it
        for i in range(0, stream.shape[0] - 1, window):
            y = stream[i + 1 : i + 1 + window]  # (T, 1)
            logits, state = model(stream[i : i + y.shape[0]], state)  # (T, 1, V)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    model.train(was_training)
    n = stream.shape[0] - 1
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
            "tokens": n}


# -- generation --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: LanguageModel, vocab: TokenVocabulary, prompt: str = "", length: int = 200,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> Iterator[str]:
    """Run ``prompt`` through the model, then sample ``length`` tokens one at a time, yielding each as text.

    Each token is drawn from softmax(logits / temperature) restricted to the ``top_k`` most probable tokens
    (0: all); temperature 0 takes the most probable token. The draws come from a generator seeded with
    ``seed``: the same model, prompt and seed give the same text. At character level UNK is never drawn.
    An empty prompt starts from a newline (char) or <eos> (word).

    The model runs on the device of its parameters; the draws are made on the CPU from a CPU generator, so
    a seed means the same draws on every device (the text can still differ where the devices' logits differ
    in rounding)."""
    model.eval()
    device = next(model.parameters()).device
    ids, _ = vocab.encode(prompt)
    previous = (tokenize(prompt, vocab.level) or [None])[-1]  # the generated text continues the prompt's
    if ids.numel() == 0:
        start = "\n" if vocab.level == "char" else EOS
        ids = torch.tensor([vocab.index.get(start, vocab.unk)])
    generator = torch.Generator().manual_seed(seed)
    logits, state = model(ids.view(-1, 1).to(device))  # (T, 1, V)
    last = logits[-1, 0]  # (V,)
    for _ in range(length):
        token = sample(last, temperature, top_k, generator, banned=vocab.unk if vocab.level == "char" else None)
        yield vocab.text_of(vocab.tokens[token], previous)
        previous = vocab.tokens[token]
        logits, state = model(torch.tensor([[token]], device=device), state)
        last = logits[-1, 0]


def sample(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator, banned: int | None = None
           ) -> int:
    """One token id from logits (V,): temperature, then top-k, then a draw (temperature 0: the argmax)."""
    logits = logits.detach().double().cpu().clone()  # the draw on the CPU, with the CPU generator
    if banned is not None and logits.shape[0] > 1:
        logits[banned] = -math.inf
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.shape[0]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(logits.softmax(0), 1, generator=generator))


# -- the model directory -----------------------------------------------------------------------------------
@dataclass
class TrainedLM:
    """What evaluate, generate and inspect need, rebuilt from a model directory with no flags."""

    config: LMConfig
    vocab: TokenVocabulary
    model: LanguageModel

    def evaluate_text(self, text: str, source: str = "the text") -> dict:
        """:func:`evaluate` of a text, with ``unknown`` (tokens mapped to UNK) and, at character level,
        ``bits_per_char``."""
        ids, unknown = self.vocab.encode(text)
        if ids.shape[0] < 2:
            raise UserError(f"{source}: holds {ids.shape[0]} token(s); a language model needs at least 2 to "
                            "predict one")
        metrics = evaluate(self.model, ids)
        bits = metrics.pop("bits_per_token")
        if self.vocab.level == "char":
            metrics["bits_per_char"] = bits
        return {**metrics, "unknown": unknown}


def save_description(directory: Path, config: LMConfig, vocab: TokenVocabulary) -> None:
    write_json(directory / CONFIG, "config", task=TASK, config=dataclasses.asdict(config))
    write_json(directory / VOCAB, "lm-vocab", level=vocab.level, tokens=vocab.tokens, unk=vocab.unk)


def load_description(directory: Path) -> tuple[LMConfig, TokenVocabulary]:
    if not directory.exists():
        raise UserError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise UserError(f"{directory}: is not a directory; expected a model directory")
    document = read_json(directory / CONFIG, "config")
    if document.get("task") != TASK:
        raise UserError(f"{directory} holds a {document.get('task', 'classifier')} model, not a language model")
    values = document.get("config")
    names = {f.name for f in dataclasses.fields(LMConfig)}
    if not isinstance(values, dict) or set(values) - names:
        raise UserError(f"{directory / CONFIG}: \"config\" must be an object of LMConfig fields")
    try:
        config = LMConfig(**values).validate()
    except UserError as e:
        raise UserError(f"{directory / CONFIG}: {e}") from None
    v = read_json(directory / VOCAB, "lm-vocab")
    try:
        vocab = TokenVocabulary(v["level"], list(v["tokens"]), int(v["unk"]))
        if not all(isinstance(t, str) for t in vocab.tokens) or vocab.level != config.level:
            raise ValueError("tokens must be strings of the config's level")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory / VOCAB}: not a valid vocabulary ({e})") from None
    return config, vocab


def load_lm(directory: str | Path, device: str | torch.device = "cpu") -> TrainedLM:
    """Rebuild a trained language model from its directory (config, vocabulary, weights), on ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; see ``rnnmath.model.resolve_device``, which raises a
    UserError naming ``--device`` when CUDA is asked for but not available)."""
    device = resolve_device(device)
    directory = Path(directory)
    config, vocab = load_description(directory)
    model = LanguageModel.from_config(config, len(vocab))
    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} is missing: training has not reached its first evaluation in {directory}")
    tensors, _ = read_safetensors(path, "weights")
    load_weights(model, untie(model, tensors), path)
    model.to(device).eval()
    return TrainedLM(config, vocab, model)


def weight_tensors(model: LanguageModel) -> dict[str, Tensor]:
    """The state dict as safetensors can hold it: a tied decoder weight is the embedding's, stored once."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # from any device
    if model.tie_weights:
        del tensors["decoder.weight"]
    return tensors


def untie(model: LanguageModel, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`weight_tensors`, for ``load_weights``."""
    if model.tie_weights and "embedding.weight" in tensors:
        tensors = {**tensors, "decoder.weight": tensors["embedding.weight"]}
    return tensors


def save_weights(directory: Path, model: LanguageModel) -> None:
    write_safetensors(directory / WEIGHTS, "weights", weight_tensors(model))


def save_checkpoint(directory: Path, model: LanguageModel, optimizer: torch.optim.Optimizer, carry, state: dict
                    ) -> None:
    """Weights, the optimizer's state tensors, torch's RNG state and the carried recurrent state as tensors;
    the loop's scalars and the optimizer's hyper-parameters as JSON metadata. Nothing is pickled."""
    saved = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in weight_tensors(model).items()}
    for i, values in saved["state"].items():
        for name, value in values.items():
            tensors[f"optim.{i}.{name}"] = value.cpu() if isinstance(value, Tensor) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # dropout draws from the GPU's generator there
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    fields = () if carry is None else (carry,) if isinstance(carry, Tensor) else carry
    for j, f in enumerate(fields):
        tensors[f"carry.{j}"] = f.cpu()
    write_safetensors(directory / CHECKPOINT, "lm-checkpoint", tensors, state=state,
                      param_groups=saved["param_groups"], carry_fields=len(fields))


def load_checkpoint(directory: Path, model: LanguageModel, optimizer: torch.optim.Optimizer):
    """Restore weights, optimizer and RNG; return (the loop's scalars, the carried state or None)."""
    path = directory / CHECKPOINT
    tensors, document = read_safetensors(path, "lm-checkpoint")
    try:
        load_weights(model, untie(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}), path)
        optim_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                optim_state.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": document["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        device = next(model.parameters()).device
        if device.type == "cuda" and "rng.cuda" in tensors:  # dropout's draws on the GPU
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        fields = [tensors[f"carry.{j}"].to(device) for j in range(document["carry_fields"])]
        state = document["state"]
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: the checkpoint is damaged ({e!r}); start again without --resume") from None
    carry = None if not fields else fields[0] if len(fields) == 1 else tuple(fields)
    return state, carry


# -- training ----------------------------------------------------------------------------------------------
def read_corpus(text: str, source: str, level: str = "char") -> str:
    """Check that a text can be read as a corpus at ``level``; a UserError naming ``source`` if it is empty or
    has fewer than 2 tokens (nothing to predict). At character level spaces and newlines are tokens like any
    other, so a text of only white space is a text; at word level white space separates the words and only
    newlines (<eos>) are tokens."""
    if not text:
        raise UserError(f"{source}: the file is empty; expected text to model")
    count = len(tokenize(text, level))
    if count < 2:
        raise UserError(f"{source}: holds {count} {level} token(s); a language model needs at least 2 to predict one")
    return text


def make_optimizer(model: nn.Module, config: LMConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.95, eps=1e-8)  # char-rnn's decay_rate


def learning_rate(config: LMConfig, epoch: int) -> float:
    """The rate of epoch ``epoch`` (1-based): lr · lr_decay^max(0, epoch − decay_after)."""
    return config.lr * config.lr_decay ** max(0, epoch - config.decay_after)


def train_lm(
    config: LMConfig,
    train_text: str,
    val_text: str | None,
    out: str | Path,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    time_limit: float | None = None,
    sources: tuple[str, str] = ("the training text", "the validation text"),
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a language model on ``train_text`` with truncated BPTT and write the model directory ``out``
    (see the module docstring); return its history.

    Each epoch walks the windows of :func:`tbptt_batches` in order: forward from the carried state, loss,
    backward, clip, step; the state is reset to zeros at the start of each epoch. On ``val_text`` the model is
    evaluated (:func:`evaluate`) every ``config.eval_every`` windows and at the end of each epoch; the weights
    of the best validation loss are kept. ``time_limit`` (minutes of this call's wall time): after the window
    that passes it, evaluate, save and stop; ``resume`` continues from the checkpoint. Ctrl-C saves a
    checkpoint and raises :class:`rnnmath.train.Interrupted`; resumed after it, the files are byte-identical
    to those of an uninterrupted run (a --time-limit stop adds one evaluation to the history). With
    ``overwrite`` a run already in ``out`` is replaced: its files (``model.RUN_FILES`` and timing.json) are
    removed once the new run has passed its checks.

    ``device``: where the model trains (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; see
    ``rnnmath.model.resolve_device``). The weights are initialised on the CPU and then moved, so a seed gives
    the same initial weights on every device; the windows are cut on the CPU and moved there.

    Raises UserError for an empty text, one shorter than B streams of one window, a non-finite loss, or
    ``--device cuda`` without a GPU.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    out = Path(out)
    train_name, val_name = sources
    read_corpus(train_text, train_name, config.level)
    if val_text is not None:
        read_corpus(val_text, val_name, config.level)
    if resume and (out / CHECKPOINT).exists():
        config, vocab = load_description(out)
    else:
        if resume and not (out / CONFIG).exists():
            raise UserError(f"--resume: {out} holds no run to resume; train without --resume first")
        if not resume and not overwrite and any((out / name).exists() for name in (CONFIG, WEIGHTS, CHECKPOINT)):
            raise UserError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or another --out")
        vocab = TokenVocabulary.build(train_text, config.level, config.max_vocab)
    ids, _ = vocab.encode(train_text)  # (N,)
    need = config.batch_size * (config.bptt + 1)
    if ids.shape[0] < need:
        raise UserError(f"{train_name}: holds {ids.shape[0]} {config.level} tokens, fewer than one BPTT window for "
                        f"each stream needs (--batch-size {config.batch_size} × (--bptt {config.bptt} + 1) = "
                        f"{need}); give more text or lower --bptt / --batch-size")
    val_ids, val_unknown = vocab.encode(val_text) if val_text is not None else (None, 0)
    if val_ids is not None and val_ids.shape[0] < 2:
        raise UserError(f"{val_name}: holds {val_ids.shape[0]} token(s); at least 2 are needed to predict one")
    with torch.device("meta"):  # counts without allocating: a clear error instead of running out of memory
        count = sum(p.numel() for p in LanguageModel.from_config(config, len(vocab)).parameters())
    if count > MAX_PARAMETERS:
        raise UserError(f"the model would have {count:,} parameters, more than the {MAX_PARAMETERS:,} allowed; "
                        "lower --hidden, --layers, --embedding or --max-vocab")
    if not (resume and (out / CHECKPOINT).exists()):
        if overwrite:  # only now: a mistake caught above leaves the old run whole
            for name in (*RUN_FILES, TIMING):
                (out / name).unlink(missing_ok=True)
        save_description(out, config, vocab)
    for litter in [*out.glob(".*.json.*.tmp"), *out.glob(".*.safetensors.*.tmp")]:
        litter.unlink(missing_ok=True)
    data_id = hashlib.sha256(ids.numpy().tobytes() + b"|" + (b"" if val_ids is None else val_ids.numpy().tobytes())
                             ).hexdigest()

    torch.manual_seed(config.seed)
    model = LanguageModel.from_config(config, len(vocab))
    initialize(model, config)
    model.to(device)
    optimizer = make_optimizer(model, config)
    state = {"epoch": 0, "window": 0, "loss_sum": 0.0, "tokens": 0, "best_val_loss": None, "history": [],
             "done": False, "data": data_id, "val_unknown": val_unknown}
    carry = None
    if resume and (out / CHECKPOINT).exists():
        state, carry = load_checkpoint(out, model, optimizer)
        if state["data"] != data_id:
            raise UserError(f"--resume: the training/validation text differs from that of the run in {out}")
    timing = _read_timing(out) if resume else []
    offset = timing[-1]["seconds"] if timing else 0.0

    W = windows_per_epoch(ids.shape[0], config.batch_size, config.bptt)
    tokens_per_window = config.batch_size * config.bptt
    tokens_per_epoch = (ids.shape[0] // config.batch_size - 1) * config.batch_size  # the targets of one epoch
    done_tokens = state["epoch"] * tokens_per_epoch + state["window"] * tokens_per_window
    bar = tqdm(total=config.epochs * tokens_per_epoch, initial=done_tokens, disable=not progress, unit="tok",
               unit_scale=True, dynamic_ncols=True, leave=False)  # its rate is the training speed in tokens/s

    def checkpoint_point(reason: str, epoch: int, window: int, train_loss: float) -> None:
        """Evaluate, keep the best weights, write history and checkpoint (the commit point)."""
        check_finite(model, f"epoch {epoch}, window {window}", out)
        entry = {"epoch": epoch, "window": window, "train_loss": train_loss, "reason": reason}
        if val_ids is not None:
            entry["val_loss"] = evaluate(model, val_ids)["loss"]
            if state["best_val_loss"] is None or entry["val_loss"] < state["best_val_loss"]:
                state["best_val_loss"] = entry["val_loss"]
                save_weights(out, model)
        else:
            save_weights(out, model)
        state["history"].append(entry)
        write_json(out / HISTORY, "history", **_history(state, config))
        save_checkpoint(out, model, optimizer, carry, state)
        seconds = offset + time.perf_counter() - started
        timing.append({**entry, "seconds": seconds, "tokens_seen": ((epoch - 1) * W + window) * tokens_per_window})
        write_json(out / TIMING, "lm-timing", evaluations=timing)
        if log:
            val = f", validation {entry['val_loss']:.4f}" if "val_loss" in entry else ""
            log(f"epoch {epoch}, window {window}/{W}: training loss {train_loss:.4f}{val} nats/token "
                f"({seconds:.0f} s)")

    with _StopOnCtrlC() as ctrl_c, bar, compiled.by_shape():
        while state["epoch"] < config.epochs and not state["done"]:
            epoch = state["epoch"] + 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch)
            model.train()
            bar.set_description(f"epoch {epoch}/{config.epochs}")
            batches = tbptt_batches(ids, config.batch_size, config.bptt)
            for w, (x, y) in enumerate(batches):
                if w < state["window"]:
                    continue  # resumed mid-epoch: these windows are done and the carried state is restored
                x, y = x.to(device), y.to(device)
                logits, carry = model(x, carry)  # (T, B, V)
                carry = detach(carry)
                loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))  # nats per token
                if not torch.isfinite(loss):
                    raise UserError(f"training stopped at epoch {epoch}, window {w + 1}: the loss became "
                                    f"{loss.item()}; the last good checkpoint in {out} is kept (try a lower --lr)")
                optimizer.zero_grad()
                (loss * x.shape[0] if config.sum_over_time else loss).backward()
                if config.clip and config.clip_kind == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                elif config.clip:
                    torch.nn.utils.clip_grad_value_(model.parameters(), config.clip)
                optimizer.step()
                state["loss_sum"] += loss.item() * y.numel()
                state["tokens"] += y.numel()
                state["window"] = w + 1
                bar.update(y.numel())
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                over_time = time_limit is not None and time.perf_counter() - started > 60 * time_limit
                if ctrl_c.requested:
                    save_checkpoint(out, model, optimizer, carry, state)
                    raise Interrupted(f"interrupted at epoch {epoch}, window {w + 1}: saved a checkpoint in {out}; "
                                      "continue with the same command and --resume")
                running_loss = state["loss_sum"] / state["tokens"]
                if over_time and state["window"] < W:
                    checkpoint_point("time limit", epoch, w + 1, running_loss)
                    if log:
                        log(f"stopped by --time-limit {time_limit:g} after epoch {epoch}, window {w + 1} of {W}; "
                            "continue with --resume")
                    return _history(state, config)
                if config.eval_every and state["window"] % config.eval_every == 0 and state["window"] < W:
                    checkpoint_point("every", epoch, w + 1, running_loss)
            carry = None  # each epoch starts from zeros
            train_loss = state["loss_sum"] / state["tokens"]
            state.update(epoch=epoch, window=0, loss_sum=0.0, tokens=0, done=epoch >= config.epochs)
            checkpoint_point("epoch", epoch, W, train_loss)
            if time_limit is not None and time.perf_counter() - started > 60 * time_limit and not state["done"]:
                if log:
                    log(f"stopped by --time-limit {time_limit:g} after epoch {epoch}; continue with --resume")
                return _history(state, config)
    return _history(state, config)


def check_finite(model: nn.Module, where: str, out: Path) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"training stopped at {where}: the weight {name} became non-finite; the last good "
                            f"checkpoint in {out} is kept (try a lower --lr)")


def _history(state: dict, config: LMConfig) -> dict:
    return {"evaluations": state["history"], "best_val_loss": state["best_val_loss"], "done": state["done"],
            "epochs_done": state["epoch"], "val_unknown": state["val_unknown"], "level": config.level}


def _read_timing(out: Path) -> list[dict]:
    path = out / TIMING
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["evaluations"])
    except (ValueError, KeyError, TypeError):
        return []


# -- the command line: `rnnmath train --task lm`, `evaluate`, `generate` on a language model (rnnmath.cli) ----
def read_text(path: str, encoding: str = "utf-8") -> str:
    """A text file in ``encoding`` (a Python codec name, or "auto": UTF-8, else Windows-1252, said on standard
    error), read by rnnmath.data.read_text: a UserError naming the file if it is missing, binary or not in that
    encoding; notes the reader has for the user go to standard error."""
    import sys

    from . import data

    result = data.read_text(path, encoding)
    text, notes = result if isinstance(result, tuple) else (result, [])  # newer readers also return notes
    for note in notes:
        print(f"rnnmath: {note}", file=sys.stderr)
    return text


def run_train(args, given: dict) -> int:
    """``rnnmath train --task lm``: ``given`` holds the LMConfig fields the user set as flags."""
    import sys

    out = Path(args.out)
    preset = args.preset if args.preset in LM_PRESETS else "char-rnn"
    config = dataclasses.replace(LM_PRESETS[preset], **given).validate()
    if args.resume and (out / CHECKPOINT).exists():  # before the first checkpoint, resuming starts over
        saved, _ = load_description(out)
        for name, value in given.items():
            if getattr(saved, name) != getattr(config, name):
                raise UserError(f"--{name.replace('_', '-')} {value} differs from the run being resumed in {out} "
                                f"({getattr(saved, name)}); leave it out with --resume")
        config = saved
    encoding = getattr(args, "encoding", None) or "utf-8"
    train_text = read_text(args.data, encoding)
    val_text = read_text(args.val, encoding) if args.val else None
    test_text = read_text(args.test, encoding) if args.test else None
    if test_text is not None:  # checked now: a test file found wanting after training would waste the run
        read_corpus(test_text, args.test, config.level)
    log = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr))
    progress = not (args.quiet or args.json) and sys.stderr.isatty()
    history = train_lm(config, train_text, val_text, out, resume=args.resume, progress=progress, log=log,
                       time_limit=args.time_limit, sources=(args.data, args.val or ""),
                       overwrite=getattr(args, "overwrite", False), device=getattr(args, "device", "cpu"))
    result = {"model": str(out), **history}
    if test_text is not None and history["done"]:
        result["test"] = load_lm(out, getattr(args, "device", "cpu")).evaluate_text(test_text, args.test)
        write_json(out / HISTORY, "history", **history, test=result["test"])
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    last = history["evaluations"][-1] if history["evaluations"] else {}
    state = "finished" if history["done"] else "stopped (continue with --resume)"
    print(f"{state} after {history['epochs_done']} of {config.epochs} epochs; last training loss "
          f"{last.get('train_loss', float('nan')):.4f} nats/token"
          + (f", best validation loss {history['best_val_loss']:.4f}" if history["best_val_loss"] is not None
             else ""))
    if history["val_unknown"]:
        print(f"{history['val_unknown']} token(s) of {args.val} are not in the training vocabulary (read as UNK)")
    if "test" in result:
        print(format_metrics(result["test"], args.test))
    print(f"model written to {out}")
    return 0


def format_metrics(metrics: dict, source: str) -> str:
    text = (f"{source}: loss {metrics['loss']:.4f} nats/token, perplexity {metrics['perplexity']:.2f}"
            + (f", {metrics['bits_per_char']:.4f} bits/char" if "bits_per_char" in metrics else "")
            + f", {metrics['tokens']} tokens predicted")
    if metrics["unknown"]:
        text += f"; {metrics['unknown']} unknown token(s) read as UNK"
    return text


def run_evaluate(args) -> int:
    """``rnnmath evaluate DIR --data FILE`` on a language model."""
    trained = load_lm(args.model, getattr(args, "device", "cpu"))
    text = read_corpus(read_text(args.data, getattr(args, "encoding", None) or "utf-8"), args.data,
                       trained.vocab.level)
    metrics = trained.evaluate_text(text, args.data)
    print(json.dumps(metrics, sort_keys=True) if args.json else format_metrics(metrics, args.data))
    return 0


def run_generate(args) -> int:
    """``rnnmath generate DIR``: the prompt, then each sampled token printed as it comes."""
    import sys

    trained = load_lm(args.model, getattr(args, "device", "cpu"))
    _, unknown = trained.vocab.encode(args.prompt)
    if unknown:
        print(f"rnnmath: {unknown} token(s) of --prompt are not in the vocabulary (read as UNK)", file=sys.stderr)
    pieces = generate(trained.model, trained.vocab, args.prompt, args.length, args.temperature, args.top_k,
                      args.seed)
    if args.json:
        text = "".join(pieces)
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": args.length, "seed": args.seed,
                          "temperature": args.temperature, "top_k": args.top_k, "unknown_in_prompt": unknown},
                         ensure_ascii=False))
        return 0
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# -- see inside: the next-token probabilities, states, gates and the cell search of Karpathy et al. (2015) ----
def text_properties(text: str) -> dict[str, Tensor]:
    """Per-character properties (N,) of ``text`` for the cell search of Karpathy, Johnson & Fei-Fei (2015,
    "Visualizing and Understanding Recurrent Networks", section 4.2): 1 inside double quotes (from an opening
    '"' to the closing one), 1 inside parentheses or brackets (depth > 0, the brackets themselves included),
    and the position in the line (characters since the last newline)."""
    quote, depth, column = [], [], []
    inside, level, col = False, 0, 0
    for ch in text:
        if ch == '"':
            inside = not inside
        if ch in "([":
            level += 1
        quote.append(float(inside or ch == '"'))
        depth.append(float(level > 0))
        if ch in ")]":
            level = max(0, level - 1)
        column.append(float(col))
        col = 0 if ch == "\n" else col + 1
    return {"inside quotes": torch.tensor(quote), "inside parentheses": torch.tensor(depth),
            "position in line": torch.tensor(column)}


def correlations(values: Tensor, prop: Tensor) -> Tensor:
    """Pearson correlation (H,) of each unit of values (T, H) with prop (T,); 0 where either is constant."""
    v = values.double() - values.double().mean(0)
    p = prop.double() - prop.double().mean()
    denominator = v.norm(dim=0) * p.norm()
    return torch.where(denominator > 0, (v * p.unsqueeze(1)).sum(0) / denominator.clamp_min(1e-300), 0.0)


@dataclass
class PassageReading:
    """A passage read by a language model; every tensor is plain and detached. Shapes: T tokens, H units."""

    text: str
    tokens: list[str]
    unknown: list[bool]
    p_next: Tensor  # (T − 1,): the probability the model gave to token t+1 after reading tokens 1..t
    top: list[list[tuple[str, float]]]  # the 3 most probable next tokens after each token
    states: dict[str, dict[str, Tensor]]  # 'layer 1' -> {h, c, gates} (T, H)
    cells: list[dict]  # the cell search: property, layer, field, unit, correlation, values (T,), property (T,)
    cell: str

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "unknown": self.unknown,
                "p_next": [round(float(p), 6) for p in self.p_next],
                "top": [[[t, round(p, 6)] for t, p in row] for row in self.top],
                "cell_search": [{k: v for k, v in c.items() if k not in ("values", "property_values")}
                                for c in self.cells]}


@torch.no_grad()
def read_passage(trained: TrainedLM, text: str) -> PassageReading:
    """Read ``text`` with a trained language model: the probability of each next token, every layer's states
    and gates (rnnmath.trace), and for each property of :func:`text_properties` that varies over the passage
    (character level) the unit of h or c most correlated with it, of any layer."""
    from . import trace

    model, vocab = trained.model, trained.vocab
    model.eval()
    ids, _ = vocab.encode(text)
    if ids.shape[0] < 2:
        raise UserError("the passage must hold at least 2 tokens")
    with trace(model.rnn) as tr:
        logits, _ = model(ids.view(-1, 1))  # (T, 1, V)
    p = logits[:, 0].double().softmax(-1)  # (T, V)
    p_next = p[:-1].gather(1, ids[1:].unsqueeze(1)).squeeze(1)  # (T − 1,)
    best = p.topk(min(3, p.shape[1]), dim=1)
    top = [[(vocab.tokens[i], float(q)) for q, i in zip(qs.tolist(), js.tolist())]
           for qs, js in zip(best.values, best.indices)]
    states = {f"layer {k + 1}": {name: v[:, 0] for name, v in values.items()} for (k, _), values in tr.values.items()}
    cells = []
    if vocab.level == "char":
        for name, prop in text_properties(text).items():
            if prop.std() == 0:
                continue
            found = []
            for layer, values in states.items():
                for field_name in ("c", "h"):
                    if field_name in values:
                        r = correlations(values[field_name], prop)
                        unit = int(r.abs().argmax())
                        found.append((abs(float(r[unit])), layer, field_name, unit, float(r[unit])))
            _, layer, field_name, unit, r = max(found)
            cells.append({"property": name, "layer": layer, "field": field_name, "unit": unit, "correlation": r,
                          "values": states[layer][field_name][:, unit], "property_values": prop})
    unknown = [t not in vocab.index for t in tokenize(text, vocab.level)]
    return PassageReading(text, tokenize(text, vocab.level), unknown, p_next.float(), top, states, cells,
                          trained.config.cell)


def _coloured_text(tokens: list[str], values: list[float], low: float, high: float, title: str) -> str:
    """The passage as HTML, each token's background coloured by its value (blue low, red high), as in
    Karpathy et al.'s figures; the value shows on hover."""
    import html

    spans = []
    for token, v in zip(tokens, values):
        x = 0.0 if high == low else max(0.0, min(1.0, (v - low) / (high - low)))
        r, g, b = (int(255 - (255 - c) * abs(2 * x - 1)) for c in ((214, 96, 77) if x >= 0.5 else (67, 147, 195)))
        shown = "↵\n" if token == "\n" else token
        spans.append(f'<span title="{v:.3f}" style="background: rgb({r},{g},{b})">{html.escape(shown)}</span>')
    return (f"<h3>{html.escape(title)}</h3><pre style=\"white-space: pre-wrap; line-height: 1.5\">"
            + "".join(spans) + "</pre>")


def write_passage_report(reading: PassageReading, out_dir: str | Path, max_steps: int = 160) -> Path:
    """report.html and PNGs for a passage read by a language model: the passage coloured by the probability
    of each next token and by each unit the cell search found, a plot of those probabilities, and the state
    and gate heatmaps of the first ``max_steps`` tokens."""
    import html

    from . import plots

    shown = [("↵" if t == "\n" else t) for t in reading.tokens[:max_steps]]
    p = reading.p_next.tolist()
    fig = plots.Figure(figsize=(plots._width(min(len(p), max_steps)), 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, min(len(p), max_steps - 1) + 1), p[: max_steps - 1], marker="o", markersize=3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("p(next token)")
    ax.set_title("probability the model gave to each token before reading it", fontsize=11, loc="left")
    ax.grid(alpha=0.3)
    plots._time_axis(ax, len(shown), shown)
    figures = [("next_token", "p(token t | tokens before it), for each token of the passage.", fig),
               ("states", "Hidden state h_t of every layer, time × units.",
                plots.state_heatmaps({k: v["h"][:max_steps] for k, v in reading.states.items()}, shown))]
    for i, (key, values) in enumerate(reading.states.items()):
        gates = {name: v[:max_steps] for name, v in values.items() if name != "h"}
        if gates:
            units = plots.top_variance_units(values["h"][:max_steps])
            figures.append((f"gates_{i + 1}", f"Gates (and cell state) of {key}.",
                            plots.gate_heatmaps(gates, shown, f"{reading.cell.upper()} gates, {key}", units)))
    for j, c in enumerate(reading.cells):
        fig = plots.Figure(figsize=(plots._width(min(len(shown), max_steps)), 3.0), layout="constrained")
        ax = fig.subplots()
        prop = c["property_values"][:max_steps]
        ax.plot(c["values"][:max_steps].numpy(), label=f"{c['field']} unit {c['unit']} of {c['layer']}")
        twin = ax.twinx()
        twin.fill_between(range(len(prop)), prop.numpy(), step="mid", alpha=0.2, color="orange", label=c["property"])
        twin.set_ylabel(c["property"])
        ax.set_title(f"{c['property']}: r = {c['correlation']:.2f}", fontsize=11, loc="left")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        plots._time_axis(ax, len(shown), shown)
        figures.append((f"cell_{j + 1}", f"The unit most correlated with '{c['property']}' over the passage.", fig))
    intro = [f"<p>Cell: {html.escape(reading.cell)}; {len(reading.tokens)} tokens; mean p(next token) "
             f"{float(reading.p_next.mean()):.3f}; loss {float(-reading.p_next.double().log().mean()):.3f} nats/token."
             "</p>", _coloured_text(reading.tokens[1:], p, 0.0, 1.0, "Each token coloured by the probability the "
                                    "model gave it (blue: surprising, red: expected)")]
    if reading.cells:
        intro.append(plots.html_table(["property", "layer", "state", "unit", "correlation r"],
                                      [[c["property"], c["layer"], c["field"], c["unit"], c["correlation"]]
                                       for c in reading.cells]))
    for c in reading.cells:
        v = c["values"].tolist()
        bound = max(1e-6, max(abs(x) for x in v))
        intro.append(_coloured_text(reading.tokens, v, -bound, bound,
                                    f"{c['field']} unit {c['unit']} of {c['layer']} (r = {c['correlation']:.2f} "
                                    f"with {c['property']})"))
    return plots.write_report(out_dir, "rnnmath: how the language model read the passage", figures, "".join(intro))


def run_inspect(args) -> int:
    """``rnnmath inspect DIR TEXT --out OUT`` on a language model (TEXT may be @FILE: the passage from a file)."""
    encoding = getattr(args, "encoding", None) or "utf-8"
    text = read_text(args.text[1:], encoding) if args.text.startswith("@") else args.text
    reading = read_passage(load_lm(args.model), text)
    path = write_passage_report(reading, args.out)
    print(json.dumps({**reading.to_json(), "report": str(path)}, ensure_ascii=False) if args.json else path)
    return 0
