"""Training, evaluation metrics, and the bag-of-words baseline.

The loop in ``train`` reads top to bottom: batch, forward, loss, backward, clip, step; then at the end of
each epoch evaluate, keep the best weights, checkpoint, and stop early when validation accuracy has not
improved for ``patience`` epochs.

Reproducibility: the initial weights come from ``torch.manual_seed(seed)``; epoch e visits the training
sentences in ``randperm`` order drawn from a generator seeded with (seed, e), so the data order needs no
state; dropout draws from torch's global generator, whose state is checkpointed. A run resumed from any
checkpoint therefore ends with the same model files as an uninterrupted run (byte for byte on the same
machine and thread count; other CPUs or thread counts may round differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import compiled, distributed
from .common import classification_metrics, format_duration, readable  # noqa: F401  (classification_metrics re-exported)
from .data import Examples, Vocabulary, encode, tokenize
from .errors import Interrupted, UserError  # noqa: F401  (Interrupted re-exported)
from .model import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    MEMBERS,
    RUN_FILES,
    WEIGHTS,
    WIDE,
    Classifier,
    Config,
    Ensemble,
    check_size,
    config_from_dict,
    load_description,
    load_model,
    load_weights,
    member_config,
    read_json,
    read_safetensors,
    resolve_device,
    save_description,
    save_weights,
    save_wide,
    trim,
    write_json,
    write_safetensors,
)
from .wide import choose

# -- metrics: rnnmath.common.classification_metrics (re-exported here) --------------------------------


def label_indices(examples: Examples, labels: Sequence[str]) -> Tensor:
    """Class index of each example's label; a label the model does not know is a UserError naming its line."""
    index = {y: i for i, y in enumerate(labels)}
    for label, line in zip(examples.labels, examples.lines):
        if label not in index:
            raise UserError(f"{examples.source} line {line}: label {label!r} is not one the model was trained "
                            f"on; expected one of {', '.join(map(repr, labels))}")
    return torch.tensor([index[y] for y in examples.labels], dtype=torch.long)


