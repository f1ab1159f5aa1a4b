"""Helpers every tool of rnnmath shares (the classifier, and later the language model, serving, export):
atomic file writes, classification metrics and the format of a duration.

No torch here: the CLI imports this module at start-up, and ``rnnmath --help`` must stay fast.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


# -- files -------------------------------------------------------------------------------------------------
def readable(text: str | bytes | os.PathLike) -> str:
    """A path or text as a person can read it: bytes that are not UTF-8 (which Python keeps in a ``str`` as
    lone surrogates U+DC80-U+DCFF, see PEP 383) are shown as ``\\xe9``, the rest as it is.
    ``readable("caf\\udce9.tsv") == "caf\\\\xe9.tsv"``."""
    text = os.fsdecode(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte stands for (U+D800-U+DC7F, U+DD00-U+DFFF)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_bytes(document, **options) -> bytes:
    """``json.dumps(document, ensure_ascii=False, **options)`` as UTF-8 bytes, plus a newline. A string holding
    non-UTF-8 bytes of a path (lone surrogates, see ``readable``) cannot be UTF-8: then the document is
    written with ASCII escapes (``"\\udce9"``), which ``json.loads`` reads back to the same string, so
    ``os.fsencode`` gives the path's original bytes."""
    import json

    try:
        return (json.dumps(document, ensure_ascii=False, **options) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(document, ensure_ascii=True, **options) + "\n").encode("ascii")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the old file or the new one:
    a temporary file in the same directory, fsync, os.replace, then fsync of the directory.

    Raises UserError (naming the path) when the directory cannot be made or the file cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only or misnamed --out, a full disk: the user's to fix, so not a traceback
        raise UserError(f"{readable(path)}: cannot be written ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{readable(path)}: cannot be written ({e.strerror or e}); the previous file is "
                            "kept") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- metrics -----------------------------------------------------------------------------------------------
MAX_CONFUSION_CLASSES = 100  # a larger confusion matrix is not stored in history.json (C² numbers)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix
    (``confusion[i][j]``: examples of class i predicted as class j). A ratio with a zero denominator is 0.

    Macro averages follow scikit-learn's ``precision_recall_fscore_support(average="macro")``: the mean over
    the classes present in ``y_true`` or ``y_pred`` (``macro_labels``), so a class the model knows but that
    neither occurs nor is predicted in the evaluated data does not count as an F1 of 0. ``per_class`` still
    lists every class of ``labels``.
    """
    C = len(labels)
    confusion = [[0] * C for _ in range(C)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    n = len(y_true)
    per_class = {}
    present = sorted(set(y_true) | set(y_pred))
    for c, label in enumerate(labels):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(C))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}

    def macro(key: str) -> float:
        return sum(per_class[labels[c]][key] for c in present) / len(present) if present else 0.0

    return {
        "n": n,
        "accuracy": sum(confusion[c][c] for c in range(C)) / n if n else 0.0,
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "macro_labels": [labels[c] for c in present],
        "per_class": per_class,
        "labels": list(labels),
        "confusion": confusion,
    }


def compact_metrics(metrics: dict) -> dict:
    """``metrics`` for a file that must stay small: without the confusion matrix beyond
    MAX_CONFUSION_CLASSES classes (it holds C² numbers)."""
    if len(metrics.get("labels", ())) > MAX_CONFUSION_CLASSES:
        return {k: v for k, v in metrics.items() if k != "confusion"}
    return metrics


# -- time --------------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``: minutes:seconds, with hours when needed."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# -- threads -----------------------------------------------------------------------------------------------
def default_threads() -> int:
    """Threads for torch's intra-op pool when ``--threads`` is not given: the CPUs this process may run on
    that the 1-minute load average leaves idle, at least 1 (``OMP_NUM_THREADS``, when set, wins).

    Why: torch starts one thread per core, and beside another busy process they fight for the cores; on the
    2-core machine of docs/threads.md a small model trained 3x slower that way than with one thread. Counting
    busy cores from the load average is a heuristic: it lags by about a minute."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform.processor()`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
