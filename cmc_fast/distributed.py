"""Data-parallel training under torchrun: the process group, rank helpers, the collectives the trainer needs, and
a bounded-time failure path.

``torchrun --nproc-per-node P -m cmc_fast train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_from_env`` joins the group (NCCL when the run trains on CUDA, gloo on the CPU). Without those
variables (a plain ``python -m cmc_fast``) every helper answers as one process and no collective runs, so the
single-process path is unchanged.

Semantics (README, "Training on several GPUs"): ``--batch-size`` is the global batch; each step rank r takes the
r-th contiguous slice of the global batch a single process would take, so an all-gather of the slices in rank
order *is* that batch, and the memory banks, replicated on every rank, take the gathered (features, indices) in
the same order everywhere (a repeated index: the same last occurrence wins on every rank). Random streams: the
epoch order comes from the fit's own generator, the same on every rank; torch's generators (negatives, dropout,
flips) are reseeded on each rank at each epoch's start from (seed, stage, epoch, rank) (``epoch_seed``).

Failure. A rank that dies (killed, out of memory) closes its connections: gloo raises in the survivors' next
collective; a rank that hangs is caught by the process group's timeout (``CMC_FAST_DIST_TIMEOUT`` seconds,
default 600) and, at each epoch end, by a monitored barrier (gloo) that names the ranks missing. Either way the
survivors raise (``DistError``, or gloo's RuntimeError for a closed connection), which the CLI turns into one line
naming the rank, exit code 1. torchrun itself also stops the other workers when one exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib

import torch
import torch.distributed as dist

_BARRIER_GROUP = None  # a gloo group for monitored barriers (the world group when it is gloo)


def launched() -> bool:
    """True when torchrun (or another launcher) asked for more than one process."""
    return world_from_env() > 1


def world_from_env() -> int:
    """The number of processes the launcher started (1 without one), known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without one), valid before and after the group."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("CMC_FAST_DIST_TIMEOUT", "600"))


