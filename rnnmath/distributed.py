"""Data-parallel training over processes and machines with torch.distributed.

The engine is PyTorch's own: processes are started by torchrun (``torch.distributed.run``) or by
``rnnmath train --workers N`` through the same elastic launcher, they meet in a process group (gloo on CPU,
NCCL on GPU), and DistributedDataParallel averages their gradients after every backward pass. Everything
here is a no-op in a single process, so that path is exactly the plain training loop.

Shape letters: N examples, W processes (the world size), r this process's rank, B ``--batch-size`` per
process.

Sharding. Every process draws the same epoch order (seeded by seed and epoch, as in one process) and cuts it
into global batches of W·B rows; process r reads every W-th row of each, starting at the r-th::

    global_k = order[k·W·B : (k+1)·W·B]        # the batch one process with --batch-size W·B would read
    rows_r   = global_k[r::W]                    # this process's share: the union over r is global_k
    weight_r = W · |rows_r| / |global_k|         # 1 when the shares are equal
    DDP:  g  = (1/W) Σ_r ∇(weight_r · mean_{i ∈ rows_r} ℓ_i) = ∇ mean_{i ∈ global_k} ℓ_i

so W processes with batch B take the same steps as one process with batch W·B, up to the rounding of the
sums. A process whose share of the last global batch is empty (fewer rows than processes) reads one stand-in
row with weight 0: every process must run the same number of backward passes, or DDP's all-reduce waits
forever.

Writing. Only rank 0 writes (the model directory, checkpoints, history) and shows progress; the others wait
at a barrier after each epoch, so an epoch is committed when every process has passed it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

# torchrun sets these in every worker it starts
_RANK, _WORLD, _LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
LAUNCHED_BY_WORKERS = "RNNMATH_WORKERS_LAUNCHER"  # set by `launch` for the workers it starts


# -- who am I ----------------------------------------------------------------------------------------------
def launched() -> bool:
    """Whether this process was started by torchrun (or ``--workers``) as one of several workers."""
    return int(os.environ.get(_WORLD, "1")) > 1


def world_size() -> int:
    """W: the number of training processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """r: this process's rank, 0 to W-1 (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the one process that prints and writes files."""
    return rank() == 0


def who() -> str:
    """``"rank 1 of 2: "`` in a process started by torchrun, to start a message with; empty otherwise. Read
    from the environment, so it still answers after the process group is gone."""
    return f"rank {os.environ.get(_RANK, '0')} of {os.environ[_WORLD]}: " if launched() else ""


# -- the process group -------------------------------------------------------------------------------------
def backend(device: torch.device | str = "cpu") -> str:
    """NCCL for CUDA tensors (where torch was built with it), gloo for everything else."""
    if torch.device(device).type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


