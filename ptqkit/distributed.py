"""Several processes on one run (`torchrun --nproc_per_node N ptq_main.py --config ...`): gloo on CPU, NCCL on GPU.

What is split and what is kept the same:
- calibration images are sharded (rank r takes calibration batches r, r + N, ...); every process holds and caches
  only its shard, so the unit caches shrink N-fold;
- observers (ptqkit.quant.prepare.merge_ranges): MinMax and MSE ranges are unions of per-batch ranges, so each process observes its batches and the
  ranges are merged with an all-reduce (min of minima, max of maxima): the same ranges one process gets. The
  histogram MSE observer's histograms are gathered and summed (bins of power-of-two widths merge exactly), and the
  range is searched over all of them: the search one process makes over the same values, on a bin layout that may
  be up to a power of two coarser. EMA observers depend on the order of batches and are refused under torchrun
  (`quant.a.observer`);
- a unit's activation steps are re-initialised on the same images in every process (their cached inputs are
  gathered first), so all processes start each unit from the same steps;
- reconstruction: every process draws batch / N images from its shard per iteration; the gradients of the
  rounding variables and steps are averaged over processes before each step, so the optimisers stay in lockstep
  and one iteration sees batch images in all. Losses and the unit errors are averaged over processes;
- evaluation is sharded and the counts summed; only rank 0 writes files and logs.
The result is the single-process result up to the order in which images are drawn and drop masks fall.
"""
from __future__ import annotations

import contextlib
import os

import mqbench.utils.utils as mq_utils
import torch
import torch.distributed as dist

from ptqkit.errors import ConfigError

MERGEABLE_OBSERVERS = ("minmax", "mse", "hist_mse")
ReduceOp = dist.ReduceOp


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> torch.device | None:
    """Join the process group torchrun prepared; return the device of this process (None: not launched).
    `runtime.device: cuda` where no GPU is visible is refused, as in a single process (one line, exit 2), not run
    on the CPU over gloo."""
    if not launched():
        return None
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cpu or auto (no CUDA device is visible)", device_name)
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        # This process's GPU before the NCCL group: the communicator is then built on it, not on GPU 0 by
        # every process (device_id binds it at once).
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


@contextlib.contextmanager
def observers_stay_local():
    """Inside: MQBench's observers compute their scales from this process's ranges alone.

    MQBench decides at import time whether to average every observer's scale and zero point over the processes
    (`mqbench.utils.utils.USE_DDP`, true when a process group already exists then) and does it inside each
    observed forward: a collective hidden in the model that deadlocks when processes observe different numbers of
    batches, and an average of scales where the ranges should be merged. Ranges are merged here instead
    (ptqkit.quant.prepare.merge_ranges: their union, as one process would get them). This is the one place that
    sets MQBench's flag, and it is restored on exit."""
    saved = mq_utils.USE_DDP
    mq_utils.USE_DDP = False
    try:
        yield
    finally:
        mq_utils.USE_DDP = saved


def shutdown() -> None:
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def shard_batches(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's calibration batches: r, r + N, r + 2N, ... of the whole list."""
    n = world_size()
    if n == 1:
        return images
    starts = range(rank() * batch_size, len(images), n * batch_size)
    return torch.cat([images[s:s + batch_size] for s in starts]) if starts else images[:0]


def shard_indices(indices: list) -> list:
    return indices[rank()::world_size()]


def backend_device() -> torch.device:
    """Where the process group's collectives take their tensors: this process's GPU for NCCL, the CPU for gloo."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_backend(t: torch.Tensor) -> torch.Tensor:
    """`t` on the backend's device (itself when it is there already). Every collective below goes through this:
    NCCL refuses CPU tensors, gloo CUDA ones (tests/test_distributed.py checks each collective does)."""
    return t.to(backend_device())


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    on_backend = to_backend(t)
    dist.all_reduce(on_backend, op=op)
    if on_backend is not t:
        t.copy_(on_backend)
    return t


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In place: the sum (or `op`) of `t` over every process, wherever `t` lives."""
    if world_size() > 1:
        _reduce(t, op or dist.ReduceOp.SUM)
    return t


def average(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        _reduce(t, dist.ReduceOp.SUM)
        t /= world_size()
    return t


def average_gradients(params) -> None:
    """Mean of each gradient over processes, in one all-reduce (a missing gradient counts as zero)."""
    if world_size() == 1:
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    average(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def gather(t: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of every process's `t` (first dimension may differ), where `t` lives.
    Everything stays on the backend's device (the GPU for NCCL); the sizes come to the host in one read."""
    if world_size() == 1:
        return t
    sizes = [to_backend(torch.zeros(1, dtype=torch.long)) for _ in range(world_size())]
    dist.all_gather(sizes, to_backend(torch.tensor([len(t)])))
    counts = torch.cat(sizes).cpu().tolist()       # the padding's length must be known on the host: one read
    mine = to_backend(t)
    padded = to_backend(mine.new_zeros((max(counts),) + tuple(t.shape[1:])))
    padded[:len(t)] = mine
    parts = [to_backend(torch.empty_like(padded)) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(t.device)


def all_gather_object(obj) -> list:
    """Every process's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
