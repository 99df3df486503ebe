"""DeepSpeed checkpoint I/O: what DeepSpeed 0.19.8's save and load get wrong or leave out, and the
state a reader at another layout needs recorded. Private DeepSpeed API, each use with the version
and behaviour it works around. The publish-when-complete protocol around it is
:mod:`xfm_scale.checkpoint.writer`'s."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from xfm_scale.engine import internals
from xfm_scale.engine.safe_globals import load_trusted
from xfm_scale.model.layers import tp_rank as tp_rank_of_this_process

SAVE_FEATURE = "checkpoint saves (engine.checkpoint_io)"
LOAD_FEATURE = "checkpoint loads (engine.checkpoint_io)"


def swaps_to_nvme(zero) -> bool:
    """Whether ZeRO-3 swaps this run's optimizer state to NVMe (ZeRO-2 never does)."""
    return internals.is_zero3(zero) and internals.require(zero, "swap_optimizer", LOAD_FEATURE)


def save_recording_writes(engine, save_dir: str, tag: str, client_state: dict) -> tuple[list[str], list[Exception]]:
    """``engine.save_checkpoint`` that records, instead of raising, a failed write: returns (the
    partition files this rank wrote, the errors).

    A failed write must not skip DeepSpeed's later collectives (a rank that raised would wait in
    the writer's all_reduce while the others wait in DeepSpeed's barrier). DeepSpeed 0.19.8 has two
    writers in save_checkpoint: ``checkpoint_engine.save`` (every partition file) and rank 0's
    ``_copy_recovery_script`` (zero_to_fp32.py). Both are wrapped for the call and restored.

    Remove when: DeepSpeed's save reports a failed write on every rank (not in 0.19.8)."""
    errors: list[Exception] = []
    written: list[str] = []

    def recording(write: Callable) -> Callable:
        def call(*args, **kwargs):
            try:
                result = write(*args, **kwargs)
            except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
                errors.append(err)
                return None
            if write.__name__ == "save":  # checkpoint_engine.save(state_dict, path)
                written.append(kwargs.get("path", args[1] if len(args) > 1 else None))
            return result
        return call

    writers = [(internals.require(engine, "checkpoint_engine", SAVE_FEATURE), "save"), (engine, "_copy_recovery_script")]
    originals = [internals.require(obj, name, SAVE_FEATURE) for obj, name in writers]
    for (obj, name), original in zip(writers, originals):
        setattr(obj, name, recording(original))
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:  # anything else that failed before DeepSpeed's barrier
        errors.append(err)
    finally:
        for (obj, name), original in zip(writers, originals):
            setattr(obj, name, original)
    return [path for path in written if path], errors


def set_step_counters(engine, counters: dict) -> None:
    """The engine's step counters (``global_steps``, ``global_samples``, ``skipped_steps``) from a
    checkpoint read outside DeepSpeed's load (a resume at another layout). DeepSpeed 0.19.8 has no
    setter; its own load assigns the same attributes."""
    for name in ("global_steps", "global_samples", "skipped_steps"):
        internals.require(engine, name, LOAD_FEATURE)
        setattr(engine, name, counters[name])


OptimizerFile = Callable[[int, int], Path]
"""(DP rank, TP rank) -> that rank's optimizer-states file in the checkpoint being loaded."""


def load(engine, save_dir: str, tag: str, optimizer_file: OptimizerFile) -> dict | None:
    """DeepSpeed's load of model, optimizer and scheduler state, completed where DeepSpeed 0.19.8
    leaves state out (:func:`restore_unswapped_optimizer_state`, which reads this rank's
    ``optimizer_file``); returns the client state, or None when DeepSpeed found nothing to load."""
    path, client_state = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        return None
    restore_unswapped_optimizer_state(engine, optimizer_file)
    return client_state