@contextmanager
def process_group(device: torch.device | str = "cpu", timeout_s: float = 1800) -> Iterator[None]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) for the duration of the block, and leave it cleanly; do nothing in a single process.

    ``timeout_s`` bounds how long a collective waits for a peer that is alive but stuck; a peer that dies
    closes its sockets, and the others fail at once.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; train with a single process")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get(_LOCAL_RANK, "0")))
    dist.init_process_group(backend(device), init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several processes, else ``model`` itself.

    Construction broadcasts rank 0's parameters to every process, so all start from the same weights.
    Keep a reference to the bare model for saving: the wrapper prefixes every name with ``module.``.
    """
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()


# -- the data each process reads ---------------------------------------------------------------------------
class Step(NamedTuple):
    """One optimisation step as this process sees it."""

    rows: Tensor  # (B_r,) indices of the examples this process reads
    weight: float  # scale of this process's mean loss, so that DDP's average is the global batch's mean
    count: int  # examples really trained on: len(rows), or 0 for a stand-in row


def shard(order: Tensor, batch_size: int) -> list[Step]:
    """This process's share of every step of an epoch whose examples come in ``order``; see the module
    docstring. In a single process: ``order.split(batch_size)`` with weight 1."""
    W, r = world_size(), rank()
    if W == 1:
        return [Step(rows, 1.0, len(rows)) for rows in order.split(batch_size)]
    steps = []
    for batch in order.split(W * batch_size):  # (≤ W·B,) each
        rows = batch[r::W]  # (≤ B,)
        if len(rows):
            steps.append(Step(rows, W * len(rows) / len(batch), len(rows)))
        else:
            steps.append(Step(batch[:1], 0.0, 0))
    return steps


def rows(n: int) -> slice:
    """This process's share of n examples to evaluate: every W-th, from the r-th (all n when alone)."""
    return slice(rank(), n, world_size())


def total(*values: float) -> list[float]:
    """Each value summed over all processes (float64); the values themselves in a single process."""
    if world_size() == 1:
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(sums)
    return sums.tolist()


def mean(x: Tensor) -> float:
    """The mean of ``x`` over the rows of all processes together (x.mean() in a single process)."""
    if world_size() == 1:
        return x.mean().item()
    s, n = total(x.sum().item(), len(x))
    return s / n


def seed_dropout(seed: int, epoch: int) -> None:
    """Give each process its own dropout draws for the epoch, from (seed, epoch, rank).

    Alone, the loop's one generator runs on from epoch to epoch and is checkpointed. With several processes
    only rank 0's checkpoint is written, so each epoch starts from a seed instead: a run resumed at an epoch
    boundary draws what an uninterrupted one would.
    """
    if world_size() > 1:
        torch.manual_seed(((seed * 1_000_003 + epoch) * 65_537 + rank()) % 2**63)  # manual_seed takes < 2**63


# -- failures ----------------------------------------------------------------------------------------------
def record_failure(message: str) -> bool:
    """Leave ``message`` where torchrun's agent looks for a worker's error (TORCHELASTIC_ERROR_FILE, in the
    JSON layout of torch.distributed.elastic's ErrorHandler), so that its summary shows it. True when the
    ``--workers`` launcher will print it, so the worker need not."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    if not os.path.exists(path):  # the first error is the cause
        document = {"message": message, "timestamp": str(int(time.time()))}
        with open(path, "w") as f:
            json.dump(document, f)
    return LAUNCHED_BY_WORKERS in os.environ


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process went away (that process's own
    failure is the one to report). gloo raises a plain RuntimeError that says so."""
    text = str(error)
    return launched() and (
        (dist.is_available() and isinstance(error, dist.DistError))
        or any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker"))
    )


class WorkerFailed(Exception):
    """A worker started by ``launch`` failed; the message names its rank, ``exit_code`` is its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def root_cause(failures: dict) -> tuple[int, object]:
    """The failure (rank, torch.distributed.elastic ProcessFailure) that stopped the run, by what it says
    about the cause: a recorded error, then death by a signal other than the agent's own SIGTERM/SIGINT
    (SIGKILL, SIGSEGV), then a bare exit code (such as a collective that lost its peer), then the agent's
    signals; ties go to the lowest rank."""
    stopped_by_agent = (-signal.SIGTERM, -signal.SIGINT)

    def order(item):
        r, failure = item
        if recorded(failure):
            return (0, r)
        if failure.exitcode < 0 and failure.exitcode not in stopped_by_agent:
            return (1, r)
        return (2 if failure.exitcode > 0 else 3, r)

    return min(failures.items(), key=order)


def recorded(failure) -> bool:
    """Whether the failed worker left an error file (torch marks a missing one with "<NONE>")."""
    return failure.error_file_data.get("message") not in (None, "", "<NONE>")


def describe(rank: int, failure, world: int) -> str:
    """One sentence on a failed worker, from its ProcessFailure."""
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return f"worker rank {rank} of {world} was killed by {name}; the run stopped"
    reason = f": {failure.message}" if recorded(failure) else " and no message"
    return f"worker rank {rank} of {world} stopped the run with exit code {failure.exitcode}{reason}"


def launch(workers: int, args: Sequence[str], entrypoint: Sequence[str] | None = None) -> None:
    """Run ``python -m rnnmath <args>`` (or ``entrypoint + args``) in ``workers`` local processes through
    torch.distributed's elastic launcher, the engine behind torchrun, and wait for them.

    Equivalent to ``torchrun --standalone --nproc_per_node=<workers> -m rnnmath <args>``. Workers get
    OMP_NUM_THREADS = cores / workers unless it is set. Raises ``WorkerFailed`` naming the rank that stopped
    the run.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    entrypoint = list(entrypoint or [sys.executable, "-m", "rnnmath"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    os.environ[LAUNCHED_BY_WORKERS] = "1"  # the workers leave failure reports to this process
    # the agent logs its configuration and each failure at length; the one line below says what matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="rnnmath-workers-") as logs:
        # rank 0 prints (progress, epochs); the others' output goes to files; a worker's error is printed
        # below, once, from the file it recorded (record_failure)
        quiet = {i: Std.ALL for i in range(1, workers)}
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=quiet),
        )
        try:
            elastic_launch(config, entrypoint[0])(*entrypoint[1:], *args)
        except ChildFailedError as e:
            r, failure = root_cause(e.failures)
            code = failure.exitcode if failure.exitcode > 0 else 1
            raise WorkerFailed(describe(r, failure, workers), code) from None
        except SignalException:  # Ctrl-C: the agent has stopped the workers
            raise KeyboardInterrupt from None
