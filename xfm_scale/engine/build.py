"""The engine: X-FM built inside ZeRO-3's partitioned construction, wrapped by DeepSpeed, returned
as an :class:`Engine` whose ``step`` runs one optimizer step's micro-batches with every workaround
applied (so no caller can forget one)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from xfm_scale.distributed import MegatronMPU
from xfm_scale.engine import checkpoint_io, grads, memory, optim, versions

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """The DeepSpeed engine that trains X-FM, with the per-step workarounds applied by :meth:`step`.

    Use :meth:`step` for training; ``deepspeed`` (the ``DeepSpeedEngine``) is for checkpoint I/O
    (:mod:`xfm_scale.checkpoint.writer`) and for what DeepSpeed's public API offers."""
    deepspeed: Any
    """The ``DeepSpeedEngine``."""
    optimizer: Any
    """DeepSpeed's ZeRO optimizer (wrapping the torch optimizer of :mod:`xfm_scale.engine.optim`)."""
    scheduler: Any
    """The learning-rate scheduler DeepSpeed steps at each optimizer step."""
    optimizer_implementation: str = "torch"
    """Which Adam implementation runs (:func:`xfm_scale.engine.optim.build_optimizer`'s choice)."""

    @property
    def module(self) -> torch.nn.Module:
        """The X-FM model (its parameters ZeRO-3-partitioned under stage 3)."""
        return self.deepspeed.module

    def __call__(self, batch):
        """A forward pass (evaluation, probes); training goes through :meth:`step`."""
        return self.deepspeed(batch)

    def train(self) -> None:
        self.deepspeed.train()

    def eval(self) -> None:
        self.deepspeed.eval()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped for a non-finite gradient norm, over the run."""
        return self.deepspeed.skipped_steps

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.zero_optimization_stage()

    def bf16(self) -> bool:
        return self.deepspeed.bfloat16_enabled()

    @property
    def offloads_optimizer(self) -> bool:
        """Whether ZeRO keeps the optimizer state in host memory (or on NVMe)."""
        return bool(getattr(self.optimizer, "offload_optimizer", False) or getattr(self.optimizer, "cpu_offload", False))

    @property
    def offloads_parameters(self) -> bool:
        """Whether ZeRO-3 keeps the parameters in host memory between uses."""
        return bool(getattr(self.optimizer, "offload_param", False))

    def step(self, micro_batches: list, device: torch.device | None = None,
             around_forward: Callable[[], ContextManager] | None = None) -> list[dict[str, torch.Tensor]]:
        """One optimizer step over ``micro_batches`` (moved to ``device``): the gradient is their
        mean, the update comes after the last. Returns, per micro-batch, its losses detached
        (``total`` included). ``around_forward``: a context each forward pass runs in
        (benchmarks/memory.py measures it).

        The step is whatever the caller passes, not DeepSpeed's fixed gradient_accumulation_steps:
        the boundary is set for every micro-batch (DeepSpeed's public
        ``set_gradient_accumulation_boundary``) and each loss is divided by the number of
        micro-batches, exactly what DeepSpeed's own scaling does when the counts agree, so steps of
        different sizes (one per modality in the per-modality schedule) are each complete. The
        gradients DeepSpeed would otherwise carry over from the previous step are cleared first
        (:func:`xfm_scale.engine.grads.clear_stale_gradients`)."""
        if not micro_batches:
            raise ValueError("an optimizer step needs at least one micro-batch")
        grads.clear_stale_gradients(self.deepspeed)
        losses, last = [], len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            self.deepspeed.set_gradient_accumulation_boundary(index == last)
            with around_forward() if around_forward is not None else contextlib.nullcontext():
                out = self.deepspeed(batch.to(device, non_blocking=True) if device is not None else batch)
            self.deepspeed.backward(out.total / len(micro_batches), scale_wrt_gas=False)
            # At the last micro-batch DeepSpeed skips the update (and counts it) when the global
            # gradient norm is not finite; nothing non-finite reaches weights or Adam state.
            self.deepspeed.step()
            losses.append({**{name: value.detach() for name, value in out.losses.items()},
                           "total": out.total.detach()})
        return losses


def build_engine(model_config, optim_cfg, ds_config: dict, total_steps: int, compile_backend: str | None = None,
                 gather_whole_blocks: bool = True, exact_pinned_host_memory: bool = True,
                 steps_per_iteration: int | None = None) -> Engine:
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
      engine is built (:mod:`xfm_scale.engine.memory`).
    ``compile_backend``: compile the encoder blocks with this torch.compile backend (None: eager).
    ``steps_per_iteration``: the per-modality schedule's optimizer steps per iteration (the lr
    schedule then counts iterations: :func:`xfm_scale.engine.optim.build_scheduler`).
    The installed DeepSpeed and megatron-core are checked against the tested versions first
    (:func:`xfm_scale.engine.versions.check_versions`).
    """
    import deepspeed
    from megatron.core import parallel_state as ps

    from xfm_scale.model.xfm import XFM

    versions.check_versions()
    mpu = MegatronMPU()
    zero = ds_config.get("zero_optimization", {})
    stage3 = zero.get("stage", 0) == 3
    pinned = exact_pinned_host_memory and memory.pins_offloaded_memory(ds_config)
    if pinned:
        memory.exact_pinned_allocations()
    with deepspeed.zero.Init(data_parallel_group=ps.get_data_parallel_group(), mpu=mpu,
                             config_dict_or_path=memory.unpinned_partitions(ds_config) if pinned else ds_config,
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
    implementation = optimizer.xfm_implementation
    scheduler = optim.build_scheduler(optimizer, total_steps, optim_cfg, steps_per_iteration)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    if pinned:
        memory.release_cached_pinned_memory()
    checkpoint_io.load_checkpoints_weights_only(engine)
    grads.complete_swapped_gradients(engine)
    return Engine(deepspeed=engine, optimizer=optimizer, scheduler=scheduler, optimizer_implementation=implementation)


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
