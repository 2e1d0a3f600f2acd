"""Data-parallel meta-training on torch.distributed (NCCL on CUDA, gloo on CPU).

Every rank holds the same meta-parameters, adapts to its own T tasks and computes the mean query loss
over them; ``all_reduce_gradients`` sums the meta-gradients and divides by the world size W. With equal
T per rank that is the meta-gradient of the mean over all W*T tasks, exactly what one process computes
on the concatenated batch, so the meta-optimizer takes the same step on every rank.

Why a bucketed all_reduce and not DistributedDataParallel: a meta-step has a single backward whose
meta-gradient (on the exact-reverse path) comes out of one autograd node all at once, so DDP's overlap
of communication with the backward buys nothing here, while its hooks, buffer broadcasts and bucket
views would wrap the flat parameter buffer and the CUDA-graph capture of BatchedMAML. One flat buffer
per (dtype, device), one all_reduce each, is the whole communication of a step.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every collective
has a timeout (``METAFAST_DIST_TIMEOUT`` seconds, default 120), so a dead or hung rank ends the job with
a ``DistributedError`` on the others instead of a hang (gloo raises it in Python; on NCCL the
watchdog aborts a timed-out collective and ends the process with its own error, and torchrun then
stops the remaining ranks).

Leaving: the ranks leave the process group together (a barrier on a gloo group of its own, with its own
timeout ``METAFAST_DIST_LEAVE_TIMEOUT``, default 300 s: rank 0 may still evaluate and write while the
others wait) after a completed job, after Ctrl-C (every rank stops after the same step) and after an
error on this rank (the others reach the barrier once their pending collective fails). Only a rank
whose collective already failed shuts down at once: a peer is gone or hung. A rank that destroys its
gloo pairs while a peer still uses them, or gloo work objects that outlive the process group (kept
alive by the frames of an exception until interpreter shutdown), can abort the process in C++
("terminate called without an active exception"); hence the barrier, and DistributedError carries
no frames of the failed collective.
"""
import datetime
import gc
import hashlib
import os
import traceback
import warnings
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_LEAVE_TIMEOUT_S = 300.0
_ENV_TIMEOUT = "METAFAST_DIST_TIMEOUT"
_ENV_LEAVE_TIMEOUT = "METAFAST_DIST_LEAVE_TIMEOUT"
_timeout_s = DEFAULT_TIMEOUT_S
_leave_timeout_s = DEFAULT_LEAVE_TIMEOUT_S
_leave_group = None  # the gloo group of the leave barrier (its own timeout)


class DistributedError(RuntimeError):
    """A collective failed: another rank died, raised or did not answer within the timeout."""


class LeaveWarning(UserWarning):
    """The ranks could not leave the process group together (the leave barrier failed or timed out)."""


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1, 1)


def launched() -> bool:
    """True when the environment describes a multi-process job (torchrun with WORLD_SIZE > 1)."""
    return env_world_size() > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0, 0)


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints, writes files and evaluates."""
    return rank() == 0


def timeout_s() -> float:
    return _timeout_s


def leave_timeout_s() -> float:
    return _leave_timeout_s


def device_for(device: torch.device) -> torch.device:
    """On CUDA each rank uses GPU LOCAL_RANK; a CPU device is returned unchanged."""
    if device.type == "cuda" and device.index is None and is_initialized():
        return torch.device("cuda", local_rank())
    return device


def init(device: str = "auto", timeout: Optional[float] = None,
         leave_timeout: Optional[float] = None) -> Tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world size).

    device: "cuda" -> NCCL (and this rank's GPU LOCAL_RANK becomes current), "cpu" -> gloo,
    "auto" -> NCCL when CUDA is available. timeout: seconds a collective may wait for the other ranks
    (default ``METAFAST_DIST_TIMEOUT`` or 120). leave_timeout: seconds the ranks wait for each other
    when they leave (default ``METAFAST_DIST_LEAVE_TIMEOUT`` or 300; at least ``timeout``, so a rank
    whose error ended its work waits until the others' pending collective has failed).
    """
    global _timeout_s, _leave_timeout_s, _leave_group
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")
    if timeout is None:
        timeout = _env_seconds(_ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    if leave_timeout is None:
        leave_timeout = max(_env_seconds(_ENV_LEAVE_TIMEOUT, DEFAULT_LEAVE_TIMEOUT_S), float(timeout))
    if not (isinstance(leave_timeout, (int, float)) and leave_timeout > 0):
        raise ValueError(f"leave_timeout: expected seconds > 0, got {leave_timeout!r}")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if is_initialized():
        return rank(), world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed init needs the environment variables {missing} (launch with torchrun)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank())
    _timeout_s = float(timeout)
    kwargs = {}
    if use_cuda:  # binds NCCL to this rank's GPU up front (torch >= 2.3)
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=_timeout_s), **kwargs)
    _leave_timeout_s = float(leave_timeout)
    # every rank creates it (new_group is collective); gloo, so that NCCL jobs get the same barrier (a
    # torch build without gloo leaves on the default group and its timeout)
    _leave_group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_leave_timeout_s))
                    if dist.is_gloo_available() else dist.group.WORLD)
    return rank(), world_size()


def shutdown() -> None:
    """Leave the process group at once (safe to call twice or when none exists). Garbage is collected
    first, so gloo work objects in unreachable cycles are freed while their process group still exists."""
    global _leave_group
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _leave_group = None


