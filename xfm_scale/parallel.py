"""The one place that wires torch.distributed, megatron-core parallel state and DeepSpeed.

Order matters and was checked on CPU/gloo (../shared/design/stack-notes.md):
1. ``deepspeed.init_distributed`` (gloo on CPU, nccl on GPU);
2. megatron ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)``;
3. DeepSpeed's activation checkpointing configured with an mpu adapter, and its RNG tracker seeded
   (megatron's tracker needs CUDA; DeepSpeed's goes through the accelerator and works on CPU);
4. the model hooks (:mod:`xfm_scale.model.hooks`) pointed at DeepSpeed's checkpoint and tracker.

The engine (ZeRO-3 ``zero.Init`` + ``deepspeed.initialize``) builds on the same adapter.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import random
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfm_scale.config import ConfigError
from xfm_scale.model import hooks


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes."""
    tensor_parallel_size: int
    """Ranks that share one copy of the model, each holding 1/TP of every TP-split weight."""
    tensor_parallel_rank: int
    """This rank's position inside its tensor-parallel group."""
    data_parallel_size: int
    """world_size / tensor_parallel_size: copies of the model that read different samples."""
    data_parallel_rank: int
    """This rank's position among the data-parallel copies (which samples it reads)."""


class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects, answered from megatron's parallel_state.

    DeepSpeed calls ``get_model_parallel_{rank,world_size,group}``, which megatron lacks under those
    names; with pipeline size 1 the model-parallel group is the tensor-parallel group.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()


def _on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device() -> torch.device:
    """This rank's compute device, by the same decision that chose the process-group backend."""
    return torch.device("cpu") if _on_cpu() else torch.device("cuda", torch.cuda.current_device())


