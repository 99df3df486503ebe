"""The two runtime services model code needs from the parallel runtime, injected, not imported.

Model code must not import DeepSpeed (one module, :mod:`xfm_scale.distributed`, wires it). Two things
the layers need depend on that runtime:

* ``checkpoint(fn, *args)``: per-layer activation checkpointing. The parallel module installs
  DeepSpeed's ``non_reentrant_checkpoint``, which saves and restores the RNG state of the
  default generator *and* of its model-parallel tracker, so dropout replays exactly in the
  recomputation (megatron's own tracker is CUDA-only).
* ``tensor_parallel_rng()``: a context in which randomness differs across tensor-parallel ranks
  (dropout on head-partitioned attention probabilities). Outside it, the default generator is the
  same on all TP ranks, so dropout on replicated activations stays identical across TP ranks.

Defaults work in a plain single process (torch's checkpoint, no separate TP stream).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch.utils.checkpoint


def _torch_checkpoint(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


@dataclass
class ParallelHooks:
    checkpoint: Callable = _torch_checkpoint
    """Activation-checkpointing function: ``checkpoint(fn, *tensor_args) -> fn(*tensor_args)``."""
    tensor_parallel_rng: Callable[[], ContextManager] = contextlib.nullcontext
    """Returns a context whose RNG stream differs per tensor-parallel rank."""
    name: str = "torch"
    """Who installed these hooks (for logs)."""


HOOKS = ParallelHooks()


def install(checkpoint: Callable, tensor_parallel_rng: Callable[[], ContextManager], name: str) -> None:
    HOOKS.checkpoint = checkpoint
    HOOKS.tensor_parallel_rng = tensor_parallel_rng
    HOOKS.name = name
