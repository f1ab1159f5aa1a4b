"""The ``rnnmath`` command: train, evaluate, predict, demo, datasets, bench, inspect, flow.

Each subcommand is a pair of functions, ``add_<name>_parser(subparsers)`` that declares its flags and
``cmd_<name>(args) -> int`` that runs it; ``SUBCOMMANDS`` lists the first of each pair. To add a command,
write the pair and append the parser function to ``SUBCOMMANDS``.

Start-up stays fast (``rnnmath --help`` under 0.5 s): this module and what it imports at the top (config,
data, common, errors) never import torch, matplotlib or numpy. A ``cmd_<name>`` imports its tool module
inside the function; a parser whose flags live in a heavy module declares them only when that command runs
(see ``running``).

Exit codes: 0 success; 2 bad usage or bad data (one line ``rnnmath: error: ...`` naming the file and line,
or the flag); 1 internal error (one line; the traceback with RNNMATH_DEBUG=1); 130 interrupted by Ctrl-C
(training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import data as datamod
from .common import readable
from .config import PRESETS, Config
from .data import Examples, read_examples
from .errors import Interrupted, UserError
from .lm_config import LM_PRESETS, LMConfig

_COMMAND: str | None = None  # the subcommand this process runs, once main has seen argv (None: all)


def running(command: str) -> bool:
    """Whether this process runs ``command`` (or builds every parser, as tests do): a parser whose flags
    need a heavy import declares them only then."""
    return _COMMAND in (None, command)


# -- flag types: a bad value is an argparse error (exit 2) that names the flag ------------------------------
def _number(kind, low, high):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (low <= value <= high):  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected a value from {low} to {high}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,6, got {text!r}") from None
    if any(not 1 <= v <= 65536 for v in values):
        raise argparse.ArgumentTypeError(f"expected sizes from 1 to 65536, got {text!r}")
    return values


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ``Config`` (``vocab_size`` -> ``--vocab-size``), default None = the preset's."""
    group = parser.add_argument_group("model and training (defaults: the preset's)")
    for f in dataclasses.fields(Config):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = getattr(PRESETS["default"], f.name)
        help_text = f"{meta['help']} (default preset: {default})"
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type.startswith("tuple"):
            group.add_argument(flag, type=_int_list, default=None, metavar="N,N", help=help_text)
        elif isinstance(meta["choices"], tuple):  # a function: Config.validate checks it (it imports torch)
            group.add_argument(flag, choices=meta["choices"], default=None, help=help_text)
        elif f.type == "str":
            group.add_argument(flag, default=None, help=help_text)
        else:
            kind = int if f.type == "int" else float
            group.add_argument(flag, type=_number(kind, meta["low"], meta["high"]), default=None,
                               metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> tuple[Config, dict]:
    """The preset with every flag the user gave applied; also returns those flags as {field: value}."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.preset], **given).validate(), given


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|auto",
                        help="where the model runs: cpu, cuda (cuda:N), or auto = cuda when a GPU is seen "
                             "(default: cpu)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading data files")
    group.add_argument("--format", choices=datamod.FORMATS, default="auto",
                       help="file layout: tsv, csv (with a header, or --text-column/--label-column numbers), "
                            "jsonl, label-first ('<label> <text>', the Kim 2014 benchmark files), fasttext "
                            "('__label__<name> <text>'); auto: by extension (.csv, .jsonl/.json, else TSV) "
                            "(default: auto)")
    group.add_argument("--text-column", default="text",
                       help="name of the text column or key, or its 1-based number in a TSV/CSV file without a "
                            "header (default: text)")
    group.add_argument("--label-column", default="label",
                       help="name of the label column or key, or its 1-based number in a TSV/CSV file without a "
                            "header (default: label)")
    group.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                       help="with column numbers: --header skips line 1 (the file has a header), --no-header reads "
                            "it as data; without either, a line 1 that looks like a header is an error, never a "
                            "class (default: neither)")
    group.add_argument("--encoding", default="utf-8",
                       help="text encoding of the files, any Python codec name; auto: UTF-8, else Windows-1252, "
                            "said on standard error (default: utf-8)")
    group.add_argument("--on-bad-line", choices=datamod.ON_BAD_LINE, default="error",
                       help="a malformed record stops with an error naming it, or is skipped and counted "
                            "(default: error)")


def read_data(args: argparse.Namespace, path: str) -> Examples:
    examples = read_examples(path, **reader_options(args))
    for note in examples.notes:
        print(f"rnnmath: {note}", file=sys.stderr)
    if examples.skipped:
        shown = ", ".join(map(str, examples.skipped[:20])) + (", ..." if len(examples.skipped) > 20 else "")
        print(f"rnnmath: skipped {len(examples.skipped)} bad line(s) of {path}: {shown}", file=sys.stderr)
    return examples


# -- train -------------------------------------------------------------------------------------------------
def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a sentence classifier, or a language model (--task lm)",
                              description="Train a sentence classifier and write its model directory. With only "
                              "--data, that file is split (stratified, seeded) 80/10/10 into "
                              "train/validation/test; --val and --test give those parts as files instead (--val alone: "
                              "--data is split 90/10 into train/test, and the output says so).")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled training sentences")
    p.add_argument("--val", metavar="FILE", help="validation sentences (early stopping, choice of epoch)")
    p.add_argument("--test", metavar="FILE", help="test sentences, evaluated once at the end")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(LM_PRESETS), default="default",
                   help="starting configuration; 'seed' is the seed's tanh RNN; char-rnn and zaremba-small are "
                        "language models (imply --task lm; docs/language_models.md) (default: default)")
    p.add_argument("--task", choices=["classify", "lm"], default=None,
                   help="a sentence classifier, or a language model of the text (default: classify)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out with its own "
                   "settings (an error where --out holds no run; a finished run cannot be extended)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its model files only); "
                   "without it, an --out that holds a run is an error")
    p.add_argument("--json", action="store_true", help="print the history and test metrics as one JSON object")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, per-epoch lines or set-up notes (split sizes, threads, vector coverage; "
                        "history.json keeps them)")
    p.add_argument("--workers", type=_number(int, 1, 4096), default=1, metavar="N",
                   help="train with N local processes (data-parallel, through torch.distributed's launcher, "
                        "as torchrun --nproc_per_node=N does); --batch-size is per process (default: 1)")
    add_threads_flag(p)
    add_device_flag(p)
    add_max_labels_flag(p)
    add_config_flags(p)
    add_lm_flags(p)
    add_data_flags(p)
    p.set_defaults(func=cmd_train)


def add_lm_flags(parser: argparse.ArgumentParser) -> None:
    """The language model's flags that the classifier lacks, one per field of ``LMConfig``, and --time-limit."""
    group = parser.add_argument_group("language model (--task lm; defaults: the preset's, char-rnn without one)")
    shared = {f.name for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(LMConfig):
        if f.name in shared:
            continue
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        elif meta["choices"] is not None:
            group.add_argument(flag, choices=meta["choices"], default=None, help=meta["help"])
        else:
            kind = int if f.type == "int" else float
            group.add_argument(flag, type=_number(kind, meta["low"], meta["high"]), default=None,
                               metavar=f.name.upper(), help=meta["help"])
    group.add_argument("--time-limit", type=_number(float, 1e-6, 1e7), default=None, metavar="MINUTES",
                       help="stop after the window that passes MINUTES of wall time: evaluate, save, and exit; "
                            "--resume continues")


def lm_train_command(args: argparse.Namespace) -> int:
    """``train --task lm``: the flags of LMConfig the user gave go to rnnmath.language_model.run_train."""
    from . import language_model

    lm_fields = {f.name for f in dataclasses.fields(LMConfig)}
    for f in dataclasses.fields(Config):
        if f.name not in lm_fields and getattr(args, f.name) is not None:
            raise UserError(f"--{f.name.replace('_', '-')} is a flag of the classifier, not of --task lm")
    if args.workers != 1:
        raise UserError("--workers: a language model trains in one process; leave --workers out")
    if args.max_labels is not None:
        raise UserError("--max-labels is a flag of the classifier, not of --task lm")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; give one of them")
    set_threads(args)
    if args.preset in PRESETS and args.preset != "default":
        raise UserError(f"--preset {args.preset} is a classifier's; a language model takes "
                        f"{' or '.join(sorted(LM_PRESETS))}")
    given = {name: getattr(args, name) for name in lm_fields if getattr(args, name, None) is not None}
    return language_model.run_train(args, given)


def task_of(directory: str) -> str:
    """The task a model directory was trained for ("classify" or "lm"), read from its config.json without
    torch; "classify" when it cannot be read (the classifier's loader then says what is wrong)."""
    try:
        document = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "classify"
    return document.get("task", "classify") if isinstance(document, dict) else "classify"


def cmd_train(args: argparse.Namespace) -> int:
    from .model import resolve_device

    resolve_device(args.device)  # a --device that cannot be had is said before any data is read
    if args.task == "lm" or (args.task is None and args.preset in LM_PRESETS):
        return lm_train_command(args)
    if args.preset in LM_PRESETS:
        raise UserError(f"--preset {args.preset} is a language model's; use it with --task lm")
    for f in dataclasses.fields(LMConfig):
        if hasattr(args, f.name) and f.name not in {g.name for g in dataclasses.fields(Config)} \
                and getattr(args, f.name) is not None:
            raise UserError(f"--{f.name.replace('_', '-')} is a flag of --task lm, not of the classifier")
    if args.time_limit is not None:
        raise UserError("--time-limit is a flag of --task lm, not of the classifier")
    from . import distributed

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if distributed.launched() and args.workers not in (1, local_world):
        raise UserError(f"--workers {args.workers}: this process is already one of {local_world} started by "
                        "torchrun; leave --workers out under torchrun")
    if args.workers > 1 and not distributed.launched():
        distributed.launch(args.workers, args.argv)  # the same command in N processes, which go on below
        return 0
    with distributed.process_group():  # torchrun's workers meet here; nothing to do in one process
        return train_command(args)


def add_max_labels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-labels", type=_number(int, 2, 10_000_000), default=None, metavar="N",
                        help="allow up to N distinct labels (default: 50, and labels must not be unique to most "
                             "rows: such a label column is text, e.g. columns swapped)")


def reader_options(args: argparse.Namespace) -> dict:
    """``read_examples``'s keyword arguments from the data flags (saved in the split record)."""
    return {"format": args.format, "text_column": args.text_column, "label_column": args.label_column,
            "on_bad_line": args.on_bad_line, "encoding": args.encoding, "header": args.header}


def set_threads(args: argparse.Namespace) -> int:
    """Apply ``--threads`` (or ``common.default_threads()``) to torch's intra-op pool; return the number."""
    import torch

    from .common import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_number(int, 1, 4096), default=None, metavar="N",
                        help="CPU threads for torch (default: the cores the 1-minute load average leaves idle, at "
                             "least 1, or OMP_NUM_THREADS; see README 'Threads')")


