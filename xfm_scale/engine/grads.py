"""Gradients at the start of an optimizer step: what DeepSpeed 0.19.8's ZeRO leaves behind from the
previous step for parameters a step does not touch (X-FM's text-only steps leave the vision and
fusion encoders alone), and its NVMe gradient swapping. Private DeepSpeed API, each use with the
version and behaviour it works around."""
from __future__ import annotations

import torch

from xfm_scale.engine import internals


def clear_stale_gradients(engine) -> None:
    """Clear ZeRO's gradient partitions before an optimizer step's first micro-batch.

    DeepSpeed 0.19's ZeRO-3 copies a parameter's reduced gradient into its fp32 partition at
    micro-step 0 and adds to it at later micro-steps, but never clears a partition that no
    micro-batch of the window wrote. X-FM steps leave parameters untouched (the vision and fusion
    encoders on a text-only step), so without this such a parameter is updated with the previous
    step's gradient again, and one first touched at micro-step k > 0 accumulates onto it. That
    made a run depend on its history in the process: a resumed run (fresh zeros) and an
    uninterrupted one diverged at the first step after the resume. Untouched parameters now get
    an exact zero gradient, the same in every run. :meth:`xfm_scale.engine.build.Engine.step`
    calls it; nothing else needs to.

    Remove when: DeepSpeed zeroes the partitions of parameters a window did not touch (not in
    0.19.8; tests/engine/test_engine_parity.py's resume test fails without this).
    """
    zero = engine.optimizer
    feature = "clearing stale gradients (engine.grads.clear_stale_gradients)"
    if internals.is_zero3(zero):
        internals.require(zero, "grad_partitions_flat_buffer", feature).zero_()
        offloaded = internals.require(zero, "offload_optimizer", feature)
        partitions = internals.require(zero, "fp32_partitioned_groups_flat", feature) if offloaded else []
        swapper = internals.require(zero, "optimizer_swapper", feature)  # None unless swapped to NVMe
    elif internals.is_zero2(zero):
        # ZeRO-2 builds each window's partitions afresh (None grads become zeros) unless offloaded
        offloaded = internals.require(zero, "cpu_offload", feature)
        partitions = internals.require(zero, "single_partition_of_fp32_groups", feature) if offloaded else []
        swapper = None
    else:
        raise ValueError(f"{type(zero).__name__}: xfm_scale trains with ZeRO stage 2 or 3")
    # With optimizer offload each fp32 partition keeps one persistent gradient, into which the
    # boundary copies only this window's parameters; the others would keep last step's values.
    for fp32_partition in partitions:
        if fp32_partition.grad is not None:
            fp32_partition.grad.zero_()
    if swapper is not None:  # NVMe-swapped sub-groups: see complete_swapped_gradients
        for info in internals.require(swapper, "swap_params_info", feature).values():
            info.swapped_gradients.clear()  # last window's: the swap files stay, unread
            info.release_unswapped_gradients()


def complete_swapped_gradients(engine) -> None:
    """Give an NVMe-swapped ZeRO-3 sub-group this window's gradient, with zeros for the parameters
    no micro-batch of the window touched, as a sub-group in host memory gets.

    DeepSpeed 0.19.8 (PartitionedOptimizerSwapper) gets this wrong in two ways, both measured on
    `tiny` with the vision MLP widened until its sub-group swaps (tests/engine/test_nvme_offload.py):
    * Gradients of 1 MiB and more are written to swap files at the window's boundary and read back
      at the step; the values read back were not those written (the files held the right ones),
      and the losses left CPU offload's from the third step (8.21 against 7.66).
    * A parameter this window left untouched (X-FM's text-only steps leave the vision and fusion
      encoders alone) has no gradient piece of its own: a stale large one from an earlier window
      was read again, and a small one's range kept whatever the reused pinned buffer held (the
      second step's loss moved).
    So every gradient piece is kept in host memory (DeepSpeed's own path for pieces under 1 MiB:
    up to 4 bytes per parameter of the swapped sub-groups between the boundary and the step, which
    NVMe offload would have spared), :func:`clear_stale_gradients` forgets the last window's
    pieces, and the ranges no piece covers get zeros before the sub-group is swapped in. The fp32
    weights and Adam moments still live in the swap files."""
    feature = "NVMe gradient swapping (engine.grads.complete_swapped_gradients)"
    if not internals.is_zero3(engine.optimizer):
        return
    swapper = internals.require(engine.optimizer, "optimizer_swapper", feature)
    if swapper is None:  # not swapped to NVMe
        return
    swap_in = internals.require(swapper, "swap_in_optimizer_state", feature)
    internals.require(swapper, "swap_out_gradients", feature)
    get_info = internals.require(swapper, "_get_param_swap_info", feature)

    def keep_gradient_in_memory(parameter, gradient_offsets, gradient_tensors):
        info = get_info(parameter)
        if info is not None:
            for offset, gradient in zip(gradient_offsets, gradient_tensors):
                info.unswapped_gradients[offset] = gradient.detach().to("cpu", copy=True)

    def swap_in_this_windows_gradient(parameter, async_parameter=None):
        info = get_info(parameter)
        if info is not None:
            _zero_fill_unwritten(info, parameter.dtype)
        return swap_in(parameter, async_parameter)

    swapper.swap_out_gradients = keep_gradient_in_memory
    swapper.swap_in_optimizer_state = swap_in_this_windows_gradient


def _zero_fill_unwritten(info, dtype: torch.dtype) -> None:
    """Add zero pieces (kept in memory) for the ranges of ``info``'s sub-group that no gradient
    piece of this window covers."""
    written = sorted([(g.offset, g.offset + g.length) for g in info.swapped_gradients.values()]
                     + [(offset, offset + t.numel()) for offset, t in info.unswapped_gradients.items()])
    start = 0
    for begin, end in [*written, (info.numel(), info.numel())]:
        if begin > start:
            info.unswapped_gradients[start] = torch.zeros(begin - start, dtype=dtype)
        start = max(start, end)
