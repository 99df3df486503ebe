"""Known, harmless start-up noise, silenced once at an entry point (torch-free: it runs before
the heavy imports, which is when most of it is printed).

Each filter names what it hides and why it does not concern an xfm_scale run; the kernels that
were chosen instead are logged once by the trainer (xfm_scale.model.kernels.report).
"""
from __future__ import annotations

import logging
import os
import warnings

KNOWN_WARNINGS = (
    # megatron-core, at import, once per module that looks (8 per process): its fused kernels need
    # Transformer Engine or Apex; xfm_scale chooses its own (model.kernels) and says which.
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # megatron's tensor-parallel layers: a CUDA stream setting, irrelevant to gloo ranks on CPU.
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                  r"CUDA_DEVICE_MAX_CONNECTIONS"),
    # DeepSpeed 0.19 calls torch.distributed's renamed collectives; torch warns on every call.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
)


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") == "cpu"


class _NoCudaRuntime(logging.Filter):
    """Drops torch's "No CUDA runtime is found" (its C++ extension loader, imported by DeepSpeed):
    a CPU run expects it. A filter, not a level: torch's logging set-up (at torch._dynamo's import)
    resets the levels of torch's loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def silence_known_noise() -> None:
    """Install the filters (idempotent); on CPU also :class:`_NoCudaRuntime`."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", category=category, message=message)
    # megatron-core announces at import which Megatron-FSDP it would use ("Using Megatron-FSDP
    # without Transformer Engine", "Detected Megatron Core, ..."): xfm_scale does not use it.
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
    logger = logging.getLogger("torch.utils.cpp_extension")
    if on_cpu() and not any(isinstance(f, _NoCudaRuntime) for f in logger.filters):
        logger.addFilter(_NoCudaRuntime())