def train_command(args: argparse.Namespace) -> int:
    from . import distributed
    from .common import classification_metrics, compact_metrics
    from .model import (
        CHECKPOINT,
        CONFIG,
        HISTORY,
        load_description,
        load_model,
        write_json,
        write_split_record,
    )
    from .train import label_indices, train

    threads = set_threads(args)
    out = Path(args.out)
    config, given = config_from_args(args)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; give one of them")
    if args.resume and (out / CONFIG).exists():  # the run's own settings; other flags are a mistake
        saved, _, _ = load_description(out) if (out / CHECKPOINT).exists() else (_saved_config(out), None, None)
        for name, value in given.items():
            if getattr(saved, name) != getattr(config, name):
                raise UserError(f"--{name.replace('_', '-')} {value} differs from the run being resumed in {out} "
                                f"({getattr(saved, name)}); leave it out with --resume, which only finishes an "
                                "interrupted run with its own settings (a finished run cannot be extended: train "
                                "again with --overwrite or another --out)")
        config = saved
    if args.resume and not (out / CHECKPOINT).exists():
        if not (out / CONFIG).exists():
            raise UserError(f"--resume: {out} holds no checkpoint to resume (no run was started there); train "
                            "without --resume")
        if config.ensemble == 1:
            print(f"rnnmath: {out} holds no checkpoint yet (the run stopped before the end of its first epoch): "
                  "starting that run over with its saved settings", file=sys.stderr)
    examples = read_data(args, args.data)
    datamod.check_labels(examples, args.max_labels)
    val = read_data(args, args.val) if args.val else None
    test = read_data(args, args.test) if args.test else None
    fractions = [0.8 if val is None and test is None else 0.9 if val is None or test is None else 1.0]
    fractions += [0.1] * ((val is None) + (test is None))
    parts = datamod.stratified_split(examples.labels, fractions, config.seed)
    train_set = examples.subset(parts.pop(0))
    held = []
    if val is None:
        val = examples.subset(parts.pop(0))
        held.append(f"validation {len(val)}")
    if test is None:
        test = examples.subset(parts.pop(0))
        held.append(f"test {len(test)}")
    quiet = args.quiet or args.json
    # said once training starts: a mistake train() finds first (--resume on other data) is said alone
    pending = []
    if held:
        missing = ("; no --test file was given, so 10% of --data is the test set" if args.val and not args.test
                   else "; no --val file was given, so 10% of --data is the validation set" if args.test
                   and not args.val else "")
        pending.append(f"rnnmath: split {args.data} (stratified, seed {config.seed}): train {len(train_set)}, "
                       f"{', '.join(held)} sentences{missing}")
    empty = sum(1 for t in train_set.texts if not datamod.tokenize(t))
    if empty:
        pending.append(f"rnnmath: {empty} of {len(train_set)} training sentences have no token at all (see README "
                       "'Tokenizer'); they are read as empty sentences")
    pending.append(f"training on {threads} thread(s)")

    def say_pending() -> None:
        while pending and not quiet:
            print(pending.pop(0), file=sys.stderr)

    def log(line: str) -> None:
        say_pending()
        print(line, file=sys.stderr)

    log = None if quiet else log
    progress = not quiet and sys.stderr.isatty()
    split = {"train": train_set, "val": val, "test": test}
    history = train(config, train_set, val, out, resume=args.resume, progress=progress, log=log,
                    overwrite=args.overwrite, on_start=lambda out: write_split_record(out, split, reader_options(args)),
                    on_ready=say_pending, device=args.device)
    if not distributed.is_main():  # rank 0 evaluates the test set, writes and prints
        return 0
    result = {"model": str(out), "train": len(train_set), "val": len(val), **history,
              "val_source": args.val or f"{'10%' if args.test else '10% (of 80/10/10)'} of {args.data}",
              "test_source": args.test or f"{'10%' if args.val else '10% (of 80/10/10)'} of {args.data}"}
    if len(test):
        trained = load_model(out, args.device)
        predicted = trained.predict(test.texts).argmax(1)
        result["test"] = classification_metrics(label_indices(test, trained.labels).tolist(), predicted.tolist(),
                                                trained.labels)
        write_json(out / HISTORY, "history", **history, test=compact_metrics(result["test"]))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        if "members" in history:
            trained = f"trained an ensemble of {len(history['members'])} on {len(train_set)} sentences"
            network = (f"validation accuracy {history['best_val_accuracy']:.4f} (members: "
                       + ", ".join(f"{m['best_val_accuracy']:.4f}" for m in history["members"]) + ")")
        else:
            trained = f"trained on {len(train_set)} sentences"
            network = (f"best validation accuracy {history['best_val_accuracy']:.4f} at epoch {history['best_epoch']} "
                       f"of {len(history['epochs'])}")
        if isinstance(history.get("wide"), dict):  # the model predicts with the mix: its accuracy first
            wide = history["wide"]
            print(f"{trained}; validation accuracy {wide['val_accuracy']:.4f} with the wide part (weight "
                  f"{wide['weight']:g}); the network alone: {network}")
        else:
            print(f"{trained}; {network}")
        if len(test):
            print(f"test accuracy {result['test']['accuracy']:.4f} (n={len(test)}), "
                  f"macro F1 {result['test']['macro_f1']:.4f}")
        print(f"model written to {readable(out)}")
    return 0


