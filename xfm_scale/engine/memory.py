"""Pinned host memory for ZeRO offload: exact-size pinned allocations, pageable parameter
partitions during the build, and the release of cached pinned blocks afterwards."""
from __future__ import annotations

import copy
import warnings

import torch


# Pinned host allocations above this size are made at their exact size (torch's caching host
# allocator rounds every one up to a power of two otherwise). Below it the waste is bounded by the
# size itself, and small blocks are worth caching.
PINNED_ROUND_THRESHOLD_MB = 16

PINNED_ROUND_SETTING = "pinned_max_round_threshold_mb"  # torch's allocator setting for it


def pins_offloaded_memory(ds_config: dict) -> bool:
    """Whether the DeepSpeed config offloads parameters or optimizer state to pinned host memory."""
    zero = ds_config.get("zero_optimization", {})
    return any(isinstance(zero.get(key), dict) and zero[key].get("device") in ("cpu", "nvme")
               and zero[key].get("pin_memory") for key in ("offload_param", "offload_optimizer"))


def exact_pinned_allocations(threshold_mb: int = PINNED_ROUND_THRESHOLD_MB) -> bool:
    """Ask torch's pinned (page-locked) host allocator to allocate blocks above ``threshold_mb``
    at their exact size (``pinned_max_round_threshold_mb``); returns whether the setting is in force.

    ZeRO offload keeps its bulk in pinned host memory: the bf16 parameters' flat buffer, the
    gradient partitions and per-sub-group fp32 gradients, each a single allocation of gigabytes.
    torch rounds each pinned allocation up to the next power of two, so a 12.8 GB buffer (6.4B bf16
    parameters) takes 16 GiB: at the sizes that fill a machine's host memory that is a fifth of it
    (the figure is predicted from DeepSpeed's buffer sizes; ``benchmarks/memory.py --largest``
    measures it on a GPU). A value the user set in PYTORCH_ALLOC_CONF is left alone. A torch that
    does not know the key keeps rounding, with a warning."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    set_ = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or set_ is None:
        warnings.warn(f"torch {torch.__version__} has no allocator settings API: pinned host memory is "
                      f"rounded up to powers of two (offload may use up to twice the host memory it needs)")
        return False
    if pinned_allocations_exact():
        return True
    current = get()
    try:
        setting = f"{PINNED_ROUND_SETTING}:{threshold_mb}"
        set_(f"{current},{setting}" if current else setting)
    except (ValueError, RuntimeError) as err:
        warnings.warn(f"torch {torch.__version__} cannot limit the rounding of pinned host memory ({err}): "
                      f"offload may use up to twice the host memory it needs")
        return False
    return True


def pinned_allocations_exact() -> bool:
    """Whether torch's pinned host allocator gives large blocks at their exact size in this process
    (:func:`exact_pinned_allocations` ran and took), read back from torch itself."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return get is not None and PINNED_ROUND_SETTING in get()


def unpinned_partitions(ds_config: dict) -> dict:
    """The config ``zero.Init`` builds the model under: parameter partitions in pageable memory.

    With ``offload_param.pin_memory`` ZeRO-3 pins each parameter's partition as the model is
    built; the optimizer then copies them into one flat pinned buffer and frees them, and torch's
    pinned allocator keeps freed blocks cached, so they would hold as much host memory again as
    the bf16 parameters (13 GB at 6.4B) through the optimizer's construction, the build's peak.
    Pageable partitions go back to the OS when freed; the flat buffer they are copied into is
    pinned as configured."""
    config = copy.deepcopy(ds_config)
    offload_param = config.get("zero_optimization", {}).get("offload_param")
    if isinstance(offload_param, dict) and offload_param.get("device") == "cpu":  # NVMe swaps from pinned buffers
        offload_param["pin_memory"] = False
    return config


def release_cached_pinned_memory() -> None:
    """Return the pinned blocks torch's host allocator keeps cached (freed during the engine's
    construction, e.g. DeepSpeed's temporaries) to the OS."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


OFFLOADED_KINDS = ("master weights", "Adam moments", "fp32 gradients", "gradient partitions", "parameters")
"""The kinds of state :func:`offloaded_state_bytes` counts."""


def offloaded_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of each kind of state ZeRO-3 offload keeps in host memory, from the buffers of DeepSpeed
    0.19.8's stage-3 optimizer (private attributes: a diagnostic for benchmarks/memory.py, not an API), so a
    host peak can be told apart into what DeepSpeed holds by design and the rest (torch, the
    allocators, transients):

    * master weights: the fp32 partition of each optimizer sub-group (4 B per parameter);
    * Adam moments: exp_avg and exp_avg_sq of each (8 B);
    * fp32 gradients: each sub-group's fp32 gradient buffer, what the CPU Adam reads (4 B);
    * gradient partitions: the flat buffer the reduced gradients are accumulated in, in the
      gradient-accumulation dtype (bf16 on GPU: 2 B; fp32 on CPU: 4 B);
    * parameters: the flat host buffer of the parameters, with offload_param only (bf16: 2 B).

    Only tensors in host memory count (on the CPU accelerator that is all of them; the parameters'
    device buffer is not among these), each storage once; a sub-group swapped to NVMe holds none."""
    import torch

    seen: set[int] = set()

    def host_bytes(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    master = list(getattr(optimizer, "fp32_partitioned_groups_flat", []))
    state = getattr(getattr(optimizer, "optimizer", None), "state", {})
    moments = [v for p in master for v in state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0]
    flat_parameters = getattr(optimizer, "param_groups_fp16_flat_cpu_memory", []) if getattr(
        optimizer, "offload_param", False) else []
    return dict(zip(OFFLOADED_KINDS, (
        host_bytes(master), host_bytes(moments), host_bytes(p.grad for p in master),
        host_bytes([getattr(optimizer, "grad_partitions_flat_buffer", None)]), host_bytes(flat_parameters))))
