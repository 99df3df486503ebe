"""The one unpickling allow-list for DeepSpeed's checkpoint files.

DeepSpeed 0.19.8's TorchCheckpointEngine unpickles with ``weights_only=False``, which runs whatever
code a file names. xfm_scale's checkpoints hold only tensors, containers and the three DeepSpeed
classes below, so every read of them (the trainer's resume through DeepSpeed, the checkpoint
reader, export) goes through :func:`load_trusted`. DeepSpeed is imported only when a file is read,
so the checkpoint reader imports without it.

Remove when: DeepSpeed loads with ``weights_only=True`` itself (not in 0.19.8).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def allowed_classes() -> list[type]:
    """DeepSpeed's classes in its optimizer and model-states files (ZeRO-2's param_slice_mappings
    hold fragment_address)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextmanager
def deepspeed_safe_globals():
    with torch.serialization.safe_globals(allowed_classes()):
        yield


def load_trusted(path: str | Path, map_location="cpu"):
    """torch.load with weights_only=True (and memory-mapped): no arbitrary unpickling."""
    with deepspeed_safe_globals():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