# -- cv --------------------------------------------------------------------------------------------------
def add_cv_parser(subparsers) -> None:
    p = subparsers.add_parser("cv", help="stratified k-fold cross-validation of a training configuration",
                              description="Stratified k-fold cross-validation (rnnmath.crossval): each fold is "
                              "the test part once; 10% of the other folds (stratified) is the validation part. "
                              "Prints mean ± std of accuracy and macro-F1; writes every fold's model (with its "
                              "split.json) and --out/cv.json. Warns when test sentences of a fold also occur in "
                              "its training part (a file that repeats sentences).")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled sentences")
    p.add_argument("--folds", type=_number(int, 2, 1000), default=10, metavar="K", help="folds (default: 10)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for fold-*/ models and cv.json")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="starting configuration")
    p.add_argument("--processes", type=_number(int, 1, 256), default=1, metavar="N",
                   help="train N folds at a time, one process and one thread each (default: 1)")
    p.add_argument("--json", action="store_true", help="print the result (every fold) as one JSON object")
    add_max_labels_flag(p)
    add_config_flags(p)
    add_data_flags(p)
    p.set_defaults(func=cmd_cv)


def cmd_cv(args: argparse.Namespace) -> int:
    from .crossval import cross_validate

    config, _ = config_from_args(args)
    examples = read_data(args, args.data)
    datamod.check_labels(examples, args.max_labels)  # a label column of free text, swapped columns: as train
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    result = cross_validate(config, examples, args.out, folds=args.folds, workers=args.processes, log=log,
                            reader=reader_options(args))
    overlap = sum(r["train_overlap"] for r in result["folds"])
    if overlap:
        print(f"rnnmath: warning: {overlap} of {len(examples)} test sentences ({overlap / len(examples):.1%}) have "
              f"the same words as a training sentence of their fold, because {args.data} repeats sentences "
              f"({result['repeated_lines']} line(s) repeat an earlier one); these figures overstate accuracy on new "
              "text; remove the repeated lines from the file to avoid it", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        acc, f1 = result["accuracy"], result["macro_f1"]
        print(f"{args.folds}-fold cross-validation of {len(examples)} sentences: accuracy {acc['mean']:.4f} ± "
              f"{acc['std']:.4f}, macro F1 {f1['mean']:.4f} ± {f1['std']:.4f} (mean ± std over folds); "
              f"details in {Path(args.out) / 'cv.json'}")
    return 0


def _saved_config(out: Path) -> Config:
    from .model import CONFIG, config_from_dict, read_json

    return config_from_dict(read_json(out / CONFIG, "config").get("config"), str(out / CONFIG))


# -- evaluate ----------------------------------------------------------------------------------------------
def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="accuracy, per-class precision/recall/F1, confusion matrix",
                              description="Evaluate a trained model on labelled sentences: --data FILE, or "
                              "--split test (val, train) to re-read exactly that part of the run's own files "
                              "(recorded in DIR/split.json). Warns on standard error when evaluated sentences "
                              "were also trained on.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train'")
    p.add_argument("--data", metavar="FILE", help="labelled sentences")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="evaluate this part of the run's split instead of --data")
    p.add_argument("--json", action="store_true", help="print one JSON object (accuracy, macro_f1, n, ...)")
    add_threads_flag(p)
    add_device_flag(p)
    add_data_flags(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if task_of(args.model) == "lm":
        from . import language_model

        if args.split is not None:
            raise UserError("--split applies to a classifier's run; a language model is evaluated on --data FILE")
        if args.data is None:
            raise UserError("a language model is evaluated on --data FILE; give the text to score")
        set_threads(args)
        return language_model.run_evaluate(args)
    from .common import classification_metrics
    from .model import held_out, load_model, read_split_record, repeated_sentences, training_overlap
    from .train import label_indices

    if (args.data is None) == (args.split is None):
        raise UserError("give either --data FILE or --split test|val|train")
    set_threads(args)
    trained = load_model(args.model, args.device)
    if args.split:
        examples = held_out(args.model, args.split)
        for note in examples.notes:
            print(f"rnnmath: {note}", file=sys.stderr)
    else:
        examples = read_data(args, args.data)
    y = label_indices(examples, trained.labels)
    predicted = trained.predict(examples.texts).argmax(1)
    metrics = classification_metrics(y.tolist(), predicted.tolist(), trained.labels)
    metrics["skipped_lines"] = examples.skipped
    record = read_split_record(args.model)
    if record is not None:
        overlap = training_overlap(record, examples.texts)
        metrics["train_overlap"] = overlap
        if overlap and args.split is None:
            print(f"rnnmath: warning: {overlap} of {len(examples)} evaluated sentences ({overlap / len(examples):.1%}) "
                  f"were also in the training data of {args.model}, so these figures overstate accuracy on new "
                  f"text; 'rnnmath evaluate {args.model} --split test' evaluates the held-out part", file=sys.stderr)
        elif overlap and args.split != "train" and record["parts"][args.split]["file"] != \
                record["parts"]["train"]["file"]:  # a --val/--test file of its own shares sentences with training
            share = f"{overlap / len(examples):.1%}"
            train_file = record["files"].get(record["parts"]["train"]["file"], {}).get("path", "the training file")
            this_file = record["files"].get(record["parts"][args.split]["file"], {}).get("path", "its file")
            print(f"rnnmath: warning: {overlap} of {len(examples)} {args.split} sentences ({share}) from {this_file} "
                  f"have the same words as a sentence of the training data ({train_file}); these figures overstate "
                  f"accuracy on new text; remove those sentences from one of the files and train again to avoid it",
                  file=sys.stderr)
        elif overlap and args.split != "train":  # the split kept lines apart: the file repeats sentences
            source, repeated = repeated_sentences(record, args.split)
            share = f"{overlap / len(examples):.1%}"
            print(f"rnnmath: warning: {overlap} of {len(examples)} {args.split} sentences ({share}) have the same "
                  f"words as a training sentence, because {source} repeats sentences ({repeated} line(s) repeat an "
                  "earlier one) and the split kept lines, not sentences, apart; these figures overstate accuracy "
                  "on new text; remove the repeated lines from the file and train again to avoid it",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
        return 0
    print(format_metrics(metrics))
    return 0


def format_metrics(metrics: dict) -> str:
    labels = metrics["labels"]
    width = max(8, *(len(y) for y in labels))
    averaged = (f" (mean over the {len(metrics['macro_labels'])} labels present in true or predicted labels)"
                if len(metrics["macro_labels"]) != len(labels) else "")
    lines = [f"accuracy {metrics['accuracy']:.4f}   macro F1 {metrics['macro_f1']:.4f}{averaged}   n {metrics['n']}",
             "", f"{'label':<{width}}  precision  recall  f1      support"]
    for label, m in metrics["per_class"].items():
        lines.append(f"{label:<{width}}  {m['precision']:<9.4f}  {m['recall']:<6.4f}  {m['f1']:<6.4f}  {m['support']}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted)",
              " " * width + "  " + "  ".join(f"{y:>{width}}" for y in labels)]
    for label, row in zip(labels, metrics["confusion"]):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


# -- predict -----------------------------------------------------------------------------------------------
def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="label new sentences",
                              description="Print the label and its probability for each text: the TEXT "
                              "arguments, or else one text per line of standard input, each answered (and "
                              "flushed) as soon as its line has arrived, so a program can write a line and read "
                              "its answer.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train'")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label (default: lines of standard input); "
                   "after '--' every argument is a text, even one starting with '-': predict DIR -- \"-5 stars\"")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: text, label, probabilities (label -> probability)")
    add_threads_flag(p)
    add_device_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if task_of(args.model) == "lm":
        raise UserError(f"{args.model} holds a language model; use 'rnnmath generate' or 'rnnmath evaluate'")
    from .model import load_model

    set_threads(args)
    texts = [text_argument(t, "TEXT") for t in args.texts]
    trained = load_model(args.model, args.device)

    def answer(texts: list[str]) -> None:
        probabilities = trained.predict(texts)
        for text, p in zip(texts, probabilities.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            if args.json:
                print(json.dumps({"text": text, "label": trained.labels[best],
                                  "probabilities": dict(zip(trained.labels, p))}))  # ASCII: no \u2028 in a line
            else:
                print(f"{trained.labels[best]}\t{p[best]:.4f}\t{text}")
        sys.stdout.flush()

    if texts:
        answer(texts)
    else:
        for batch in stdin_batches():
            answer(batch)
    return 0


def stdin_batches(stream=None, chunk: int = 1 << 16):
    """Standard input as UTF-8 lines split on "\\n" only (a BOM and a "\\r" before "\\n" are dropped),
    yielded as soon as they arrive: each batch holds the complete lines of one read (one line from a program
    that writes a line and waits; thousands from a file). UserError naming the line if it is not UTF-8."""
    stream = sys.stdin.buffer if stream is None else stream
    pending, line_number, first = b"", 0, True
    while True:
        data = stream.read1(chunk)  # one read: returns what has arrived, without waiting for a full chunk
        if not data:
            break
        pending += data
        if first:
            if len(pending) < 3 and b"\n" not in pending:
                continue  # maybe half a BOM
            pending, first = pending.removeprefix(b"\xef\xbb\xbf"), False
        *complete, pending = pending.split(b"\n")
        if complete:
            yield _decode_lines(complete, line_number)
            line_number += len(complete)
    if first:
        pending = pending.removeprefix(b"\xef\xbb\xbf")
    if pending:
        yield _decode_lines([pending], line_number)


def _decode_lines(raw: list[bytes], before: int) -> list[str]:
    lines = []
    for i, line in enumerate(raw, start=before + 1):
        try:
            lines.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError:
            raise UserError(f"standard input line {i}: not valid UTF-8; expected UTF-8 text") from None
    return lines


def read_stdin_lines() -> list[str]:
    """All of standard input as lines (see ``stdin_batches``)."""
    return [line for batch in stdin_batches() for line in batch]


# -- generate (language models) ---------------------------------------------------------------------------
def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a language model",
                              description="Run --prompt through a language model trained with 'rnnmath train "
                              "--task lm', then sample tokens and print them as they come. The same model, "
                              "prompt and --seed give the same text.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train --task lm'")
    p.add_argument("--prompt", default="", help="text to start from (default: none, a new line)")
    p.add_argument("--length", type=_number(int, 0, 10_000_000), default=500, metavar="N",
                   help="tokens to sample (default: 500)")
    p.add_argument("--temperature", type=_number(float, 0, 100), default=1.0, metavar="T",
                   help="divide the logits by T; below 1 more likely, above 1 more varied text; 0 takes the "
                        "most probable token (default: 1)")
    p.add_argument("--top-k", type=_number(int, 0, 10_000_000), default=0, metavar="K",
                   help="draw among the K most probable tokens only; 0: all (default: 0)")
    p.add_argument("--seed", type=_number(int, 0, 2**63 - 1), default=0, help="seed of the draws (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt, text, ...) at the end")
    add_threads_flag(p)
    add_device_flag(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    if task_of(args.model) != "lm":
        from . import language_model

        language_model.load_description(Path(args.model))  # says what is wrong: no directory, no config, ...
        raise UserError(f"{args.model}: not a language model (its config.json lacks \"task\": \"lm\"); "
                        "train one with 'rnnmath train --task lm'")
    from . import language_model

    args.prompt = text_argument(args.prompt, "--prompt")
    set_threads(args)
    return language_model.run_generate(args)


# -- demo --------------------------------------------------------------------------------------------------
DEMO_SENTENCES = [
    "the food was good but slow",
    "the food was slow but good",
    "the service was not bad",
    "the service was not very good",
    "the coffee was really fresh and not cold",
    "the coffee was cold and not fresh",
]


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train on a task where word order matters; compare with bag of words",
                              description="Generate a sentiment task whose labels depend on word order "
                              "(negation, contrast with 'but', intensifiers), train the default model on it, "
                              "and compare its test accuracy with a bag-of-words logistic regression. Offline.")
    p.add_argument("--out", metavar="DIR", help="keep the trained model here (default: a temporary directory)")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="seed of data and training")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: less data, fewer epochs
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .model import load_model
    from .train import BagOfWordsLogReg, label_indices, train

    start = time.perf_counter()
    n, epochs = (400, 2) if args.quick else (3000, 3)
    examples = datamod.make_order_task(n, args.seed)
    train_idx, val_idx, test_idx = datamod.stratified_split(examples.labels, [0.8, 0.1, 0.1], args.seed)
    train_set, val, test = examples.subset(train_idx), examples.subset(val_idx), examples.subset(test_idx)
    print(f"rnnmath demo: {n} generated sentences whose sentiment depends on word order, e.g.")
    for i in range(4):
        print(f"  {examples.labels[i]:<8}  {examples.texts[i]}")
    print(f"split {len(train_set)} train / {len(val)} validation / {len(test)} test (stratified, seed {args.seed})\n")

    # the network alone (no wide part): the demo sets the recurrent network against a bag of words
    config = dataclasses.replace(PRESETS["default"], epochs=epochs, seed=args.seed, patience=epochs, wide=False)
    with tempfile.TemporaryDirectory(prefix="rnnmath-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "model"
        print(f"training the default model ({config.cell.upper()}, {config.hidden} units, "
              f"{'bidirectional' if config.bidirectional else 'one direction'}) for up to {epochs} epochs ...")
        train(config, train_set, val, out, progress=sys.stderr.isatty(),
              log=lambda line: print("  " + line))
        trained = load_model(out)
        y_test = label_indices(test, trained.labels)
        rnn_pred = trained.predict(test.texts).argmax(1)
        bow = BagOfWordsLogReg(vocab_size=400).fit(train_set.texts, label_indices(train_set, trained.labels),
                                                    len(trained.labels))
        bow_pred = bow.predict(test.texts)
        twins = twin_indices(test)
        rnn_acc = (rnn_pred == y_test).double().mean().item()
        bow_acc = (bow_pred == y_test).double().mean().item()
        print(f"\n{'model':<44} {'test accuracy':>13} {'on twins':>9}")
        for name, pred, acc in [("RNN (default preset)", rnn_pred, rnn_acc),
                                ("bag-of-words logistic regression", bow_pred, bow_acc)]:
            on_twins = (pred[twins] == y_test[twins]).double().mean().item() if twins else float("nan")
            print(f"{name:<44} {acc:>13.3f} {on_twins:>9.3f}")
        print(f"\n{len(twins)} test sentences have a twin in the test set with exactly the same words in another "
              "order and the opposite label ('good but slow' vs 'slow but good').\nA bag of words cannot tell "
              "twins apart, and cannot make 'not' flip both 'good' and 'bad'; the RNN reads the words in order, "
              "so it can.\n")
        probabilities = trained.predict(DEMO_SENTENCES)
        print("predictions of the RNN:")
        for text, p in zip(DEMO_SENTENCES, probabilities.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            print(f"  {trained.labels[best]:<8} {p[best]:.3f}  {text}")

        # ---- INSPECT REPORT: the inspect report of the trained model (model dir `out`, sentences
        # DEMO_SENTENCES) is to be written here, while the temporary model directory still exists. ----
        from . import flow, plots

        report_dir = Path(args.out) / "inspect" if args.out else Path(tempfile.mkdtemp(prefix="rnnmath-inspect-"))
        report = plots.write_reading_report(flow.read_sentence(trained, DEMO_SENTENCES[0]), report_dir,
                                            {"directory": out if args.out else "(temporary)",
                                             "cell": config.cell, "test_accuracy": rnn_acc})
        print(f"\nhow the RNN read {DEMO_SENTENCES[0]!r}, word by word: {readable(report)}")

        print(f"\ndemo finished in {time.perf_counter() - start:.0f} s"
              + (f"; model kept in {readable(out)}" if args.out else ""))
    if rnn_acc <= bow_acc:
        print("rnnmath: warning: the RNN did not beat the bag-of-words model on this run", file=sys.stderr)
    return 0


def twin_indices(examples: Examples) -> list[int]:
    """Indices of sentences whose bag of words also occurs in ``examples`` with another label."""
    by_bag: dict[tuple, set[str]] = {}
    bags = [tuple(sorted(datamod.tokenize(t))) for t in examples.texts]
    for bag, label in zip(bags, examples.labels):
        by_bag.setdefault(bag, set()).add(label)
    return [i for i, bag in enumerate(bags) if len(by_bag[bag]) > 1]


# -- datasets ----------------------------------------------------------------------------------------------
def add_datasets_parser(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="list known datasets; download and verify one",
                              description="List the known datasets with their download URL and sha256, and "
                              "where a verified copy lies. --fetch downloads one into the cache and checks it.")
    p.add_argument("--fetch", metavar="NAME", help="download NAME (or verify the --data-dir copy) and print its folder")
    p.add_argument("--data-dir", metavar="DIR",
                   help="an offline copy laid out like the cache (default: $RNNMATH_DATA_DIR)")
    p.add_argument("--cache-dir", metavar="DIR", help="download folder (default: $RNNMATH_CACHE_DIR or "
                   "~/.cache/rnnmath)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_datasets)


def cmd_datasets(args: argparse.Namespace) -> int:
    if args.fetch:
        root = datamod.locate(args.fetch, args.data_dir, args.cache_dir)
        for f in datamod.DATASETS[args.fetch].files:
            if (root / f.path).is_file():
                print(root / f.path)
        return 0
    data_dir = Path(args.data_dir) if args.data_dir else datamod.default_data_dir()
    cache = Path(args.cache_dir) if args.cache_dir else datamod.default_cache_dir()
    listing = []
    for d in datamod.DATASETS.values():
        roots = [r for r in (data_dir, cache) if r is not None and not datamod.check_copy(d, r)]
        listing.append({"name": d.name, "description": d.description, "url": d.url, "sha256": d.sha256,
                        "license": d.license, "files": [f.path for f in d.files],
                        "local": str(roots[0]) if roots else None})
    if args.json:
        print(json.dumps({"datasets": listing}, sort_keys=True))
        return 0
    for d in listing:
        print(f"{d['name']}\n  {d['description']}\n  url     {d['url']}\n  sha256  {d['sha256']}\n"
              f"  license {d['license']}\n  local   {d['local'] or 'not downloaded (rnnmath datasets --fetch NAME)'}")
    return 0


# -- bench -------------------------------------------------------------------------------------------------
def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed and peak memory against torch.nn (docs/benchmarks.md)",
                              description="Training step and inference of RNN/LSTM/GRU: rnnmath's fast path vs "
                              "torch.nn's native layers and the readable loop, the seed's one-hot loop, the "
                              "matmul roofline and peak memory. The full grid takes long on 2 cores: try --quick.")
    if running("bench"):  # bench.py imports torch
        from . import bench

        bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


# -- inspect and flow: see inside (rnnmath/flow.py, rnnmath/plots.py, docs/inspect.md) ----------------------
def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="how a trained model reads one sentence: report.html and figures",
                              description="Read one sentence with a trained model and write OUT/report.html (one "
                              "self-contained page) and its figures as PNG: the prediction after each word, the "
                              "hidden states and gates, the gradient through time and each word's attribution.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train'")
    p.add_argument("text", help="the sentence to read (a language model: the passage, or @FILE to read it from FILE)")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="directory for report.html and the PNGs")
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON object")
    p.add_argument("--encoding", default=None,
                   help="a language model's @FILE: its text encoding, any Python codec name; auto: UTF-8, else "
                        "Windows-1252, said on standard error (default: utf-8)")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    if task_of(args.model) == "lm":
        from . import language_model

        args.text = text_argument(args.text, "TEXT")
        if args.encoding is not None and not args.text.startswith("@"):
            raise UserError("--encoding applies to a passage read from @FILE; TEXT is given on the command line")
        return language_model.run_inspect(args)
    from . import flow, plots
    from .model import HISTORY, load_model

    text = text_argument(args.text, "TEXT")
    if args.encoding is not None:
        raise UserError("--encoding applies to a language model's passage read from @FILE; a classifier reads TEXT "
                        "as given")
    trained = load_model(args.model)
    directory = args.model
    if trained.config.ensemble > 1:  # states and gradients belong to one network: read the first member
        import dataclasses

        from .model import member_config

        n = trained.config.ensemble
        print(f"rnnmath: {args.model} is an ensemble of {n}; inspect reads its member 1 (seed "
              f"{trained.config.seed}): the probabilities shown are that member's, not the ensemble's",
              file=sys.stderr)
        trained = dataclasses.replace(trained, model=trained.model.members[0],
                                      config=member_config(trained.config, 0))
        directory = f"{args.model} (member 1 of the ensemble of {n})"
    reading = flow.read_sentence(trained, text)
    history = Path(args.model) / HISTORY
    try:
        accuracy = json.loads(history.read_text(encoding="utf-8")).get("test", {}).get("accuracy")
    except (OSError, ValueError, AttributeError):  # no history or no test part: the page says so
        accuracy = None
    path = plots.write_reading_report(reading, args.out, {"directory": directory, "cell": trained.config.cell,
                                                          "test_accuracy": accuracy})
    if trained.wide is not None and trained.wide.weight > 0:  # said once the report is there: errors come alone
        print(f"rnnmath: {args.model} mixes its network with a wide part (TF-IDF logistic regression, weight "
              f"{trained.wide.weight:g}); inspect reads the network: the probabilities shown are the network's "
              "alone ('rnnmath predict' gives the model's)", file=sys.stderr)
    if args.json:
        print(json.dumps({**reading.to_json(), "report": readable(path)}, ensure_ascii=False))
    else:
        print(readable(path))
    return 0


