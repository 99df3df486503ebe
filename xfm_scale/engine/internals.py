"""Every private DeepSpeed attribute the engine package reads, read through :func:`require`.

A DeepSpeed release that renames one of them must fail loudly where the workaround that needs it
runs, not skip it: ``getattr(obj, name, default)`` would silently bring back the bug the workaround
fixes (stale gradients, lost optimizer state). What each attribute is, in DeepSpeed 0.19.8:

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``grad_partitions_flat_buffer`` (the flat gradient
partitions of a step), ``fp32_partitioned_groups_flat`` (fp32 master partitions per sub-group),
``fp16_groups`` / ``fp16_partitioned_groups_flat_numel`` (parameters and partition sizes per
sub-group), ``param_names``, ``dp_process_group``, ``persistent_parameters``, ``offload_optimizer``,
``swap_optimizer``, ``optimizer_swapper`` (``PartitionedOptimizerSwapper``: ``swap_params_info``,
``_get_param_swap_info``, ``swap_out_gradients``, ``swap_in_optimizer_state``),
``_swappable_optimizer_subgroup``, ``_reassign_or_swap_out_partitioned_parameters``,
``_optimizer_states_and_gradient_swap_in`` / ``_swap_out``.
ZeRO-2 (``DeepSpeedZeroOptimizer``): ``bit16_groups``, ``single_partition_of_fp32_groups``,
``cpu_offload``, and each parameter's ``_hp_mapping``.
The engine (``DeepSpeedEngine``): ``checkpoint_engine``, ``_copy_recovery_script``, and the
counters ``global_steps``, ``global_samples``, ``skipped_steps``.
"""
from __future__ import annotations

from typing import Any

from xfm_scale.engine.versions import TESTED


class EngineInternalsChanged(RuntimeError):
    """A DeepSpeed internal a workaround needs is missing: the installed DeepSpeed differs from the
    tested one in a way that would silently undo the workaround."""


def require(obj: Any, name: str, feature: str) -> Any:
    """``obj.name``, or :class:`EngineInternalsChanged` naming the attribute and the feature that
    needs it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise EngineInternalsChanged(
            f"{type(obj).__name__}.{name} is missing: {feature} relies on it (DeepSpeed "
            f"{TESTED['deepspeed']}'s internals). Install deepspeed=={TESTED['deepspeed']}, or adapt "
            f"xfm_scale/engine/ to this DeepSpeed") from None


def is_zero3(zero_optimizer: Any) -> bool:
    """Whether ``zero_optimizer`` is DeepSpeed's ZeRO-3 optimizer (else ZeRO-2's)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3)


def is_zero2(zero_optimizer: Any) -> bool:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(zero_optimizer, DeepSpeedZeroOptimizer)