def local_device(requested: str) -> str:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` when the run asks for CUDA (``auto`` with a GPU,
    ``cuda``), otherwise what was asked (a rank cannot share ``cuda:N`` with the others)."""
    if not launched():
        return requested
    wants_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if wants_cuda else requested


def init_from_env(device: torch.device) -> None:
    """Join torchrun's process group once (NCCL for a CUDA device, gloo otherwise); nothing without torchrun."""
    global _BARRIER_GROUP
    if not launched() or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    # monitored_barrier exists on gloo only: NCCL runs keep a small gloo group beside the world group for it
    _BARRIER_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD


def shutdown() -> None:
    global _BARRIER_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _BARRIER_GROUP = None


def barrier(what: str) -> None:
    """Every rank waits for the others; a rank that does not arrive within the timeout is named in the error."""
    if not active():
        return
    try:
        dist.monitored_barrier(group=_BARRIER_GROUP or dist.group.WORLD,
                               timeout=datetime.timedelta(seconds=timeout_s()), wait_all_ranks=True)
    except RuntimeError as exc:
        raise dist.DistError(f"rank {rank()}: {what}: another process did not arrive ({exc})") from exc


@contextlib.contextmanager
def main_first(what: str):
    """Rank 0 runs the block first (it writes shared files: synthetic data, image cache, pre-trained weights);
    the others run it after, reading what rank 0 wrote."""
    if not is_main():
        barrier(what)
    yield
    if is_main():
        barrier(what)


def local_slice(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch is divisible by the world size)."""
    return rows.tensor_split(world())[rank()] if active() else rows


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-shaped ``x`` concatenated along dim 0 in rank order (no gradient)."""
    if not active():
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world()
    return x


def broadcast_(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of ``x`` everywhere, in place."""
    if active():
        dist.broadcast(x, src=0)
    return x


def sharded_batches(outputs_of, batches: list) -> list[torch.Tensor]:
    """``[outputs_of(b) for b in batches]`` with the batches dealt round-robin over the ranks and the outputs
    gathered back in order: each batch is computed exactly as one process computes it (same rows, same batch
    shape, so bit-identical outputs), on 1/world of the work. Outputs: tensors whose first dim is the batch's
    rows; their other dims must match across batches."""
    if not active():
        return [outputs_of(b) for b in batches]
    r, w = rank(), world()
    sizes = [b[0].numel() for b in batches]  # eval_batches: (host rows, device rows)
    local = [outputs_of(b) for b in batches[r::w]]
    mine = torch.cat(local) if local else None
    per_rank = [sum(sizes[q::w]) for q in range(w)]
    # every rank holds a batch unless there are fewer batches than ranks (the same on every rank): only then must
    # the outputs' shape travel by an object all-gather
    like = mine[:0] if len(batches) >= w else _template(mine)
    padded = like.new_zeros((max(per_rank), *like.shape[1:]))
    if mine is not None:
        padded[:mine.shape[0]] = mine
    gathered = all_gather_cat(padded).split(max(per_rank))
    parts = [g[:n].split(sizes[q::w]) for q, (g, n) in enumerate(zip(gathered, per_rank))]
    return [parts[j % w][j // w] for j in range(len(batches))]


def _template(mine: torch.Tensor | None) -> torch.Tensor:
    """An empty tensor with the outputs' trailing shape, dtype and device, agreed by all ranks (a rank with no
    batch learns them from rank 0)."""
    meta = [None if mine is None else (tuple(mine.shape[1:]), mine.dtype, str(mine.device))]
    spec = [None] * world()
    dist.all_gather_object(spec, meta[0])
    shape, dtype, device = next(s for s in spec if s is not None)
    return torch.empty((0, *shape), dtype=dtype, device=mine.device if mine is not None else device)


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The per-rank seed of torch's generators for one epoch of a data-parallel stage: negatives, dropout and
    flips differ across ranks, and a resume at an epoch boundary (with the same world size) draws the same."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + epoch * 104_729 + rank()) % (2**63 - 1)


def wrap(stage) -> dict:
    """Put every module of ``stage`` that trains behind DistributedDataParallel: the stage's attributes that
    hold them point at the wrappers (its forward calls go through DDP) while ``stage.modules`` keeps the plain
    modules (checkpoint keys unchanged). Returns what ``unwrap`` restores. DDP broadcasts rank 0's parameters
    here; the buffers (banks, BatchNorm statistics) are broadcast once here too, and never per step (no
    forward buffer sync): the banks stay in sync through the gathered updates, not a copy of N x d."""
    if not active():
        return {}
    from torch.nn.parallel import DistributedDataParallel as DDP

    trained = {id(m) for m in stage.modules.values() if any(p.requires_grad for p in m.parameters())}
    saved = {}
    for name, value in list(vars(stage).items()):
        if isinstance(value, torch.nn.Module) and id(value) in trained:
            device_ids = [value_device(value).index] if value_device(value).type == "cuda" else None
            saved[name] = value
            for buf in value.buffers():
                broadcast_(buf)
            setattr(stage, name, DDP(value, device_ids=device_ids, **_NO_BUFFER_SYNC,
                                     find_unused_parameters=getattr(stage, "ddp_find_unused", False)))
    return saved


def _no_buffer_sync() -> dict:
    """DDP's switch for no buffer copy before each forward: ``forward_sync_buffers`` (newer torch, which
    deprecates ``broadcast_buffers``) or ``broadcast_buffers``."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    names = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _no_buffer_sync()


def unwrap(stage, saved: dict) -> None:
    for name, module in saved.items():
        setattr(stage, name, module)


def value_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


_LOST_PEER = ("gloo", "nccl", "closed by peer", "connection reset", "timed out", "timeout", "monitoredbarrier",
              "socket")


def is_collective_failure(exc: BaseException) -> bool:
    """A failed collective under an active group: torch's DistError, or the RuntimeError gloo raises when a peer
    closed its connection (a dead rank) or a wait timed out."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(k in str(exc).lower() for k in _LOST_PEER))


def failure_message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {rank()} of {world()}: a collective failed ({first[:300]}): another process died or stopped "
            f"answering within {timeout_s():.0f}s (CMC_FAST_DIST_TIMEOUT); the job stops. Continue from the last "
            f"checkpoint with `torchrun ... -m cmc_fast train --resume DIR`")
