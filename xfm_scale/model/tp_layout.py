"""Full <-> tensor-parallel-shard conversion, driven by megatron's parameter attributes.

A TP-split parameter carries ``tensor_model_parallel=True``, ``partition_dim`` and
``partition_stride``; every other parameter is replicated on all TP ranks. With stride s and TP
size t, the full tensor is cut into s*t equal chunks along the dim and rank r holds chunks
r, r+t, r+2t, ... (megatron's CPU initialisation), so fused QKV (s=3) stays [q; k; v] when merged.
Used by the TP parity tests now, and by export/import and resharding.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn


def partition_spec(param: torch.Tensor) -> tuple[int, int] | None:
    """(dim, stride) of a TP-split parameter, None for a replicated one."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None


def model_partition_specs(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    return {name: partition_spec(p) for name, p in model.named_parameters()}


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    chunks = full.chunk(stride * world, dim=dim)
    if len(chunks) != stride * world or any(c.shape != chunks[0].shape for c in chunks):
        raise ValueError(f"dim {dim} of size {full.shape[dim]} does not split into {stride}x{world} equal chunks")
    return torch.cat(chunks[rank::world], dim=dim).clone()


def merge(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def shard_state_dict(specs: dict[str, tuple[int, int] | None], full: dict[str, torch.Tensor],
                     rank: int, world: int) -> dict[str, torch.Tensor]:
    """This TP rank's state dict from a full one (replicated entries are shared as-is)."""
    return {name: (shard(t, *specs[name], rank, world) if specs.get(name) else t) for name, t in full.items()}


def merge_state_dicts(specs: dict[str, tuple[int, int] | None],
                      per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full state dict from every TP rank's (in TP-rank order)."""
    return {name: (merge([sd[name] for sd in per_rank], *specs[name]) if specs.get(name) else t)
            for name, t in per_rank[0].items()}


Source = Callable[[str, str], "torch.Tensor | None"]
"""(parameter name, state key: fp32 | exp_avg | exp_avg_sq) -> the full tensor, or None to keep."""
VOCAB_PARAMETERS = re.compile(r"(word_embeddings\.weight|mlm_head\.bias)$")
"""Parameters with one row per vocabulary entry, padded to a multiple of 128 x TP."""


def fit_vocab_rows(name: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad (with zeros) or cut the padding rows of a vocabulary parameter to ``rows``."""
    if tensor.shape[0] == rows or not VOCAB_PARAMETERS.search(name):
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