def text_argument(value: str, name: str) -> str:
    """A command-line text as Unicode; UserError naming the argument if it holds bytes that are not UTF-8
    (Python keeps such bytes as lone surrogates, U+DC80-U+DCFF, which no tokenizer or file can take)."""
    bad = next((ch for ch in value if "\udc80" <= ch <= "\udcff"), None)
    if bad is not None:
        raw = value.encode("utf-8", "surrogateescape")
        shown = raw.decode("utf-8", "backslashreplace")
        raise UserError(f"{name} \"{shown}\" holds the byte 0x{ord(bad) - 0xDC00:02x}, which is not UTF-8; pass the "
                        "text in UTF-8 (e.g. convert it with iconv -f cp1252 -t utf-8)")
    return value


def add_flow_parser(subparsers) -> None:
    p = subparsers.add_parser("flow", help="vanishing gradients: ‖∂L/∂h_t‖ over time for several cell kinds",
                              description="Plot ‖∂L/∂h_t‖ over t for each cell kind on the same adding-problem "
                              "sequences (untrained, and with --train after training on that memory task); "
                              "write OUT/report.html and the PNGs and print ‖∂L/∂h_1‖/‖∂L/∂h_T‖ per cell.")
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cell kinds (default: rnn,lstm,gru)")
    p.add_argument("--steps", type=_number(int, 2, 100_000), default=100, help="sequence length (default: 100)")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="directory for report.html and the PNGs")
    p.add_argument("--train", action="store_true", help="also measure after training on the adding problem")
    p.add_argument("--train-steps", type=_number(int, 1, 1_000_000), default=1000, metavar="N",
                   help="Adam steps of that training, batches of 64 (default: 1000; at 300 the LSTM had not "
                        "yet learned the task)")
    p.add_argument("--hidden", type=_number(int, 1, 4096), default=32, help="state size (default: 32)")
    p.add_argument("--batch", type=_number(int, 1, 100_000), default=32, help="sequences measured (default: 32)")
    p.add_argument("--forget-bias", type=_number(float, -100, 100), default=0.0, metavar="B",
                   help="add B to the LSTM's forget-gate bias at initialisation (default: 0, torch.nn's init)")
    p.add_argument("--seed", type=_number(int, 0, 2**63 - 1), default=0, help="seed of data and weights")
    p.set_defaults(func=cmd_flow)