def load_checkpoints_weights_only(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine unpickles checkpoint files with weights_only=False, which
    runs whatever code a file names. Ours hold only tensors, containers and two DeepSpeed classes,
    so load them with weights_only=True (:func:`xfm_scale.engine.safe_globals.load_trusted`).

    Remove when: DeepSpeed loads with weights_only=True (not in 0.19.8)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = internals.require(engine, "checkpoint_engine", LOAD_FEATURE)
    if type(checkpoint_engine) is TorchCheckpointEngine:
        checkpoint_engine.load = lambda path, map_location=None: load_trusted(path, map_location)


def regather_persistent_parameters(zero_optimizer) -> None:
    """Rebuild ZeRO-3's persistent parameters (those under ``stage3_param_persistence_threshold``,
    kept whole on every rank besides their partition) from their partitions, after the partitions
    were written behind DeepSpeed's back (engine_state) or by a load that gathers them too early.

    DeepSpeed 0.19.8's load with the optimizer swapped to NVMe gathers them before it restores the
    partitions, and its closing all-gather finds them still available and does nothing: a resumed
    run kept its fresh initial values for every bias and norm (tests/engine/test_nvme_offload.py).
    Released first, so that the all-gather really gathers."""
    if not internals.is_zero3(zero_optimizer):
        return
    persistent = internals.require(zero_optimizer, "persistent_parameters", LOAD_FEATURE)
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def nvme_swap_ids(engine) -> list[str | None] | None:
    """Per ZeRO-3 sub-group, the id in the names of its NVMe swap files (``{id}.tensor.swp``,
    ``exp_avg-{id}.tensor.swp``...; DeepSpeed copies them into ``TAG/offloaded_tensors/rankNN/``),
    or None where the sub-group stays in host memory (smaller than the aio block); None without
    NVMe offload of the optimizer. The checkpoint does not record which sub-group a swap file
    belongs to, and a reader at another layout (export, resharding) must know.
    DeepSpeed 0.19.8's stage-3 internals: the id is set on the swapped fp32 partition."""
    zero = engine.optimizer
    if not swaps_to_nvme(zero):
        return None
    swappable = internals.require(zero, "_swappable_optimizer_subgroup", SAVE_FEATURE)
    return [getattr(partition, "ds_id", None) if swappable(i) else None
            for i, partition in enumerate(zero.fp32_partitioned_groups_flat)]


def swapped_state_files(engine) -> dict[str, int]:
    """The NVMe swap files of this rank's optimizer state (file name -> the least bytes it must
    hold: fp32 weights and each Adam moment of every swapped sub-group), which DeepSpeed's save
    copies into ``TAG/offloaded_tensors/rank{global rank:02d}/``; empty without NVMe offload."""
    if not swaps_to_nvme(engine.optimizer):
        return {}
    swapper = internals.require(engine.optimizer, "optimizer_swapper", SAVE_FEATURE)
    files = {}
    for info in internals.require(swapper, "swap_params_info", SAVE_FEATURE).values():
        for path in info.get_swap_paths():
            files[os.path.basename(path)] = info.numel() * info.dtype().itemsize
    return files


def restore_unswapped_optimizer_state(engine, optimizer_file: OptimizerFile) -> None:
    """After DeepSpeed's load of a checkpoint saved with the optimizer offloaded to NVMe: restore
    what that load leaves out.

    DeepSpeed 0.19.8's ``load_checkpoint`` skips the optimizer files altogether when the optimizer
    is on NVMe and only copies the swap files back, as if every sub-group were swapped. Sub-groups
    under the aio block (1 MiB) stay in host memory, so their fp32 weights and Adam moments kept
    the relaunched run's fresh values (every bias, norm and new head in `tiny`), and Adam's step
    count restarted for all, and the learning rates were the scheduler's first until its next step.
    Here this rank's optimizer file gives them back: the param groups' hyperparameters (lr), each
    sub-group's step count, the swapped sub-groups' moments (:func:`_register_swapped_moments`),
    and the unswapped sub-groups' fp32 partition and moments, which then refresh the parameters
    the model computes with."""
    zero = engine.optimizer
    if not swaps_to_nvme(zero):
        return
    tp_rank = tp_rank_of_this_process()
    dp_rank = torch.distributed.get_rank(group=internals.require(zero, "dp_process_group", LOAD_FEATURE))
    saved = load_trusted(optimizer_file(dp_rank, tp_rank))["optimizer_state_dict"]
    saved_states = saved["optimizer_state_dict"]["state"]
    for group, saved_group in zip(zero.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"],
                                  strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})  # lr as the scheduler left it
    for i, partition in enumerate(zero.fp32_partitioned_groups_flat):
        state = zero.optimizer.state[partition]
        state.update({k: v for k, v in saved_states[i].items() if not torch.is_tensor(v)})  # step
        if internals.require(zero, "_swappable_optimizer_subgroup", LOAD_FEATURE)(i):
            _register_swapped_moments(zero, i, [k for k, v in saved_states[i].items() if torch.is_tensor(v)])
            continue
        partition.data.copy_(saved["fp32_flat_groups"][i])
        for key, value in saved_states[i].items():
            if torch.is_tensor(value):
                state[key] = value.to(partition.device, copy=True)
        internals.require(zero, "_reassign_or_swap_out_partitioned_parameters", LOAD_FEATURE)(i)
    regather_persistent_parameters(zero)


def _register_swapped_moments(zero, sub_group: int, keys: list[str]) -> None:
    """Make DeepSpeed read a swapped sub-group's Adam moments back from their swap files.

    Its swapper swaps in only the state tensors it has seen in ``optimizer.state`` (registered at
    the first step); a relaunched run has none yet, so the moments the checkpoint's swap files hold
    were never read and Adam started from zeros. Placeholders of the right size (``empty``:
    never touched, so never resident) register them under the names of those files
    (``exp_avg-{id}``), and are released at once; the next swap-in fills them from disk."""
    partition = zero.fp32_partitioned_groups_flat[sub_group]
    state = zero.optimizer.state[partition]
    if all(key in state for key in keys):
        return
    numel = internals.require(zero, "fp16_partitioned_groups_flat_numel", LOAD_FEATURE)[sub_group]
    for key in keys:
        state[key] = torch.empty(numel, dtype=partition.dtype)
    swapper = internals.require(zero, "optimizer_swapper", LOAD_FEATURE)
    info = internals.require(swapper, "_get_param_swap_info", LOAD_FEATURE)(partition)  # registers the state tensors
    info.release_memory()
