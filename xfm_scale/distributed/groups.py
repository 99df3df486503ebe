"""Process groups, the parallel layout and seeding: torch.distributed, megatron-core's parallel
state and DeepSpeed's activation-checkpointing RNG tracker, wired in the one order that works.

Order matters (checked on CPU/gloo):
1. ``deepspeed.init_distributed`` (gloo on CPU, nccl on GPU);
2. megatron ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)``;
3. DeepSpeed's activation checkpointing configured with an mpu adapter, and its RNG tracker seeded
   (megatron's tracker needs CUDA; DeepSpeed's goes through the accelerator and works on CPU);
4. the model hooks (:mod:`xfm_scale.model.hooks`) pointed at DeepSpeed's checkpoint and tracker.

Only public API of DeepSpeed and megatron-core is used here; the engine (:mod:`xfm_scale.engine`)
builds on the same adapter.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfm_scale.config import ConfigError
from xfm_scale.distributed.collectives import gather_objects
from xfm_scale.model import hooks
from xfm_scale.model.layers import tp_rank, tp_size
from xfm_scale.quiet import silence_known_noise

log = logging.getLogger(__name__)


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
    silence_known_noise()  # also when a rank is started without an entry point (tests)
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
        # DeepSpeed prints "... shm_comm_op built successfully" for its JIT-loaded comm op, once
        # per rank: kept off stdout (the tools' output) and the log, except at debug level.
        announced = io.StringIO()
        with contextlib.redirect_stdout(announced):
            deepspeed.init_distributed(dist_backend="gloo" if _on_cpu() else "nccl", verbose=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
        for line in announced.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
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
        tensor_parallel_size=tp_size(),
        tensor_parallel_rank=tp_rank(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        data_parallel_rank=ps.get_data_parallel_rank())


def global_rank_table(layout: ParallelLayout) -> list[list[int]]:
    """The global rank of every (DP rank d, TP rank t), as ``table[d][t]``: DeepSpeed names the
    folders of NVMe-swapped optimizer state in a checkpoint by global rank, and a reader at another
    layout has to find the folder of each partition. Collective (every rank calls it)."""
    pairs = gather_objects((layout.data_parallel_rank, layout.tensor_parallel_rank))
    table = [[-1] * layout.tensor_parallel_size for _ in range(layout.data_parallel_size)]
    for rank, (d, t) in enumerate(pairs):
        table[d][t] = rank
    return table


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