@contextmanager
def session(device: str = "auto", timeout: Optional[float] = None) -> Iterator[Tuple[int, int]]:
    """``with session(): ...`` - init from the environment and leave at the end, also on errors and
    Ctrl-C (see :func:`leaving`). A single process (no WORLD_SIZE > 1) runs the body without a process
    group: yields (0, 1)."""
    if not launched() or is_initialized():
        yield rank(), world_size()
        return
    init(device, timeout)
    with leaving():
        yield rank(), world_size()


@contextmanager
def leaving() -> Iterator[None]:
    """Leave the process group when the block ends: together with the other ranks (:func:`leave`) on
    success, on Ctrl-C and on this rank's own error; at once (:func:`shutdown`) when a collective failed,
    since a peer is gone or hung. The frames of the propagating exception are cleared first, so no
    collective's objects outlive the process group."""
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        if _collective_failed(e):
            shutdown()
        else:
            leave()
        raise
    leave()


def leave() -> None:
    """Leave the process group together with the other ranks: a barrier with its own timeout
    (:func:`leave_timeout_s`), then :func:`shutdown`. A barrier that fails or times out is reported as a
    :class:`LeaveWarning` (this rank's work is done; the process group is destroyed all the same)."""
    if is_initialized() and world_size() > 1 and _leave_group is not None:
        failure = None
        try:
            dist.barrier(group=_leave_group)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the leave timeout passed
            failure = f"{type(e).__name__}: {_first_line(e)}"
        if failure is not None:
            warnings.warn(f"rank {rank()}/{world_size()}: the ranks did not leave the process group together "
                          f"(leave barrier, {_leave_timeout_s:g} s timeout): {failure}", LeaveWarning, stacklevel=2)
    shutdown()


def _collective_failed(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DistributedError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def task_seed(seed: int, rank_: Optional[int] = None, iteration: Optional[int] = None) -> int:
    """A 63-bit seed for the tasks of ``rank_`` (default: this rank) at ``iteration``.

    Derived by hashing, so neighbouring seeds/ranks/iterations give unrelated streams (seed + rank would
    make rank 1 of seed 0 replay rank 0 of seed 1), and any rank can recompute any iteration's seed:
    a resumed run needs no per-rank generator state.
    """
    r = rank() if rank_ is None else rank_
    key = f"metafast-tasks:{int(seed)}:{int(r)}:{'' if iteration is None else int(iteration)}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def shard_bounds(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """Rows [start, stop) of a batch of ``n`` rows that ``rank_`` (default: this rank) takes: contiguous,
    balanced shards (sizes differ by at most one), together covering every row once."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < w:
        raise ValueError(f"a batch of {n} rows cannot be split across {w} processes (each needs at least one row)")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard_scale(local: int, n: int) -> float:
    """Factor for the mean loss over a rank's ``local`` of ``n`` rows such that ``all_reduce_gradients``
    (a mean over ranks) yields the gradient of the mean over all ``n`` rows, also for unequal shards:
    sum_r (local_r / n) g_r = mean_r (W local_r / n) g_r."""
    return world_size() * local / n


def _groups(tensors: Sequence[torch.Tensor]) -> Dict[Tuple[torch.dtype, torch.device], List[int]]:
    groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/NCCL report a dead peer or a timeout as RuntimeError (DistBackendError)
        message = (f"rank {rank()}/{world_size()}: {what} failed - another rank exited, raised or did not reach "
                   f"it within the {_timeout_s:g} s timeout ({type(e).__name__}: {_first_line(e)})")
    # raised outside the except clause, with neither cause nor context: the backend's exception holds
    # the frames of the failed collective (its work object, the process group), which must not outlive
    # the process group while this error travels up to the interpreter's exit
    raise DistributedError(message)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its mean over the ranks. One flat buffer and one all_reduce per
    (dtype, device); a no-op in a single process."""
    if not is_initialized() or world_size() == 1:
        return
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors: expected tensors, got {type(t).__name__}")
    w = world_size()
    for (dtype, _), idx in _groups(tensors).items():
        parts = [tensors[i] for i in idx]
        flat = torch.cat([p.detach().reshape(-1) for p in parts])
        _collective("all_reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        if dtype.is_floating_point or dtype.is_complex:
            flat.div_(w)
        else:
            flat.floor_divide_(w)
        offset = 0
        with torch.no_grad():
            for p in parts:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n


def all_reduce_gradients(params: Iterable[torch.Tensor], also: Sequence[torch.Tensor] = ()) -> None:
    """Average ``p.grad`` of every parameter over the ranks (bucketed: one all_reduce per dtype/device).

    A parameter without a gradient counts as a zero gradient on that rank (and gets one), so every rank
    sends buffers of the same size. ``also``: extra tensors averaged in the same collectives (e.g. the
    detached loss for logging).
    """
    params = [p for p in params if p.requires_grad]
    if not is_initialized() or world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in params] + list(also))


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` to every rank (so all start identical)."""
    if not is_initialized() or world_size() == 1:
        return
    tensors = list(module.parameters()) + [b for b in module.buffers()]
    seen, unique = set(), []
    for t in tensors:  # the same storage view listed twice (tied weights) is sent once
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    for _, idx in _groups(unique).items():
        parts = [unique[i] for i in idx]
        flat = torch.cat([p.detach().reshape(-1) for p in parts])
        _collective("broadcast", dist.broadcast, flat, src=src)
        offset = 0
        with torch.no_grad():
            for p in parts:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        _collective("barrier", dist.barrier)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected seconds, got {raw!r}") from None


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}: expected an integer >= {minimum}, got {value}")
    return value