# -- the checkpoint: one safetensors file, so it is written in one atomic step -----------------------------
def save_checkpoint(directory: Path, model: Classifier, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Weights, Adam's moment tensors and torch's RNG state as tensors; the loop's scalars (``state``) and
    Adam's hyper-parameters as JSON in the file's metadata. Nothing is pickled."""
    adam = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, moments in adam["state"].items():
        for name, value in moments.items():
            tensors[f"adam.{i}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()  # uint8
    write_safetensors(directory / CHECKPOINT, "checkpoint", tensors, state=state,
                      adam_param_groups=adam["param_groups"])


def load_checkpoint(directory: Path, model: Classifier, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, Adam and the RNG from the checkpoint; return the loop's scalars."""
    path = directory / CHECKPOINT
    tensors, document = read_safetensors(path, "checkpoint")
    try:
        state = document["state"]
        load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
        adam_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                adam_state.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": adam_state, "param_groups": document["adam_param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: the checkpoint is damaged ({e!r}); start again without --resume") from None
    return state


def fingerprint(examples: Examples) -> str:
    """sha256 of the texts and labels, so --resume can tell that it got the same data."""
    return hashlib.sha256(json.dumps([examples.texts, examples.labels]).encode()).hexdigest()


class _StopOnCtrlC:
    """While active, the first Ctrl-C only sets ``requested``: the loop finishes its step, saves and stops.
    A second Ctrl-C interrupts at once. Not ``enabled`` (several processes: the others' part of the epoch
    cannot be saved), the first Ctrl-C interrupts at once and the epoch's checkpoint stands."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __enter__(self):
        self.requested = False
        self.previous = None
        if not self.enabled:
            return self
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# -- training ----------------------------------------------------------------------------------------------
def train(
    config: Config,
    train_set: Examples,
    val_set: Examples,
    out: str | Path,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    on_ready: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a classifier on ``train_set``, choosing the epoch by accuracy on ``val_set``; write the model
    directory ``out`` (see rnnmath.model) and return its history.

    First the network (``train_network``: every argument is described there); then, where the run's config
    has ``wide``, the wide part (``fit_wide``).
    """
    history = train_network(config, train_set, val_set, out, resume=resume, progress=progress, log=log,
                            on_start=on_start, overwrite=overwrite, on_ready=on_ready, device=device)
    out = Path(out)
    if distributed.is_main() and _saved_config(out).wide:
        history = fit_wide(out, train_set, val_set, history, log)
    distributed.barrier()  # the other processes wait for rank 0's wide part: all leave the group together
    return history


def fit_wide(out: Path, train_set: Examples, val_set: Examples, history: dict,
             log: Callable[[str], None] | None = None) -> dict:
    """Fit the wide part of the finished run in ``out`` (``rnnmath.wide.choose``: TF-IDF logistic regression
    on ``train_set``, its C and its weight λ against the network chosen on ``val_set``), write wide.json and
    wide.safetensors, add the choice to history.json under "wide" and return the history. A run whose wide
    part is already there (resumed after it finished) keeps it."""
    if (out / WIDE).exists() and (out / HISTORY).exists():
        saved = read_json(out / HISTORY, "history")
        if isinstance(saved.get("wide"), dict):
            return {**history, "wide": saved["wide"]}
    trained = load_model(out, with_wide=False)
    val_ids, val_lengths = encode(val_set.texts, trained.vocab, trained.config.max_len)
    network_val = trained.model.log_probs(val_ids, val_lengths)  # (N_val, C)
    part, record = choose(train_set.texts, label_indices(train_set, trained.labels), val_set.texts,
                          label_indices(val_set, trained.labels), network_val, len(trained.labels))
    record["network_val_accuracy"] = history["best_val_accuracy"]
    save_wide(out, part, record)
    history = {**history, "wide": record}
    write_json(out / HISTORY, "history", **history)
    if log:
        log(f"wide part: TF-IDF logistic regression on {record['features']:,} word 1-2-grams, C {part.C:g}; "
            f"weight {part.weight:g} against the network; validation accuracy {record['val_accuracy']:.4f} "
            f"(the network alone {history['best_val_accuracy']:.4f})")
    return history


def train_network(
    config: Config,
    train_set: Examples,
    val_set: Examples,
    out: str | Path,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    on_ready: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train the network of a classifier on ``train_set``, choosing the epoch by accuracy on ``val_set``;
    write the model directory ``out`` (see rnnmath.model) and return its history.

    ``on_start(out)`` is called once a fresh run has written its description, to add files of the caller's
    (the CLI writes split.json there). With ``overwrite`` a run already in ``out`` is replaced: its files
    (``model.RUN_FILES``, nothing else) are removed once the new run has passed its checks. ``on_ready()`` is
    called once every check has passed, just before the first batch (the CLI says there what it chose, so
    that an error found first is said alone).

    With ``resume`` the run continues from ``out``'s checkpoint: config, vocabulary and labels come from
    ``out``, and the data must be the same as before.

    Run by several processes (torchrun, see rnnmath.distributed), each reads its share of every batch,
    DDP averages the gradients, and only rank 0 reports progress and writes ``out``.

    ``device``: where the model trains (``"cpu"``, ``"cuda"``, ``"auto"``; see ``rnnmath.model.resolve_device``).
    Batches are drawn, and word dropout applied, on the CPU and then moved there, so the data order is the
    same on every device; dropout's random draws come from that device's generator.

    With ``config.ensemble`` N > 1 (or when resuming such a run) see ``train_ensemble``.
    """
    out = Path(out)
    saved = _saved_config(out) if resume else None
    if (saved.ensemble if saved is not None else config.ensemble) > 1:
        return train_ensemble(saved or config, train_set, val_set, out, resume=resume, progress=progress, log=log,
                              on_start=on_start, overwrite=overwrite, on_ready=on_ready, device=device)
    device = resolve_device(device)
    if device.type != "cpu" and distributed.world_size() > 1:
        raise UserError(f"--device {device}: training on a GPU with several processes is not supported yet; "
                        "use one process, or --device cpu")
    if not distributed.is_main():
        progress, log = False, None
    if len(val_set) == 0:
        raise UserError("the validation set is empty; give more data or a --val file")
    pretrained = coverage = None  # --embeddings: rows (V, E) read from the file, and their coverage
    if resume and (out / CHECKPOINT).exists():
        config, vocab, labels = load_description(out)
    else:
        config, vocab, labels, pretrained, coverage = _start(config, train_set, out, resume, overwrite, on_start,
                                                             log)
    if distributed.is_main():  # the temporary files of a run killed while writing (see atomic_write)
        for litter in [*out.glob(".*.json.*.tmp"), *out.glob(".*.safetensors.*.tmp")]:
            litter.unlink(missing_ok=True)
    ids, lengths = encode(train_set.texts, vocab, config.max_len)  # (N, T), (N,)
    y = label_indices(train_set, labels)  # (N,)
    val_ids, val_lengths = encode(val_set.texts, vocab, config.max_len)
    val_y = label_indices(val_set, labels)
    data_id = fingerprint(Examples.concat([train_set, val_set]))

    torch.manual_seed(config.seed)
    model = Classifier(config, len(vocab), len(labels))
    if pretrained is not None:
        with torch.no_grad():
            found = ~pretrained[:, 0].isnan()
            model.embedding.weight[found] = pretrained[found]
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 weight_decay=config.weight_decay)
    state = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "best_accuracy": -1.0, "best_epoch": 0,
             "bad_epochs": 0, "history": [], "done": False, "data": data_id}
    if coverage is not None:
        state["embeddings"] = coverage
    if resume and (out / CHECKPOINT).exists():
        state = load_checkpoint(out, model, optimizer)
        if state["data"] != data_id:
            raise UserError(f"--resume: the training/validation data differ from those of the run in {out}")
        if state["done"]:
            if log:
                log(f"the run in {readable(out)} had already finished ({len(state['history'])} epochs); --resume "
                    "has nothing to do (a finished run cannot be extended)")
            return _finish(state, log)
    if on_ready is not None and distributed.is_main():
        on_ready()
    net = distributed.wrap(model)  # DDP over several processes; the model itself when alone
    batches_per_epoch = math.ceil(len(y) / (config.batch_size * distributed.world_size()))
    bar = tqdm(total=config.epochs * batches_per_epoch, initial=state["epoch"] * batches_per_epoch + state["batch"],
               disable=not progress, unit="batch", dynamic_ncols=True, leave=False)
    started, first_epoch = time.perf_counter(), state["epoch"]  # for the elapsed time and ETA of the log
    with _StopOnCtrlC(enabled=distributed.world_size() == 1) as ctrl_c, bar, compiled.by_shape():
        while state["epoch"] < config.epochs and not state["done"]:
            epoch = state["epoch"]
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
            batches = distributed.shard(order, config.batch_size)  # this process's rows of each step
            distributed.seed_dropout(config.seed, epoch)
            model.train()
            bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            for b in range(state["batch"], len(batches)):
                rows, weight, count = batches[b]
                batch_ids, batch_lengths = trim(ids[rows], lengths[rows])
                if config.word_dropout:
                    unknown = torch.rand(batch_ids.shape) < config.word_dropout
                    batch_ids = batch_ids.masked_fill(unknown & (batch_ids > 0), 1)  # UNK, never on PAD
                log_p = net(batch_ids.to(device), batch_lengths.to(device))  # (B, C)
                loss = F.nll_loss(log_p, y[rows].to(device))
                if not torch.isfinite(loss):
                    raise UserError(f"training stopped at epoch {epoch + 1}, batch {b + 1}: the loss became "
                                    f"{loss.item()}; {_kept(out)} (try a lower --lr)")
                optimizer.zero_grad()
                (loss * weight).backward()  # weight 1 alone; see rnnmath.distributed for several processes
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                if not torch.isfinite(norm):
                    raise UserError(f"training stopped at epoch {epoch + 1}, batch {b + 1}: the gradient became "
                                    f"{norm.item()}; {_kept(out)} (try a lower --lr)")
                optimizer.step()
                state["loss_sum"] += loss.item() * count
                state["batch"] = b + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if ctrl_c.requested:
                    check_finite(model, f"epoch {epoch + 1}, batch {b + 1}", out)
                    save_checkpoint(out, model, optimizer, state)
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, batch {b + 1}: saved a checkpoint in "
                                      f"{out}; continue with the same command and --resume")

            check_finite(model, f"the end of epoch {epoch + 1}", out)  # never checkpoint a broken model
            val_rows = distributed.rows(len(val_y))  # this process's share of the validation set (all alone)
            val_pred = model.log_probs(val_ids[val_rows].to(device), val_lengths[val_rows].to(device)).argmax(1).cpu()
            accuracy = distributed.mean((val_pred == val_y[val_rows]).double())
            (loss_sum,) = distributed.total(state["loss_sum"])
            state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / len(y),
                                     "val_accuracy": accuracy})
            if accuracy > state["best_accuracy"]:
                state.update(best_accuracy=accuracy, best_epoch=epoch + 1, bad_epochs=0)
                if distributed.is_main():
                    save_weights(out, model)
            else:
                state["bad_epochs"] += 1
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
            state["done"] = state["bad_epochs"] >= config.patience or state["epoch"] >= config.epochs
            if distributed.is_main():  # the one writer; the others wait at the barrier
                write_json(out / HISTORY, "history", **_history(state))
                save_checkpoint(out, model, optimizer, state)  # last: the commit point of the epoch
            distributed.barrier()
            bar.set_postfix(loss=f"{state['history'][-1]['train_loss']:.3f}", val_acc=f"{accuracy:.3f}")
            if log:
                elapsed = time.perf_counter() - started
                done_here = state["epoch"] - first_epoch
                eta = "" if state["done"] else (
                    f", ETA {format_duration(elapsed / done_here * (config.epochs - state['epoch']))} at most")
                log(f"epoch {epoch + 1}/{config.epochs}: loss {state['history'][-1]['train_loss']:.4f}, "
                    f"validation accuracy {accuracy:.4f}, elapsed {format_duration(elapsed)}{eta}")
    return _finish(state, log)


def _saved_config(out: Path) -> Config | None:
    """The config of the run in ``out``, or None if there is none."""
    if not (out / CONFIG).exists():
        return None
    return config_from_dict(read_json(out / CONFIG, "config").get("config"), str(out / CONFIG))


def train_ensemble(config: Config, train_set: Examples, val_set: Examples, out: Path, resume: bool = False,
                   progress: bool = False, log: Callable[[str], None] | None = None,
                   on_start: Callable[[Path], None] | None = None, overwrite: bool = False,
                   on_ready: Callable[[], None] | None = None, device: str | torch.device = "cpu") -> dict:
    """Train the ``config.ensemble`` = N members of an ensemble one after another and write them as one
    model directory (see rnnmath.model, ``Ensemble``); return its history.

    Member k is ``train`` with ``model.member_config(config, k)`` (seed ``seed + k``) on the same data, in
    ``out/members/<k>/``. Once all are done their best weights go into ``out/model.safetensors`` under
    ``members.<k>.``, the ensemble's validation accuracy and the members' histories into history.json, and
    ``out/members`` is removed.

    Resume: the members that finished are kept, the one that was stopped continues from its last
    checkpoint (as ``train`` resumes), the others start; so a resumed ensemble ends with the same weights
    as an uninterrupted one. Resuming a finished ensemble returns its history.

    Histories: "members" holds each member's (epochs, best epoch, best validation accuracy);
    "best_val_accuracy" is the ensemble's validation accuracy, "epochs" is empty and "best_epoch" None (the
    members chose their epochs each).
    """
    if distributed.world_size() > 1:
        raise UserError("--ensemble trains its members one after another in one process; leave out --workers "
                        "(or torchrun)")
    if resume and (out / CONFIG).exists():
        config, vocab, labels = load_description(out)
        if (out / WEIGHTS).exists() and (out / HISTORY).exists():
            history = read_json(out / HISTORY, "history")
            if history.get("done") and isinstance(history.get("members"), list):
                if log:
                    log(f"the ensemble in {readable(out)} had already finished; --resume has nothing to do")
                return {k: history[k] for k in ("epochs", "best_epoch", "best_val_accuracy", "done", "members")}
    else:
        config, vocab, labels, _, _ = _start(config, train_set, out, resume, overwrite, on_start, log)
    if on_ready is not None:
        on_ready()
    histories = []
    for k in range(config.ensemble):
        member_out = out / MEMBERS / str(k)
        started = (member_out / CONFIG).exists()
        member_log = None if log is None else (lambda line, k=k: log(f"member {k + 1}/{config.ensemble}: {line}"))
        histories.append(train(member_config(config, k), train_set, val_set, member_out, resume=started,
                               overwrite=not started, progress=progress, log=member_log, device=device))
    tensors: dict[str, Tensor] = {}
    for k in range(config.ensemble):
        member_out = out / MEMBERS / str(k)
        _, member_vocab, member_labels = load_description(member_out)
        if member_vocab.words != vocab.words or member_labels != labels:
            raise UserError(f"{member_out}: its vocabulary or labels differ from those of the ensemble in {out} "
                            "(the training data changed); train again with --overwrite")
        weights, _ = read_safetensors(member_out / WEIGHTS, "weights")
        tensors.update({f"members.{k}.{name}": value for name, value in weights.items()})
    model = Ensemble(config, len(vocab), len(labels))
    load_weights(model, tensors, out / MEMBERS)
    val_ids, val_lengths = encode(val_set.texts, vocab, config.max_len)
    predicted = model.log_probs(val_ids, val_lengths).argmax(1)
    accuracy = (predicted == label_indices(val_set, labels)).double().mean().item()
    history = {"epochs": [], "best_epoch": None, "best_val_accuracy": accuracy, "done": True,
               "members": [{"seed": config.seed + k, "epochs": len(h["epochs"]), "best_epoch": h["best_epoch"],
                            "best_val_accuracy": h["best_val_accuracy"]} for k, h in enumerate(histories)]}
    save_weights(out, model)
    write_json(out / HISTORY, "history", **history)  # the commit point: a resume now returns this history
    shutil.rmtree(out / MEMBERS)
    if log:
        log(f"ensemble of {config.ensemble}: validation accuracy {accuracy:.4f} (members: "
            + ", ".join(f"{h['best_val_accuracy']:.4f}" for h in histories) + ")")
    return history


def _start(config: Config, train_set: Examples, out: Path, resume: bool, overwrite: bool,
           on_start: Callable[[Path], None] | None, log: Callable[[str], None] | None):
    """The checks and files of a fresh run: labels, vocabulary, --embeddings, size; then config.json,
    vocab.json, labels.json and the caller's files in ``out``. Returns (config, vocab, labels, pretrained
    rows (V, E) with NaN rows for words not in the file or None, coverage or None)."""
    pretrained = coverage = None
    if resume and not (out / CONFIG).exists():
        raise UserError(f"--resume: {out} holds no run to resume; train without --resume first")
    if not resume and not overwrite and any((out / name).exists() for name in (CONFIG, WEIGHTS, CHECKPOINT)):
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to "
                        "replace it, or another --out")
    labels = sorted(set(train_set.labels))
    if len(labels) < 2:
        raise UserError(f"{train_set.source}: the training data has a single class {labels[0]!r}; "
                        "expected at least two labels")
    vocab = Vocabulary.build(train_set.texts, config.vocab_size)
    if config.embeddings:  # read (and check) before anything is written; the embedding takes their size
        from .embeddings import coverage_line, initialise_embeddings, vector_size

        size = vector_size(config.embeddings)
        pretrained = torch.full((len(vocab), size), math.nan)  # (V, E): NaN rows are not in the file
        coverage = initialise_embeddings(pretrained, vocab, train_set.texts, config.embeddings)
        if size != config.embedding_dim and log:
            log(f"--embeddings {config.embeddings}: {size}-dimensional vectors, so --embedding-dim {size}")
        if log:
            log(coverage_line(config.embeddings, coverage))
        config = dataclasses.replace(config, embedding_dim=size)
    check_size(config, len(vocab), len(labels))
    distributed.barrier()  # every process has checked --out before rank 0 writes to it
    if distributed.is_main():
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {readable(out)}: cannot be written ({e.strerror})") from None
        if overwrite:  # only now: a mistake caught above leaves the old run whole
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / MEMBERS, ignore_errors=True)  # an ensemble's unfinished member runs
        try:
            save_description(out, config, vocab, labels)
            if on_start is not None:  # files of the caller's that belong to the run (the CLI's split record)
                on_start(out)
        except BaseException:  # no half-written run: a directory with config.json but no split record
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    return config, vocab, labels, pretrained, coverage


def check_finite(model: Classifier, where: str, out: Path) -> None:
    """A UserError, before anything is saved, if a weight has become NaN or infinite."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"training stopped at {where}: the weight {name} became non-finite; {_kept(out)} "
                            "(try a lower --lr)")


