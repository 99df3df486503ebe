"""Write full (layout-free) tensors into a live ZeRO-3 engine, at whatever (DP, TP) it runs.

Used to resume a checkpoint at another cluster size (weights and Adam moments, from
:class:`xfm_scale.zero_checkpoint.ZeroCheckpoint`) and to start from pretrained or exported weights
(weights only). Each rank cuts its TP shard (:mod:`xfm_scale.model.tp_layout`) and then its DP
slice exactly as ZeRO-3 partitions a parameter (flatten, zero-pad to DP x ceil(numel / DP), slice
d), and writes the slices into the optimizer's flat fp32 partitions and Adam state; the model's
own partitions are then refreshed from the fp32 ones.

This mirrors DeepSpeed's ZeRO-3 universal-checkpoint load
(``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``), which
partitions over DP only (megatron TP shards would all receive the full tensor) and copies the
first param group's hyperparameters into every group (ours differ: lr x2 for new parameters). It
is the only module besides parallel.py that touches ZeRO-3's internals.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Callable

import torch
import torch.distributed as dist

from xfm_scale.model import tp_layout

log = logging.getLogger(__name__)
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


def _local_slice(name: str, param, full: torch.Tensor, tp_rank: int, tp_world: int,
                 dp_rank: int, dp_world: int) -> torch.Tensor:
    spec = tp_layout.partition_spec(param)
    shard_shape = tuple(param.ds_shape)
    full_shape = list(shard_shape)
    if spec is not None:
        full_shape[spec[0]] *= tp_world
    full = fit_vocab_rows(name, full, full_shape[0])
    if tuple(full.shape) != tuple(full_shape):
        raise ValueError(f"{name}: the source has shape {tuple(full.shape)}, the model {tuple(full_shape)}; "
                         "the weights were made for another model configuration")
    shard = tp_layout.shard(full, *spec, tp_rank, tp_world) if spec is not None else full
    part = math.ceil(shard.numel() / dp_world)
    flat = shard.reshape(-1).to(torch.float32)
    flat = torch.cat([flat, flat.new_zeros(part * dp_world - flat.numel())])
    return flat.narrow(0, dp_rank * part, part)


@torch.no_grad()
def load_full_state(engine, source: Source, *, optimizer_state: bool = False, step_count: float | None = None,
                    param_groups: list[dict] | None = None) -> int:
    """Fill this rank's partitions from ``source``; returns how many parameters it gave.

    ``optimizer_state``: also the Adam moments (``exp_avg``, ``exp_avg_sq``) with ``step_count``;
    ``param_groups``: hyperparameters (lr, weight decay, betas...) per param group, in order."""
    from megatron.core import parallel_state as ps

    zero = engine.optimizer
    if not hasattr(zero, "fp32_partitioned_groups_flat"):
        raise ValueError("loading weights at another layout needs ZeRO stage 3 (a ds_configs/zero3_* or "
                         "cpu_fp32 config); this run uses another stage")
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "params_in_nvme_and_cpu", False):
        raise ValueError("loading a checkpoint at another layout with NVMe-swapped optimizer state is not "
                         "supported; resume at the saved (DP, TP), or use a config without offload to nvme")
    tp_rank, tp_world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dp_group = zero.dp_process_group
    dp_rank, dp_world = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
    keys = ("fp32", "exp_avg", "exp_avg_sq") if optimizer_state else ("fp32",)
    given = set()
    for group_id, params in enumerate(zero.fp16_groups):
        fp32_partition = zero.fp32_partitioned_groups_flat[group_id]
        state = zero.optimizer.state[fp32_partition]
        for key in keys:
            target = fp32_partition.data if key == "fp32" else state.get(key, torch.zeros_like(fp32_partition))
            offset = 0
            for param in params:
                name = zero.param_names[param]
                numel = param.partition_numel()
                full = source(name, key)
                if full is not None:
                    target.narrow(0, offset, numel).copy_(
                        _local_slice(name, param, full, tp_rank, tp_world, dp_rank, dp_world))
                    given.add(name)
                offset += numel
            if key != "fp32":
                state[key] = target
        if optimizer_state:
            state["step"] = _adam_step(zero.optimizer, step_count, fp32_partition.device)
    if param_groups is not None:
        for group, saved in zip(zero.optimizer.param_groups, param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
    _refresh_model_partitions(zero)
    persistent = getattr(zero, "persistent_parameters", [])
    if persistent:  # small parameters kept whole on every rank: rebuild them from the new partitions
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)
    return len(given)


def _adam_step(optimizer, step_count: int, device: torch.device):
    """Adam's ``step`` state as this optimizer keeps it: torch's Adam a float tensor (on the
    parameters' device when fused or capturable, else on the CPU); DeepSpeed's and Apex's an int."""
    if not type(optimizer).__module__.startswith("torch."):
        return int(step_count)
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(step_count), dtype=torch.float32, device=device if on_device else "cpu")


def _refresh_model_partitions(zero) -> None:
    """Copy the fp32 master partitions into the partitions the model computes with (as DeepSpeed
    does after a universal load)."""
    for group_id, fp32_partition in enumerate(zero.fp32_partitioned_groups_flat):
        if fp32_partition.numel() == 0:
            continue
        flat = zero.fp16_partitioned_groups_flat[group_id]
        flat.data.copy_(fp32_partition.data)
        for param, data in zip(zero.fp16_partitioned_groups[group_id],
                               zero.unflatten(flat, zero.fp16_partitioned_groups[group_id])):
            param.data = data.data
