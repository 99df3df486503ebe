"""Write full (layout-free) tensors into a live ZeRO-3 or ZeRO-2 engine, at whatever (DP, TP) it runs.

Used to resume a checkpoint at another cluster size or ZeRO stage (weights and Adam moments, from
:class:`xfm_scale.checkpoint.reader.ZeroCheckpoint`) and to start from pretrained or exported weights
(weights only). Each rank cuts its TP shard (:mod:`xfm_scale.model.tp_layout`), then the part its
optimizer partition holds, and writes it into the flat fp32 partitions and Adam state:

* ZeRO-3: slice d exactly as ZeRO-3 partitions a parameter (flatten, zero-pad to
  DP x ceil(numel / DP), slice d); the model's own partitions are then refreshed from the fp32 ones;
  a sub-group swapped to NVMe (ZeRO-Infinity) is swapped in for the write and out again;
* ZeRO-2: the fragment DeepSpeed's ``_hp_mapping`` places in this rank's partition of the param
  group; the (unpartitioned) parameter itself is written whole.

This mirrors DeepSpeed's ZeRO-3 universal-checkpoint load
(``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``), which
partitions over DP only (megatron TP shards would all receive the full tensor) and copies the
first param group's hyperparameters into every group (ours differ: lr x2 for new parameters).

Remove when: DeepSpeed's universal load partitions over TP as well and keeps each param group's
hyperparameters (not in 0.19.8).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from xfm_scale.engine import internals
from xfm_scale.engine.checkpoint_io import regather_persistent_parameters
from xfm_scale.model import tp_layout
from xfm_scale.model.layers import tp_rank, tp_size
from xfm_scale.model.tp_layout import Source, fit_vocab_rows

FEATURE = "writing full tensors into a live engine (engine.full_state)"

log = logging.getLogger(__name__)


def _tp_shard(name: str, param, shard_shape: tuple[int, ...], full: torch.Tensor, tp_rank: int,
              tp_world: int) -> torch.Tensor:
    """This TP rank's shard of ``full`` (vocabulary rows fitted), checked against the model's shape."""
    spec = tp_layout.partition_spec(param)
    full_shape = list(shard_shape)
    if spec is not None:
        full_shape[spec[0]] *= tp_world
    full = fit_vocab_rows(name, full, full_shape[0])
    if tuple(full.shape) != tuple(full_shape):
        raise ValueError(f"{name}: the source has shape {tuple(full.shape)}, the model {tuple(full_shape)}; "
                         "the weights were made for another model configuration")
    return tp_layout.shard(full, *spec, tp_rank, tp_world) if spec is not None else full


def _zero3_slice(shard: torch.Tensor, dp_rank: int, dp_world: int) -> torch.Tensor:
    """DP slice d of a shard as ZeRO-3 partitions it: flatten, zero-pad to DP x ceil(numel / DP)."""
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
    zero = engine.optimizer
    keys = ("fp32", "exp_avg", "exp_avg_sq") if optimizer_state else ("fp32",)
    if internals.is_zero3(zero):
        given, partitions = _load_zero3(zero, source, keys)
    elif internals.is_zero2(zero):
        given, partitions = _load_zero2(zero, source, keys)
    else:
        raise ValueError("loading weights needs ZeRO stage 2 or 3 (zero_optimization.stage in the DeepSpeed "
                         "config); this run uses another stage")
    if optimizer_state:
        for partition in partitions:
            zero.optimizer.state[partition]["step"] = _adam_step(zero.optimizer, step_count, partition.device)
    if param_groups is not None:
        for group, saved in zip(zero.optimizer.param_groups, param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
    return len(given)


def _partition_target(zero, partition: torch.Tensor, key: str) -> torch.Tensor:
    """The flat tensor to write ``key`` into: the fp32 partition itself, or its Adam state ``key``
    (created as zeros in a run that has not stepped yet)."""
    if key == "fp32":
        return partition.data
    state = zero.optimizer.state[partition]
    if key not in state:
        state[key] = torch.zeros_like(partition)
    return state[key]


def _load_zero3(zero, source: Source, keys: tuple[str, ...]) -> tuple[set[str], list[torch.Tensor]]:
    """ZeRO-3: each rank holds slice d of every parameter, one after another per sub-group."""
    tp_rank_, tp_world = tp_rank(), tp_size()
    dp_group = internals.require(zero, "dp_process_group", FEATURE)
    dp_rank, dp_world = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
    given = set()
    swappable = internals.require(zero, "_swappable_optimizer_subgroup", FEATURE)
    swap_in = internals.require(zero, "_optimizer_states_and_gradient_swap_in", FEATURE)
    swap_out = internals.require(zero, "_optimizer_states_and_gradient_swap_out", FEATURE)
    refresh = internals.require(zero, "_reassign_or_swap_out_partitioned_parameters", FEATURE)
    fp32_partitions = internals.require(zero, "fp32_partitioned_groups_flat", FEATURE)
    names = internals.require(zero, "param_names", FEATURE)
    for group_id, params in enumerate(internals.require(zero, "fp16_groups", FEATURE)):
        # A sub-group swapped to NVMe is read into host memory, written, and swapped out again with
        # whatever Adam state it now has (DeepSpeed registers new state tensors at the swap-out).
        swapped = swappable(group_id)
        if swapped:
            swap_in(group_id)
        for key in keys:
            target = _partition_target(zero, fp32_partitions[group_id], key)
            offset = 0
            for param in params:
                name = names[param]
                full = source(name, key)
                if full is not None:
                    shard = _tp_shard(name, param, tuple(param.ds_shape), full, tp_rank_, tp_world)
                    target.narrow(0, offset, param.partition_numel()).copy_(_zero3_slice(shard, dp_rank, dp_world))
                    given.add(name)
                offset += param.partition_numel()
        # The partitions the model computes with, from the fp32 ones (swapped out when the
        # parameters are offloaded to NVMe), as DeepSpeed does after its universal load.
        refresh(group_id)
        if swapped:
            swap_out(group_id)
    regather_persistent_parameters(zero)  # small parameters kept whole: from the new partitions
    return given, list(fp32_partitions)


def _load_zero2(zero, source: Source, keys: tuple[str, ...]) -> tuple[set[str], list[torch.Tensor]]:
    """ZeRO-2: parameters are whole on every rank (written directly); the fp32 master weights and
    Adam moments are a DP partition of each group's flat buffer, where DeepSpeed's ``_hp_mapping``
    of a parameter says which fragment of it (lp address) lies where (hp address)."""
    tp_rank_, tp_world = tp_rank(), tp_size()
    given = set()
    fp32_partitions = internals.require(zero, "single_partition_of_fp32_groups", FEATURE)
    names = internals.require(zero, "param_names", FEATURE)
    for group_id, params in enumerate(internals.require(zero, "bit16_groups", FEATURE)):
        for key in keys:
            target = _partition_target(zero, fp32_partitions[group_id], key)
            for param in params:
                name = names[param]
                full = source(name, key)
                if full is None:
                    continue
                shard = _tp_shard(name, param, tuple(param.shape), full, tp_rank_, tp_world)
                if key == "fp32":
                    param.data.copy_(shard.view_as(param))
                mapping = internals.require(param, "_hp_mapping", FEATURE)
                if mapping is not None:  # None: no element of this parameter in this rank's partition
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    target.narrow(0, hp.start, hp.numel).copy_(shard.reshape(-1).narrow(0, lp.start, lp.numel))
                given.add(name)
    return given, list(fp32_partitions)


def _adam_step(optimizer, step_count: int, device: torch.device):
    """Adam's ``step`` state as this optimizer keeps it: torch's Adam a float tensor (on the
    parameters' device when fused or capturable, else on the CPU); DeepSpeed's and Apex's an int."""
    if not type(optimizer).__module__.startswith("torch."):
        return int(step_count)
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(step_count), dtype=torch.float32, device=device if on_device else "cpu")