def _single_process_env() -> None:
    """Let a plain ``python script.py`` (no launcher) run as a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def check_tensor_parallel_size(world_size: int, tensor_parallel_size: int) -> None:
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the {world_size} ranks: "
            f"choose a TP size that divides the world size (divisors: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]})")


def seed_everything(seed: int) -> None:
    """Same default-generator seed on every rank of a TP group; a distinct TP-region stream.

    DeepSpeed's ``model_parallel_cuda_manual_seed`` seeds the default generator with ``seed`` and
    its tracker's ``model-parallel-rng`` with ``seed + 2718 + tp_rank``.
    """
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    ds_ckpt.get_cuda_rng_tracker().reset()
    ds_ckpt.model_parallel_cuda_manual_seed(seed)


def initialize(tensor_parallel_size: int = 1, seed: int = 1234, timeout_s: float = 600) -> ParallelLayout:
    """Initialise the process group, megatron TP groups, DeepSpeed checkpointing and model hooks."""
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
    from megatron.core import parallel_state as ps

    _single_process_env()
    # DeepSpeed 0.19 calls torch.distributed's renamed collectives; torch warns on every rank of
    # every run, into the progress bar, about code the user cannot change.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    if _on_cpu() and "OMP_NUM_THREADS" not in os.environ:
        # DeepSpeed's runner (unlike torchrun) leaves every rank at one thread per core, so N CPU
        # ranks oversubscribe the machine N-fold.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    world_size = int(os.environ["WORLD_SIZE"])
    check_tensor_parallel_size(world_size, tensor_parallel_size)
    if not _on_cpu():
        # each rank its own GPU before anything touches CUDA (device(), NCCL, zero.Init): left at
        # the default, every rank of a node would compute on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        # DeepSpeed announces its JIT-loaded comm op on stdout; keep stdout for the tools' output.
        with contextlib.redirect_stdout(sys.stderr):
            deepspeed.init_distributed(dist_backend="gloo" if _on_cpu() else "nccl", verbose=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
    if _on_cpu() and world_size > 1:
        _unlink_deepspeed_shm_segment()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # The TP and DP groups carry ZeRO's collectives: they get the run's timeout too (megatron's
    # default is 30 minutes, so a dead rank would hang its peers that long).
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                 distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
    mpu = MegatronMPU()
    ds_ckpt.configure(mpu, partition_activations=False, contiguous_checkpointing=False,
                      checkpoint_in_cpu=False, synchronize=False, profile=False)
    seed_everything(seed)
    # Non-reentrant: X-FM runs an encoder's blocks more than once per micro-batch (a pair step runs
    # the vision encoder on the image and on its masked copy). Reentrant checkpointing back-
    # propagates each checkpointed call in its own nested backward, so a parameter's gradient hook
    # fires once per call, and ZeRO-3 then puts the parameter in its reduce bucket twice (an
    # AssertionError in __reduce_and_partition_ipg_grads). Non-reentrant recomputation stays inside
    # the one backward: each parameter's gradient is accumulated first and its hook fires once.
    hooks.install(checkpoint=ds_ckpt.non_reentrant_checkpoint,
                  tensor_parallel_rng=lambda: ds_ckpt.get_cuda_rng_tracker().fork(),
                  name="deepspeed")
    return current_layout()


def deepspeed_shm_segment(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for ``rank`` when all ranks
    are on one machine (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19.8: named after the user id,
    MASTER_ADDR and MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_deepspeed_shm_segment() -> None:
    """DeepSpeed never unlinks its CPU all-reduce segments (66 MB per rank): every multi-rank CPU
    run used to leave them in /dev/shm, that is in RAM, until reboot (8.7 GB after a few days of
    test runs here). ``init_distributed`` returns once this rank has mapped every peer's segment;
    after the barrier every rank has, so the names can go. The mappings stay valid until the
    processes exit, and nothing is left behind however they exit."""
    torch.distributed.barrier()
    deepspeed_shm_segment(torch.distributed.get_rank()).unlink(missing_ok=True)


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
        tensor_parallel_rank=ps.get_tensor_model_parallel_rank(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        data_parallel_rank=ps.get_data_parallel_rank())


def global_rank_table(layout: ParallelLayout) -> list[list[int]]:
    """The global rank of every (DP rank d, TP rank t), as ``table[d][t]``: DeepSpeed names the
    folders of NVMe-swapped optimizer state in a checkpoint by global rank, and a reader at another
    layout has to find the folder of each partition. Collective (every rank calls it)."""
    pairs: list = [None] * layout.world_size
    torch.distributed.all_gather_object(pairs, (layout.data_parallel_rank, layout.tensor_parallel_rank))
    table = [[-1] * layout.tensor_parallel_size for _ in range(layout.data_parallel_size)]
    for rank, (d, t) in enumerate(pairs):
        table[d][t] = rank
    return table


def all_ranks_agree(condition: bool) -> bool:
    """True on every rank when ``condition`` holds on every rank (collective), so that ranks take
    the same branch into code with collectives of its own."""
    flag = torch.tensor([float(condition)], device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_engine(model_config, optim_cfg, ds_config: dict, total_steps: int, compile_backend: str | None = None,
                 gather_whole_blocks: bool = True, exact_pinned_host_memory: bool = True):
    """Build X-FM inside ZeRO-3's partitioned construction and wrap it in a DeepSpeed engine.

    * ``zero.Init(data_parallel_group=DP group, mpu=...)``: each TP shard is partitioned over the DP
      ranks as it is created, so a model larger than one rank's memory can be built;
    * the tied MLM decoders are registered as external parameters of their heads (ZeRO-3 gathers a
      module's own parameters around its forward, not parameters it borrows);
    * ``deepspeed.initialize(..., mpu=...)`` so gradient averaging uses the DP group and the
      clipping norm counts TP-split parameters on every TP rank and replicated ones once.
    * ZeRO-3 with ``gather_whole_blocks``: the blocks without activation checkpointing become
      DeepSpeed z3 leaf modules (:func:`gather_blocks_whole`).
    * offload to pinned host memory with ``exact_pinned_host_memory``: large pinned allocations
      are not rounded up, the model is built with pageable parameter partitions (copied into
      ZeRO-3's flat pinned buffer, then freed), and freed pinned blocks go back to the OS once the
      engine is built (:func:`exact_pinned_allocations`, :func:`_unpinned_partitions`,
      :func:`release_cached_pinned_memory`).
    ``compile_backend``: compile the encoder blocks with this torch.compile backend (None: eager).
    Returns (engine, optimizer, scheduler).
    """
    import deepspeed
    from megatron.core import parallel_state as ps

    from xfm_scale import optim
    from xfm_scale.model.xfm import XFM

    mpu = MegatronMPU()
    zero = ds_config.get("zero_optimization", {})
    stage3 = zero.get("stage", 0) == 3
    pinned = exact_pinned_host_memory and pins_offloaded_memory(ds_config)
    if pinned:
        exact_pinned_allocations()
    with deepspeed.zero.Init(data_parallel_group=ps.get_data_parallel_group(), mpu=mpu,
                             config_dict_or_path=_unpinned_partitions(ds_config) if pinned else ds_config,
                             enabled=stage3):
        model = XFM(model_config)
    if compile_backend is not None:
        model.compile_blocks(compile_backend)
    if stage3 and gather_whole_blocks and compile_backend is None:  # --check refuses compiled blocks with ZeRO-3
        gather_blocks_whole(model)
    if stage3:
        for module, param in model.external_parameters():
            deepspeed.zero.register_external_parameter(module, param)
    cpu_offload = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    optimizer = optim.build_optimizer(optim.param_groups(model, optim_cfg), optim_cfg, cpu_offload)
    scheduler = optim.build_scheduler(optimizer, total_steps, optim_cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    if pinned:
        release_cached_pinned_memory()
    _load_checkpoints_weights_only(engine)
    _complete_swapped_gradients(engine)
    return engine, optimizer, scheduler


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


def _unpinned_partitions(ds_config: dict) -> dict:
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


def gather_blocks_whole(model) -> int:
    """Mark the encoder blocks that keep their activations as DeepSpeed z3 leaf modules; returns
    how many.

    ZeRO-3 gathers a module's own parameters around each call of it: a block has some ten modules
    with parameters (fused QKV, projections, MLP, norms), so ten all-gathers and their Python hooks
    per block call. A leaf block is gathered whole in one, its gradients reduced together at its
    backward (measured on CPU: README, Performance; ``train_step.py --per-layer-gathers`` is the
    A/B). DeepSpeed's leaf modules
    need two things of the model, both true of X-FM:

    * a leaf runs at most once with grad per micro-batch: its gradients are reduced at each
      backward through it (twice would fail ZeRO-3's "parameter already in the bucket" assertion);
      the pair step merges its passes for this (model.xfm.XFM._pair_step), and with the text
      detach off the text blocks, which then run twice, stay per-layer
      (model.xfm.XFM.single_pass_blocks);
    * some input of a leaf requires grad: otherwise torch fires the full backward hook before the
      leaf's own backward, and DeepSpeed releases parameters that backward still needs. True of
      whole blocks (the fusion's text stream is detached, its image stream is not), not of their
      attention and MLP sub-modules.

    Checkpointed blocks stay per-module: a checkpointed leaf is recomputed inside its own backward,
    after DeepSpeed's pre-backward gather, and the recompute's post-forward hook releases the
    parameters that backward then reads (size-0 tensors)."""
    from deepspeed.utils import set_z3_leaf_module

    blocks = model.single_pass_blocks()
    for block in blocks:
        set_z3_leaf_module(block, True)
    return len(blocks)


def _load_checkpoints_weights_only(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine unpickles checkpoint files with weights_only=False, which
    runs whatever code a file names. Ours hold only tensors, containers and two DeepSpeed classes,
    so load them with weights_only=True (xfm_scale.zero_checkpoint.load_trusted)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from xfm_scale.zero_checkpoint import load_trusted

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.load = lambda path, map_location=None: load_trusted(path, map_location)


def regather_persistent_parameters(zero_optimizer) -> None:
    """Rebuild ZeRO-3's persistent parameters (those under ``stage3_param_persistence_threshold``,
    kept whole on every rank besides their partition) from their partitions, after the partitions
    were written behind DeepSpeed's back (engine_state) or by a load that gathers them too early.

    DeepSpeed 0.19.8's load with the optimizer swapped to NVMe gathers them before it restores the
    partitions, and its closing all-gather finds them still available and does nothing: a resumed
    run kept its fresh initial values for every bias and norm (tests/engine/test_nvme_offload.py).
    Released first, so that the all-gather really gathers."""
    persistent = getattr(zero_optimizer, "persistent_parameters", [])
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
    if not getattr(zero, "swap_optimizer", False):
        return None
    return [getattr(partition, "ds_id", None) if zero._swappable_optimizer_subgroup(i) else None
            for i, partition in enumerate(zero.fp32_partitioned_groups_flat)]


def swapped_state_files(engine) -> dict[str, int]:
    """The NVMe swap files of this rank's optimizer state (file name -> the least bytes it must
    hold: fp32 weights and each Adam moment of every swapped sub-group), which DeepSpeed's save
    copies into ``TAG/offloaded_tensors/rank{global rank:02d}/``; empty without NVMe offload."""
    swapper = getattr(engine.optimizer, "optimizer_swapper", None)
    files = {}
    for info in getattr(swapper, "swap_params_info", {}).values():
        for path in info.get_swap_paths():
            files[os.path.basename(path)] = info.numel() * info.dtype().itemsize
    return files


def restore_unswapped_optimizer_state(engine, tag_folder: Path) -> None:
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
    from xfm_scale.zero_checkpoint import load_trusted, partition_files

    zero = engine.optimizer
    if not getattr(zero, "swap_optimizer", False):
        return
    tp_rank = MegatronMPU().get_model_parallel_rank()
    dp_rank = torch.distributed.get_rank(group=zero.dp_process_group)
    saved = load_trusted(partition_files(tag_folder)[("optim", dp_rank, tp_rank)])["optimizer_state_dict"]
    saved_states = saved["optimizer_state_dict"]["state"]
    for group, saved_group in zip(zero.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"],
                                  strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})  # lr as the scheduler left it
    for i, partition in enumerate(zero.fp32_partitioned_groups_flat):
        state = zero.optimizer.state[partition]
        state.update({k: v for k, v in saved_states[i].items() if not torch.is_tensor(v)})  # step
        if zero._swappable_optimizer_subgroup(i):
            _register_swapped_moments(zero, i, [k for k, v in saved_states[i].items() if torch.is_tensor(v)])
            continue
        partition.data.copy_(saved["fp32_flat_groups"][i])
        for key, value in saved_states[i].items():
            if torch.is_tensor(value):
                state[key] = value.to(partition.device, copy=True)
        zero._reassign_or_swap_out_partitioned_parameters(i)
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
    numel = zero.fp16_partitioned_groups_flat_numel[sub_group]
    for key in keys:
        state[key] = torch.empty(numel, dtype=partition.dtype)
    info = zero.optimizer_swapper._get_param_swap_info(partition)  # registers the state tensors
    info.release_memory()


def begin_optimizer_step(engine) -> None:
    """Clear ZeRO's gradient partitions before an optimizer step's first micro-batch.

    DeepSpeed 0.19's ZeRO-3 copies a parameter's reduced gradient into its fp32 partition at
    micro-step 0 and adds to it at later micro-steps, but never clears a partition that no
    micro-batch of the window wrote. X-FM steps leave parameters untouched (the vision and fusion
    encoders on a text-only step), so without this such a parameter is updated with the previous
    step's gradient again, and one first touched at micro-step k > 0 accumulates onto it. That
    made a run depend on its history in the process: a resumed run (fresh zeros) and an
    uninterrupted one diverged at the first step after the resume. Untouched parameters now get
    an exact zero gradient, the same in every run.
    """
    zero_optimizer = engine.optimizer
    flat = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if flat is not None:  # ZeRO-3 (ZeRO-2 builds each window's partitions afresh: None grads become zeros)
        flat.zero_()
    # With optimizer offload (ZeRO-3: offload_optimizer, ZeRO-2: cpu_offload) each fp32 partition
    # keeps one persistent gradient, into which the boundary copies only this window's parameters;
    # the others would keep last step's values. NVMe-swapped sub-groups: see
    # _complete_swapped_gradients.
    if getattr(zero_optimizer, "offload_optimizer", False) or getattr(zero_optimizer, "cpu_offload", False):
        partitions = (getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
                      or getattr(zero_optimizer, "single_partition_of_fp32_groups", []))
        for fp32_partition in partitions:
            if fp32_partition.grad is not None:
                fp32_partition.grad.zero_()
    swapper = getattr(zero_optimizer, "optimizer_swapper", None)
    for info in getattr(swapper, "swap_params_info", {}).values():
        info.swapped_gradients.clear()  # last window's: the swap files stay, unread
        info.release_unswapped_gradients()


def _complete_swapped_gradients(engine) -> None:
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
    NVMe offload would have spared), :func:`begin_optimizer_step` forgets the last window's
    pieces, and the ranges no piece covers get zeros before the sub-group is swapped in. The fp32
    weights and Adam moments still live in the swap files."""
    swapper = getattr(engine.optimizer, "optimizer_swapper", None)
    if swapper is None:
        return
    swap_in = swapper.swap_in_optimizer_state

    def keep_gradient_in_memory(parameter, gradient_offsets, gradient_tensors):
        info = swapper._get_param_swap_info(parameter)
        if info is not None:
            for offset, gradient in zip(gradient_offsets, gradient_tensors):
                info.unswapped_gradients[offset] = gradient.detach().to("cpu", copy=True)

    def swap_in_this_windows_gradient(parameter, async_parameter=None):
        info = swapper._get_param_swap_info(parameter)
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
