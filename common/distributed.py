"""Data parallelism over torchrun's processes (PyTorch DDP): the few collective steps the loops take.

`torchrun --nproc_per_node N script.py ...` starts N processes (ranks) with RANK, WORLD_SIZE and
LOCAL_RANK set; each samples its share of the batch, DDP averages the gradients, and these helpers
make the batch statistics global. `python script.py` is one process with no process group: every
function below is then the identity (the same numbers, bit for bit).
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

def setup(use_cuda, timeout_minutes=180.0):
    """(rank, world_size, device): NCCL and one GPU per rank on GPUs, gloo on CPUs. `timeout_minutes`: how long a
    rank waits in a collective for the others (rank 0 alone evaluates and writes checkpoints, minutes on a large
    model, while the others wait, so far longer than PyTorch's default: 10 min NCCL, 30 gloo)."""
    cuda = use_cuda and torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's own store, the same across restarts
        # (--max-restarts): the keys of each launch under their own prefix, else a relaunched rank may read a dead
        # rank's address from the launch before and fail to connect (pytorch/pytorch#167288)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.PrefixStore(f"launch_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout))
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:  # this rank's GPU before the process group, which NCCL then binds to it (device_id) at once
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, store=store,
                            **({"rank": rank, "world_size": world_size} if store else {}),
                            **({"device_id": device} if cuda else {}))
    return dist.get_rank(), dist.get_world_size(), device


def mean(x):
    """x.mean() over every rank's x (the ranks hold equal shares of the batch)."""
    x = x.float().mean()
    if dist.is_initialized():
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def total(x):
    """x.sum() over every rank's x, on the device (no read from it)."""
    x = x.float().sum()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def sum_over_ranks(x):
    """x, a tensor of counts made on the CPU, summed over the ranks (NCCL reduces on this rank's GPU)."""
    if dist.is_initialized():
        x = x.to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
        dist.all_reduce(x)
    return x.cpu()


def masked_mean(x, mask):
    """The mean of x over the masked entries of every rank: sums and counts are all-reduced."""
    return ratio_of_sums(x * mask, mask)


def ratio_of_sums(numerator, denominator):
    """numerator.sum() / denominator.sum(), each summed over every rank (a mean over tokens from sums over them)."""
    sums = torch.stack([numerator.sum(), denominator.sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums[0] / sums[1].clamp(min=1)


def masked_var(x, mask):
    """The (population) variance of x over the masked entries of every rank."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked entries of every rank: 1 for a critic that predicts
    every return, 0 for one no better than the returns' mean, below 0 for worse."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def tokens_per_rank(mask):
    """The masked tokens of every rank, counted (at least 1), divided by the number of ranks: a loss summed over
    a rank's tokens and divided by it is, once DDP has averaged the ranks' gradients, the mean over all tokens."""
    total = mask.sum().float()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.clamp(min=1) / (dist.get_world_size() if dist.is_initialized() else 1)


def broadcast(obj):
    """Rank 0's object (a list, a number...) on every rank."""
    if dist.is_initialized():
        objects = [obj]
        dist.broadcast_object_list(objects, src=0)
        obj = objects[0]
    return obj


def gather(obj):
    """Every rank's object, in rank order (one process: [obj])."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


@contextlib.contextmanager
def together():
    """Rank 0 writes inside the block (`if master:`) while the others wait at its end; a write that fails there
    (SystemExit: a full disk) stops every rank, rank 0 with its line, the others with exit status 1, so that none is
    left waiting in a collective for a rank that has gone."""
    failure = None
    try:
        yield
    except SystemExit as e:
        failure = e
    if sum_over_ranks(torch.tensor(int(failure is not None))) > 0:  # (every rank's: also the barrier)
        raise failure or SystemExit(1)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
