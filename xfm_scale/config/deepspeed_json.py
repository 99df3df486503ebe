"""The DeepSpeed JSON config: read with ``deepspeed.overrides`` applied, and checked for what
xfm_scale supports (stages, offload, checkpoint layout) before any rank starts. Plain JSON: no
DeepSpeed import."""
from __future__ import annotations

import json
from typing import Any

from xfm_scale.config.errors import ConfigError
from xfm_scale.config.overrides import set_dotted


def read(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The JSON at ``path`` with dotted ``overrides`` merged in (a dict value merges key by key)."""
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({err})") from None
    ds.pop("_comment", None)
    for dotted, value in overrides.items():
        set_dotted(ds, dotted, value, merge=True)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def check(ds: dict[str, Any], path: str) -> None:
    """What xfm_scale's checkpoints, export and resharding can read, and its NVMe support."""
    zero = ds.get("zero_optimization", {})
    stage = zero_stage(ds)
    for option in ("round_robin_gradients", "elastic_checkpoint"):
        if zero.get(option):
            # both change how ZeRO-2 lays out or saves its partitions in ways DeepSpeed's saved
            # fragment map (which our reader, export and resharding use) does not describe
            raise ConfigError(f"zero_optimization.{option}=true in {path}: not supported (export "
                              "and resume at another layout could not read its checkpoints); set it to false")
    if ds.get("checkpoint", {}).get("use_node_local_storage"):
        # DeepSpeed then saves per node under local ranks (files and NVMe swap folders named by
        # local rank): one output folder that every node sees is what resume, export and the
        # reader of NVMe swap files (named by global rank) rely on
        raise ConfigError(f"checkpoint.use_node_local_storage=true in {path}: not supported "
                          "(checkpoints go to train.output_dir, which every node must see); set it to false")
    _check_nvme_offload(zero, stage, path)
    if stage not in (2, 3):
        # checkpoints, export and resharding read ZeRO-2 and ZeRO-3 partitions (xfm_scale.checkpoint.reader)
        raise ConfigError(f"zero_optimization.stage={stage} in {path} (with deepspeed.overrides): "
                          "xfm_scale trains with ZeRO stage 3 (any model size) or 2 (the model fits on every "
                          "rank; faster); use a ds_configs/zero3_* or zero2_* config")


def _check_nvme_offload(zero: dict, stage: int, path: str) -> None:
    """NVMe offload of the optimizer as xfm_scale supports it: ZeRO-3's default swapper."""
    optimizer = zero.get("offload_optimizer") or {}
    if optimizer.get("device") != "nvme":
        return
    if stage != 3:
        # DeepSpeed's ZeRO-2 offloads the optimizer to the CPU only: it would build the CPU
        # optimizer and leave the drive unused (and on a GPU assert at the first step)
        raise ConfigError(f"zero_optimization.offload_optimizer.device=nvme with zero_optimization.stage={stage} "
                          f"in {path}: NVMe offload needs ZeRO stage 3; use "
                          "ds_configs/zero3_nvme_template.json, or offload_optimizer.device=cpu")
    for option in ("pipeline_read", "pipeline_write"):
        if optimizer.get(option):
            # xfm_scale corrects DeepSpeed 0.19.8's gradient swapping for its default swapper
            # (engine.grads.complete_swapped_gradients); the pipelined one prefetches the next
            # sub-group's gradients before that correction can run
            raise ConfigError(f"zero_optimization.offload_optimizer.{option}=true in {path}: "
                              "not supported (its swapped gradients would be wrong); set it to false")