def cmd_flow(args: argparse.Namespace) -> int:
    from . import CELLS, flow, plots

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if not cells or unknown:
        raise UserError(f"--cells: unknown cell {unknown[0] if unknown else '(none)'!r}; "
                        f"known: {', '.join(sorted(CELLS))}")
    results = flow.vanishing_gradients(cells, args.steps, args.batch, args.hidden, args.seed, args.train,
                                       args.train_steps, args.forget_bias)
    path = plots.write_flow_report(results, args.out, args.steps, args.forget_bias)
    print(f"{'cell':<8} {'weights':<10} {'|dL/dh_1| / |dL/dh_T|':>22} {'test MSE':>9}")
    for r in results:
        print(f"{r.cell:<8} {'trained' if r.trained else 'untrained':<10} {r.ratio:>22.3g} {r.mse:>9.4f}")
    print(readable(path))
    return 0


# -- serve and export (rnnmath/serve.py, rnnmath/export.py, docs/serving.md) ---------------------------------
def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="answer over HTTP: POST /predict (a classifier) or POST /generate (a "
                              "language model), GET /health, GET /info",
                              description="Serve a trained model over HTTP until SIGTERM or Ctrl-C, which finish "
                              "the requests in flight (for at most --shutdown-timeout seconds) and exit with 0. "
                              "A classifier answers POST /predict; concurrent requests are joined into one "
                              "forward pass of up to --max-batch texts, waiting at most --max-delay-ms for "
                              "company. A language model answers POST /generate with the text 'rnnmath generate' "
                              "gives for the same arguments. Needs the 'serve' extra: "
                              "pip install 'rnnmath[serve]'. See docs/serving.md.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="TCP port; 0 picks a free one, "
                   "printed at start (default: 8000)")
    p.add_argument("--max-batch", type=_number(int, 1, 1_000_000), default=None, metavar="N",
                   help="a classifier: most texts in one forward pass; 1 turns batching off (default: 64)")
    p.add_argument("--max-delay-ms", type=_number(float, 0, 60_000), default=None, metavar="MS",
                   help="a classifier: longest a request waits for others to join its forward pass (default: 5)")
    p.add_argument("--max-texts", type=_number(int, 1, 10_000_000), default=None, metavar="N",
                   help="a classifier: most texts in one request; more get 413 (default: 1000)")
    p.add_argument("--max-length", type=_number(int, 0, 10_000_000), default=None, metavar="N",
                   help="a language model: most tokens one POST /generate may ask for; more get 413 "
                        "(default: 2000)")
    p.add_argument("--max-prompt-tokens", type=_number(int, 0, 10_000_000), default=None, metavar="N",
                   help="a language model: most tokens in one prompt; more get 413 (default: 10000)")
    p.add_argument("--max-body-bytes", type=_number(int, 1, 2**40), default=1 << 20, metavar="N",
                   help="largest request body; larger get 413 (default: 1048576)")
    p.add_argument("--request-timeout", type=_number(float, 0.001, 86_400), default=30.0, metavar="S",
                   help="seconds a client has to send a request's headers, and again its body; then 408 and the "
                        "connection is closed (default: 30)")
    p.add_argument("--shutdown-timeout", type=_number(float, 0, 86_400), default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C, seconds to finish the requests in flight; those still running are "
                        "then cancelled and the server exits with 0 (default: 30)")
    p.add_argument("--threads", type=_number(int, 1, 4096), default=1, metavar="N",
                   help="torch's intra-op threads for the forward passes (default: 1; see docs/serving.md)")
    add_device_flag(p)
    p.set_defaults(func=cmd_serve)