def _kept(out: Path) -> str:
    """What a user has after a stop: the last good checkpoint, or (in the first epoch) nothing to resume."""
    if (out / CHECKPOINT).exists():
        return f"the last good checkpoint in {out} is kept"
    return (f"no checkpoint exists yet in {out} (one is written at the end of each epoch), so there is nothing "
            "to resume: train again")


def _history(state: dict) -> dict:
    history = {"epochs": state["history"], "best_epoch": state["best_epoch"],
               "best_val_accuracy": state["best_accuracy"], "done": state["done"]}
    if "embeddings" in state:  # coverage of the --embeddings file
        history["embeddings"] = state["embeddings"]
    return history


def _finish(state: dict, log) -> dict:
    if log and state["bad_epochs"] and state["done"]:
        log(f"best validation accuracy {state['best_accuracy']:.4f} at epoch {state['best_epoch']}")
    return _history(state)


# -- the bag-of-words baseline -----------------------------------------------------------------------------
class BagOfWordsLogReg:
    """Multinomial logistic regression on the binary bag of the N most frequent training words.

    Fitted in torch (float64) by full-batch L-BFGS from zero weights, so it is deterministic. The objective
    is scikit-learn's default: mean cross-entropy + ||W||² / (2·C·n) with C = 1 (the bias is not penalised).
    """

    def __init__(self, vocab_size: int = 400, C: float = 1.0, max_iter: int = 500) -> None:
        self.vocab_size, self.C, self.max_iter = vocab_size, C, max_iter

    def bags(self, texts: Sequence[str]) -> Tensor:
        x = torch.zeros(len(texts), len(self.vocab) - 2, dtype=torch.float64)  # (N, words)
        for i, text in enumerate(texts):
            for w in set(tokenize(text)):
                j = self.vocab.index.get(w, 0) - 2  # PAD/UNK (ids 0, 1) are not features
                if j >= 0:
                    x[i, j] = 1.0
        return x

    def fit(self, texts: Sequence[str], y: Tensor, num_classes: int) -> BagOfWordsLogReg:
        self.vocab = Vocabulary.build(texts, self.vocab_size)
        x = self.bags(texts)
        self.W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.W, self.b], lr=1, max_iter=self.max_iter, history_size=20,
                                      tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        n = len(texts)

        def objective():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ self.W.T + self.b, y) + (self.W**2).sum() / (2 * self.C * n)
            loss.backward()
            return loss

        optimizer.step(objective)
        return self

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> Tensor:
        return (self.bags(texts) @ self.W.T + self.b).argmax(1)
