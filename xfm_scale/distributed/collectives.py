"""Small collectives the trainer, checkpoints and tools share: every rank agrees, every rank's
object, rank 0's object. Rare and small (flags, counters, diagnoses), so plain torch.distributed."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(condition: bool) -> bool:
    """True on every rank when ``condition`` holds on every rank (collective), so that ranks take
    the same branch into code with collectives of its own."""
    flag = torch.tensor([float(condition)], device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def gather_objects(obj: Any, group=None) -> list:
    """Every rank's ``obj`` (small: diagnoses and counters, on rare events), in rank order."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: a choice every rank must make alike (a shared folder's
    listing may differ between nodes)."""
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(condition: bool) -> bool:
    """True on every rank when ``condition`` holds on some rank (collective)."""
    return not all_ranks_agree(not condition)


def sum_over_ranks(value: float, group=None) -> float:
    """The sum of ``value`` over the ranks of ``group`` (default: all)."""
    total = torch.tensor([float(value)], device=collective_device())
    dist.all_reduce(total, group=group)
    return float(total.item())