def _optional_module(name: str):
    """Import rnnmath.<name>, whose command needs the optional extra of the same name."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as e:
        raise UserError(f"rnnmath {name} needs the '{name}' extra ({e.name} is not installed): "
                        f"pip install 'rnnmath[{name}]'") from None


def cmd_serve(args: argparse.Namespace) -> int:
    serve = _optional_module("serve")
    import torch

    # measured (docs/serving.md): with 2 threads on a busy machine OpenMP stalls made batched passes ~30x
    # slower; small passes gain little from intra-op threads anyway
    torch.set_num_threads(args.threads)
    lm = task_of(args.model) == "lm"
    # each flag applies to one task; given for the other it would do nothing, so it is refused
    for flag, for_lm in (("max_batch", False), ("max_delay_ms", False), ("max_texts", False),
                         ("max_length", True), ("max_prompt_tokens", True)):
        if getattr(args, flag) is not None and for_lm != lm:
            raise UserError(f"--{flag.replace('_', '-')} applies to "
                            f"{'a language model' if for_lm else 'a classifier'}, and {args.model} holds "
                            f"{'a language model' if lm else 'a classifier'}; leave it out")
    given = {name: getattr(args, name) for name in ("max_texts", "max_length", "max_prompt_tokens")
             if getattr(args, name) is not None}
    limits = serve.Limits(max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout, **given)
    if lm:
        service = serve.LanguageModelService(args.model, args.device)
    else:
        service = serve.ClassifierService(args.model, 64 if args.max_batch is None else args.max_batch,
                                          (5.0 if args.max_delay_ms is None else args.max_delay_ms) / 1000,
                                          args.device)
    endpoint = "POST /generate" if lm else "POST /predict"

    def announce(url: str) -> None:
        print(f"rnnmath: serving {args.model} on {url} ({endpoint}, GET /health, GET /info); Ctrl-C or SIGTERM "
              "stops", file=sys.stderr, flush=True)

    serve.serve(service, args.host, args.port, limits, announce=announce, shutdown_timeout=args.shutdown_timeout)
    print("rnnmath: server stopped", file=sys.stderr, flush=True)
    return 0


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the model as ONNX, to run outside Python",
                              description="Write a trained classifier as an ONNX graph: inputs ids int64 (B, T) "
                              "and lengths int64 (B,), output probabilities float32 (B, C), batch and time axes "
                              "dynamic; the vocabulary and labels go beside it (OUT.vocab.json, OUT.labels.json). "
                              "A model with a wide part (--wide) takes its TF-IDF entries as two more inputs, grams "
                              "and gram_weights (B, K), and writes its features and idf to OUT.wide.json. "
                              "The graph is checked with onnxruntime against the model before the command ends. "
                              "Needs the 'export' extra: pip install 'rnnmath[export]'. See docs/serving.md.")
    p.add_argument("model", metavar="DIR", help="model directory written by 'rnnmath train'")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    export = _optional_module("export")
    result = export.export_onnx(args.model, args.out)
    wide = f", {result.wide} (the wide part's inputs grams and gram_weights)" if result.wide else ""
    print(f"wrote {result.onnx} with {result.vocab}{wide} and {result.labels}; onnxruntime agrees with the model "
          f"within {result.max_difference:.1e} on {result.checked}")
    return 0


def _workers():
    """rnnmath.distributed where the command imported it (train); where not, nothing runs in several
    processes, and a stand-in answers for it without importing torch."""
    return sys.modules.get("rnnmath.distributed") or _NoWorkers


class _NoWorkers:
    """Stands in for rnnmath.distributed in ``main`` when the command never imported it (one process)."""

    class WorkerFailed(Exception):
        exit_code = 1

    @staticmethod
    def record_failure(message: str) -> bool:
        return False

    @staticmethod
    def who() -> str:
        return ""

    @staticmethod
    def lost_peer(error: BaseException) -> bool:
        return False


# -- entry point -------------------------------------------------------------------------------------------
SUBCOMMANDS = [add_train_parser, add_cv_parser, add_evaluate_parser, add_predict_parser, add_generate_parser,
               add_demo_parser, add_datasets_parser, add_bench_parser, add_inspect_parser, add_flow_parser,
               add_serve_parser, add_export_parser]


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake in the flags said in one line instead of the usage block and the error
    (``rnnmath train: error: argument --bptt: ... (see rnnmath train --help)``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnmath", description="Recurrent networks as readable tensor math: "
                                     "train, evaluate and use a sentence classifier.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _COMMAND
    argv = sys.argv[1:] if argv is None else list(argv)
    _COMMAND = next((a for a in argv if not a.startswith("-")), "")
    try:
        return _main(argv)
    finally:
        _COMMAND = None


READABLE_ERRORS = "rnnmath-readable"


def _readable_errors(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler of standard output and error: a byte of a path that is not UTF-8 (kept by Python
    as a lone surrogate U+DC80-U+DCFF) prints as ``\\xe9``, as ``common.readable`` shows it; any other
    character the stream cannot encode as ``\\uXXXX`` (backslashreplace)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start:error.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else
                   c.encode("ascii", "backslashreplace").decode("ascii") for c in bad), error.end


def _main(argv: list[str]) -> int:
    codecs.register_error(READABLE_ERRORS, _readable_errors)
    for stream in (sys.stdout, sys.stderr):  # a path or text with non-UTF-8 bytes prints escaped, never crashes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=READABLE_ERRORS)
    parser = build_parser()
    # `predict DIR [flags] -- TEXT...`: everything after "--" is a text, even "-5 stars" or "--json" (argparse
    # alone takes "--" only before the first TEXT, and leaves it unparsed after a flag)
    cut = argv.index("--") if "--" in argv and _COMMAND == "predict" else None
    args, extra = parser.parse_known_args(argv if cut is None else argv[:cut])  # a usage error exits with 2
    if cut is not None:
        args.texts += argv[cut + 1:]
    if extra and isinstance(getattr(args, "texts", None), list) and not any(e.startswith("-") for e in extra):
        args.texts += extra  # `predict DIR --json a b`: argparse ends the TEXT list at the first flag
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv  # for --workers, which reruns the command
    try:
        return args.func(args)
    except UserError as e:
        distributed = _workers()
        if not distributed.record_failure(f"{e}"):  # under --workers the launcher prints it, once
            print(f"rnnmath: error: {distributed.who()}{readable(str(e))}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"rnnmath: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("rnnmath: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `rnnmath predict ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.filename is None:
            return _internal_error(e)
        # a path the user gave (or one made from it) cannot be read, written or made: theirs to fix
        print(f"rnnmath: error: {readable(e.filename)}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        return _internal_error(e)


def _internal_error(e: Exception) -> int:
    """Print one line for an error that is rnnmath's own, not the user's; the traceback with RNNMATH_DEBUG=1."""
    distributed = _workers()
    if isinstance(e, distributed.WorkerFailed):
        print(f"rnnmath: error: {e}", file=sys.stderr)
        return e.exit_code
    if os.environ.get("RNNMATH_DEBUG") == "1":
        traceback.print_exc()
    message = " ".join(readable(str(e)).split()) or "(no message)"
    if distributed.lost_peer(e):  # another worker died first: its error is the one to read
        if distributed.LAUNCHED_BY_WORKERS not in os.environ:  # --workers reports it in one line
            print(f"rnnmath: error: {distributed.who()}stopped: another worker of the run is gone",
                  file=sys.stderr)
        return 1
    if not distributed.record_failure(f"internal error: {type(e).__name__}: {message}"):
        print(f"rnnmath: internal error: {type(e).__name__}: {message} (set RNNMATH_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
