"""The one module that decides which fused kernels are used, and reports what it chose.

Apex (a CUDA source build; the package index's ``apex`` is an unrelated project) supplies fused
LayerNorm and FusedAdam when installed. Otherwise the field's fallbacks: torch's LayerNorm (already
a fused kernel on GPU), torch's fused AdamW (one kernel per parameter group on GPU and CPU: no
JIT-compiled extension to build on each cluster, as DeepSpeed's FusedAdam needs), and attention through
torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU, math on CPU).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KernelChoice:
    layer_norm: str
    """Which LayerNorm implementation the model uses."""
    attention: str
    """Which attention path (always torch SDPA; the kernel it picks depends on the device)."""
    optimizer: str
    """Which Adam implementation the engine will use."""


def _apex_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None and torch.cuda.is_available()
    except (ImportError, ValueError):
        return False


@functools.cache
def choice() -> KernelChoice:
    if _apex_available("apex.normalization"):
        layer_norm = "apex.normalization.FusedLayerNorm"
    else:
        layer_norm = "torch.nn.LayerNorm"
    if _apex_available("apex.optimizers"):
        optimizer = "apex.optimizers.FusedAdam"
    else:
        optimizer = "torch.optim.AdamW (fused)"
    attention = ("torch SDPA (flash / memory-efficient kernels)" if torch.cuda.is_available()
                 else "torch SDPA (math kernel on CPU)")
    return KernelChoice(layer_norm=layer_norm, attention=attention, optimizer=optimizer)


def report() -> dict[str, str]:
    return asdict(choice())


def LayerNorm(dim: int, eps: float, dtype: torch.dtype) -> torch.nn.Module:  # noqa: N802 - a class-like factory
    """LayerNorm with ``weight``/``bias`` parameters (same state-dict names either way) in ``dtype``,
    the model's parameter dtype: on CUDA torch's LayerNorm refuses fp32 weights with a bf16 input
    (the CPU kernel accepts them), so a bf16 model built outside DeepSpeed, which casts every
    parameter, needs its norms in bf16 too."""
    if choice().layer_norm.startswith("apex"):
        from apex.normalization import FusedLayerNorm

        return FusedLayerNorm(dim, eps=eps).to(dtype)
    return torch.nn.LayerNorm(dim, eps=eps, dtype=dtype)
