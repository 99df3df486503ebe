"""The training loop: blended micro-batches -> DeepSpeed ZeRO-3 engine -> logs, eval, checkpoints.

Read top to bottom: ``Trainer.__init__`` sets up (parallel state, data, engine, resume), ``run``
loops over optimizer steps, ``train_step`` is one step (gradient accumulation over the step's
micro-batches, each of one modality, the same modality on every data-parallel rank),
``log``/``maybe_eval``/``maybe_save`` do the rest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from xfm_scale import distributed, durable
from xfm_scale.batch import text_positions
from xfm_scale.checkpoint import writer as checkpoint
from xfm_scale.checkpoint.reader import ZeroCheckpoint
from xfm_scale.config import ConfigError, XFMConfig
from xfm_scale.config.run import RunConfig
from xfm_scale.data.blend import modality_shares
from xfm_scale.data.loader import format_bad_sample_report, merge_bad_sample_reports
from xfm_scale.data.lengths import TEXT_MODALITIES
from xfm_scale.data.spec import load_spec
from xfm_scale.engine import checkpoint_io, full_state
from xfm_scale.engine.build import build_engine
from xfm_scale.interop import pretrained
from xfm_scale.model import kernels
from xfm_scale.model.layers import data_parallel_group
from xfm_scale.model.tp_layout import Source
from xfm_scale.runfolder import RunFolder
from xfm_scale.train.flops import FlopCount, achieved_tflops, device_peak_flops, micro_batch_flops, mfu
from xfm_scale.train.progress import Progress

log = logging.getLogger("xfm_scale.trainer")


class TrainingStopped(RuntimeError):
    """The run stopped itself (after saving a checkpoint): too many skipped steps or bad samples.
    The message is the diagnosis and what to change."""


class MetricsWriter:
    """Rank 0 only: metrics.jsonl (one object per logged step) and TensorBoard events."""

    def __init__(self, output_dir: Path, tensorboard: bool):
        folder = RunFolder(output_dir)
        self.jsonl = open(folder.metrics, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder.tensorboard))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.layout = distributed.initialize(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed,
                                          timeout_s=cfg.train.collective_timeout_s)
        # The data spec is not checked again here: the entry point checked it before the ranks
        # started, and build_loader below opens the corpora with the same checks and errors.
        cfg.validate(self.layout.world_size, check_data=False)
        self.is_main = self.layout.rank == 0
        self.global_ranks = distributed.global_rank_table(self.layout)
        self.output_dir = Path(cfg.train.output_dir)
        self.folder = RunFolder(self.output_dir)
        self.ckpt_dir = self.folder.checkpoints
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            durable.write_atomically(self.folder.config_snapshot, json.dumps(cfg.to_dict(), indent=2))
        checkpoint.check_visible_to_every_rank(self.folder.config_snapshot, "train.output_dir")
        self.device = distributed.device()
        self.micro_steps = cfg.micro_steps_per_step(self.layout.data_parallel_size)
        self.per_modality = cfg.batch.step_schedule == "per_modality"
        # this rank's micro-batches per modality step (the per-modality schedule), else None
        self.group_micro_steps = (cfg.batch.micro_steps_per_group(self.layout.data_parallel_size)
                                  if self.per_modality else None)
        self.resume_step = checkpoint.agreed_latest_complete(self.ckpt_dir) if cfg.train.resume else None
        self.last_saved_step = self.resume_step  # kept here: a shared folder's listing may lag
        # read once: its model config builds the model, its layout decides how it is loaded
        self.resume_checkpoint = (ZeroCheckpoint(self.folder.checkpoint(self.resume_step))
                                  if self.resume_step is not None else None)
        self.tokenizer, self.model_config, init_source = self._model_config()
        self.loader = self.build_loader()
        ds_config = cfg.deepspeed_config(self.layout.data_parallel_size)
        self.engine = build_engine(
            self.model_config, cfg.optim, ds_config, cfg.train.steps,
            compile_backend=cfg.model.compile_backend if cfg.model.compile_blocks else None,
            gather_whole_blocks=cfg.deepspeed.zero3_gather_whole_blocks,
            steps_per_iteration=len(self.loader.iteration_order()) if self.per_modality else None,
            exact_pinned_host_memory=cfg.deepspeed.exact_pinned_host_memory)
        if init_source is not None:
            given = full_state.load_full_state(self.engine.deepspeed, init_source)
            if self.is_main:
                log.info("started from pretrained weights: %d parameter tensors loaded", given)
        self.eval_data = self._eval_data()
        self.step = self._resume()
        self.writer = MetricsWriter(self.output_dir, cfg.train.tensorboard) if self.is_main else None
        self.window: dict[str, list[float]] = defaultdict(list)
        self.skipped_in_a_row = 0
        self.nonfinite: list[str] = []  # this step's non-finite losses, "objective on the kind micro-batch #i"
        self.samples_read = 0  # by all ranks, this process's lifetime (the bad-sample rate's base)
        self.bad_samples_read = 0  # by all ranks, up to the last step (summed in _check_health, logged by log)
        self.last_log: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._log_setup(ds_config)

    # ---- setup ------------------------------------------------------------------------------------
    def _model_config(self):
        """(tokenizer, model config, source of the weights a new run starts from or None)."""
        from xfm_scale.data import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.data.tokenizer_dir)
        base, source = self._initial_weights()
        if self.resume_checkpoint is not None:  # the model that was trained (it may have started from imports)
            base = XFMConfig.from_dict(self.resume_checkpoint.meta["model_config"])
        config = self.cfg.model_config(base)
        if base is not None:  # the weights fix the vocabulary; the tokenizer must fit in it
            if len(tokenizer) > config.text.vocab_size:
                raise ConfigError(f"the tokenizer in {self.cfg.data.tokenizer_dir} has {len(tokenizer)} tokens but "
                                  f"the weights' vocabulary {config.text.vocab_size}; use the tokenizer "
                                  "those weights were trained with")
        elif self.cfg.model.vocab_from_tokenizer:
            config.text.vocab_size = len(tokenizer)
            config.text.pad_token_id = tokenizer.pad_token_id
        config.validate(self.layout.tensor_parallel_size)
        return tokenizer, config, source

    def _initial_weights(self) -> tuple[XFMConfig | None, Source | None]:
        """model.init_from / init_text_from / init_vision_from, for a run that does not resume."""
        m = self.cfg.model
        if self.resume_step is not None or not (m.init_from or m.init_text_from or m.init_vision_from):
            return None, None
        base, sources = None, []
        if m.init_from:
            base, source = pretrained.read_xfm_folder(m.init_from)
            sources.append(source)
        base = base or XFMConfig.from_preset(m.preset)
        if m.init_text_from:
            base.text, source = pretrained.read_hf_text(m.init_text_from)
            pretrained.fit_fusion_to_text(base)
            sources.insert(0, source)
        if m.init_vision_from:
            drop_path = base.vision.drop_path_rate
            base.vision, source = pretrained.read_timm_vision(m.init_vision_from)
            base.vision.drop_path_rate = drop_path
            sources.insert(0, source)
        return base, pretrained.combine(*sources)

    def _num_blend_samples(self, spec: str) -> int:
        """Enough samples for the run whatever the DP size (so a resume at another size builds the
        same blend): a mixed step uses at most global_batch x (largest / pair micro-batch) samples;
        a per-modality iteration each modality's global batch, from that modality's share.
        With length grouping, also a window of every grouped stream: the loader reads whole
        windows only (xfm_scale.data.lengths)."""
        sizes = self.cfg.batch.micro_batch_sizes()
        shares = modality_shares(load_spec(spec)[0])
        if self.per_modality:  # every iteration reads each modality's global batch from its stream
            groups = self.cfg.batch.modality_global_batch_sizes()
            needed = max(int(math.ceil(groups[m] * self.cfg.train.steps * 1.3 / share))
                         for m, share in shares.items() if share > 0) + 64
        else:
            per_step = self.cfg.batch.global_batch_size * max(sizes.values()) / sizes["pair"]
            needed = int(math.ceil(per_step * self.cfg.train.steps * 1.3)) + 64
        d = self.cfg.data
        if d.length_group_size:
            window = d.length_group_size * d.length_group_window
            needed += max((int(math.ceil(window / shares[m])) for m in TEXT_MODALITIES if m in shares), default=0)
        return needed

    def build_loader(self, spec: str | None = None):
        """This rank's loader over the run's blend (or over the blend ``spec``, as benchmarks/
        train_step.py does to time one micro-batch kind with the loader in the loop)."""
        from xfm_scale.data import BlendLoader, LoaderConfig, build_blend
        from xfm_scale.data.lengths import cache_text_bytes

        d, obj, vision = self.cfg.data, self.model_config.objectives, self.model_config.vision
        spec = spec or d.spec
        build = lambda: build_blend(spec, num_samples=self._num_blend_samples(spec), seed=d.seed,  # noqa: E731
                                    cache_dir=d.cache_dir)
        if self.is_main:  # one rank builds, the others load the cached blend
            blend = build()
            if d.length_group_size:
                cache_text_bytes(blend)  # the text lengths length grouping sorts by
        dist.barrier()
        blend = build()
        if blend.modality_weights().get("pair", 0) > 0:  # the model's group, as assembled on this rank
            self.cfg.check_itm_groups(obj.itm_negative_group)
        loader_cfg = LoaderConfig(
            tokenizer_dir=d.tokenizer_dir, micro_batch_sizes=self.cfg.batch.micro_batch_sizes(),
            micro_steps_per_step=self.micro_steps, micro_steps_per_group=self.group_micro_steps,
            image_size=vision.image_size, mim_grid=vision.grid_size,
            mim_num_masked=obj.mim_num_masked, mim_min_block=obj.mim_min_block,
            text_max_len=obj.text_max_length, caption_max_len=obj.caption_max_length,
            augment=d.augment, num_workers=d.num_workers, seed=d.seed,
            length_group_size=d.length_group_size, length_group_window=d.length_group_window,
            caption_cleaning=d.caption_cleaning, mlm_masking=d.mlm_masking, caption_choice=d.caption_choice,
            pin_memory=self.device.type == "cuda")
        loader = BlendLoader(blend, loader_cfg, dp_rank=self.layout.data_parallel_rank,
                             dp_size=self.layout.data_parallel_size)
        if obj.mim_target == "none" and "image" in loader.schedule.present:
            raise ConfigError("objectives.mim_target='none' leaves image-only micro-batches without a loss; "
                              "drop the image corpora from the blend or keep MIM on")
        return loader

    def _eval_data(self):
        from xfm_scale.data import load_pair_eval_set
        from xfm_scale.train.evaluation import mask_captions

        if not self.cfg.data.eval_manifest:
            return None
        vision = self.model_config.vision
        pairs = load_pair_eval_set(self.cfg.data.eval_manifest, self.cfg.data.tokenizer_dir,
                                   image_size=vision.image_size, mim_grid=vision.grid_size,
                                   caption_max_len=self.model_config.objectives.caption_max_length,
                                   caption_cleaning=self.cfg.data.caption_cleaning)
        n = self.cfg.data.eval_max_pairs
        if pairs.size > n:
            pairs = dataclasses.replace(pairs, sample_keys=pairs.sample_keys[:n], **{
                k: v[:n] for k, v in vars(pairs).items() if isinstance(v, torch.Tensor)})
        masked, labels = mask_captions(pairs, self.tokenizer.mask_token_id, len(self.tokenizer),
                                       self.tokenizer.all_special_ids, seed=self.cfg.data.seed)
        return pairs, masked, labels

    def _resume(self) -> int:
        ck, self.resume_checkpoint = self.resume_checkpoint, None  # its memory maps are not kept open
        if ck is None:
            return 0
        saved = (ck.tp, ck.dp, ck.stage)
        here = (self.layout.tensor_parallel_size, self.layout.data_parallel_size,
                self.engine.zero_stage)
        if saved == here and distributed.all_ranks_agree(self._same_nvme_swapping(ck)):
            client = checkpoint.load(self.engine, self.ckpt_dir, self.resume_step)
        else:
            client = self._load_resharded(ck)
        self.loader.load_state_dict(client["data_cursor"])
        if self.is_main:
            log.info("resumed from %s (step %d, saved at TP %d x DP %d with ZeRO-%d, running at TP %d x DP %d "
                     "with ZeRO-%d)", ck.folder.name, self.resume_step, *saved, *here)
        return self.resume_step

    def _same_nvme_swapping(self, ck: ZeroCheckpoint) -> bool:
        """Whether DeepSpeed's own load (which reads only its own layout and stage) can also read the
        checkpoint's NVMe swap files: the same sub-groups swapped under the same ids (none when NVMe
        offload is off on either side). Else NVMe offload was switched on or off, or the aio block
        or sub-group size changed, and the tensors are merged and re-partitioned instead."""
        saved = ck.nvme_swap_ids(self.layout.tensor_parallel_rank)
        if ck.nvme_offloaded and saved is None:
            return True  # saved before the ids were recorded: only DeepSpeed's load reads it
        return saved == checkpoint_io.nvme_swap_ids(self.engine.deepspeed)

    def _load_resharded(self, ck: ZeroCheckpoint) -> dict:
        """A checkpoint saved at another (TP, DP), ZeRO stage or NVMe swapping: merge every tensor and
        re-partition it here."""
        full_state.load_full_state(self.engine.deepspeed, ck.full, optimizer_state=True,
                                   step_count=ck.optimizer_step_count(), param_groups=ck.param_groups())
        if self.engine.scheduler is not None:
            self.engine.scheduler.load_state_dict(ck.meta["lr_scheduler"])
        checkpoint_io.set_step_counters(self.engine.deepspeed, ck.meta)
        return ck.meta

    def _log_setup(self, ds_config: dict) -> None:
        if not self.is_main:
            return
        for line in pretrained.describe_starting_points(self.cfg.model, self.resume_step):
            log.info("starts from: %s", line)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        log.info("layout: %s", self.layout)
        log.info("model: %.2fM parameters per TP rank; kernels: %s; optimizer: %s", n_params / 1e6,
                 kernels.report(), self.engine.optimizer_implementation)
        if self.per_modality:
            sizes = self.cfg.batch.modality_global_batch_sizes()
            log.info("batch: per-modality steps, each iteration %s; the lr schedule counts iterations; ZeRO stage %s",
                     ", then ".join(f"{m} (global {sizes[m]}, {self.group_micro_steps[m]} micro-steps)"
                                    for m in self.loader.iteration_order()),
                     ds_config.get("zero_optimization", {}).get("stage"))
        else:
            log.info("batch: global %d, %d micro-steps per step, ZeRO stage %s", self.cfg.batch.global_batch_size,
                     self.micro_steps, ds_config.get("zero_optimization", {}).get("stage"))
        if self.cfg.model.compile_blocks:
            log.info("encoder blocks compiled with torch.compile (%s); the first steps include the compilation",
                     self.cfg.model.compile_backend)

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        total = self.cfg.train.steps
        self.progress = Progress(total, self.step, enabled=self.is_main and self.cfg.train.progress_bar,
                                 every=self.cfg.train.log_every)
        steps = self.loader.iter_iterations()
        while self.step < total:
            try:
                batches = next(steps)
            except StopIteration:
                raise RuntimeError(f"the blend ran out at step {self.step} of {total}; rebuild it with more samples") from None
            stats = self.train_step(batches)
            self.step += 1
            self._accumulate(stats)
            self._check_health(stats)
            self.progress.update(self.step, {k.split("/")[-1]: v for k, v in stats.items()
                                             if k.startswith("loss_by_kind/")})
            if self.step % self.cfg.train.log_every == 0 or self.step == total:
                self.log()
            self.maybe_eval()
            self.maybe_save()
            if self.step == self.cfg.train.stop_at_step and self.step < total:
                self.progress.close()
                return self.pause()
        self.progress.close()
        return self.finish()

    def pause(self) -> dict[str, float]:
        """Stop early with a checkpoint; no final_metrics.json, so the run is not complete."""
        self.maybe_save(force=True)
        if self.is_main:
            self.writer.close()
            log.info("stopped at step %d (train.stop_at_step); relaunch to continue", self.step)
        dist.barrier()
        return {"step": float(self.step)}

    def train_step(self, groups: list[list]) -> dict[str, float]:
        """One training step: an optimizer step per group of micro-batches (one group in the mixed
        schedule; one per modality in the per-modality schedule's iteration)."""
        # Dropout, drop-path and ITM sampling streams are a function of (seed, step): a resumed run
        # draws exactly what an uninterrupted one would, with no RNG state to carry.
        distributed.seed_everything(self.cfg.train.seed * 1_000_003 + self.step)
        self.engine.train()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        batches = [batch for group in groups for batch in group]
        outputs = [losses for group in groups for losses in self.engine.step(group, self.device)]
        # Loss sums and finiteness flags stay on the device; one copy to the host after the last
        # micro-batch (a .item()/.cpu() per loss would wait for the GPU at every micro-batch).
        sums: dict[str, torch.Tensor] = {}  # key -> (sum, count)
        finite: list[tuple[str, torch.Tensor]] = []  # ("objective on the kind micro-batch #i", flag)
        samples: dict[str, int] = defaultdict(int)
        for index, (batch, losses) in enumerate(zip(batches, outputs)):
            for name, value in losses.items():
                value = value.float()
                key = f"loss/{name}"
                sums[key] = sums.get(key, 0) + torch.stack([value, torch.ones_like(value)])
                if name != "total":
                    finite.append((f"{name} on the {batch.modality} micro-batch #{index}", torch.isfinite(value)))
                else:  # steps differ in modality: the total per micro-batch kind is what can be compared
                    kind = f"loss_by_kind/{batch.modality}"
                    sums[kind] = sums.get(kind, 0) + torch.stack([value, torch.ones_like(value)])
            samples[batch.modality] += batch.size * self.layout.data_parallel_size
        flags = torch.stack([flag for _, flag in finite]).cpu().tolist() if finite else []
        self.nonfinite = [where for (where, _), ok in zip(finite, flags) if not ok]
        sync()
        seconds = time.perf_counter() - start
        flops = sum((self._flops(batch) for batch in batches), FlopCount())  # reads labels: after the timed part
        stats = self._reduce_losses(sums)
        stats.update({f"samples_per_s/{m}": n / seconds for m, n in samples.items()})
        stats["samples_per_s/all"] = sum(samples.values()) / seconds
        stats["skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        self.samples_read += sum(samples.values())
        stats["step_seconds"] = seconds
        stats["lr"] = self.engine.scheduler.get_last_lr()[0] if self.engine.scheduler else self.cfg.optim.lr
        stats.update(self._flops_stats(flops, seconds))
        stats.update(text_padding(batches))
        return stats

    def _check_health(self, stats: dict[str, float]) -> None:
        """Count skipped steps and bad samples; stop (after a checkpoint) past the configured limits."""
        self.bad_samples_read = self._bad_sample_total()
        if stats["skipped_steps"]:
            self.skipped_in_a_row += 1
            where = sorted({w for ws in distributed.gather_objects(self.nonfinite) for w in ws})
            diagnosis = ("non-finite " + ", ".join(where)) if where else "a non-finite gradient norm with finite losses"
            if self.is_main:
                log.warning("step %d skipped (%d in a row): %s", self.step, self.skipped_in_a_row, diagnosis)
            if self.skipped_in_a_row >= self.cfg.train.max_skipped_in_a_row:
                self._stop(f"{self.skipped_in_a_row} optimizer steps in a row were skipped for non-finite values "
                           f"(last, step {self.step}: {diagnosis}); check that corpus's data, or restart from an "
                           "earlier checkpoint's export (model.init_from) with a lower optim.lr (a resume keeps the "
                           "saved learning rate)")
        else:
            self.skipped_in_a_row = 0
        d, bad = self.cfg.data, self.bad_samples_read
        read = self.samples_read + bad
        if read >= d.bad_sample_grace and bad > d.max_bad_sample_rate * read:
            counts = self._replica_counts(self.loader.bad_samples.as_dict())
            self._stop(f"{bad} of {read} samples read were bad ({bad / read:.1%} > data.max_bad_sample_rate="
                       f"{d.max_bad_sample_rate}): " + ", ".join(f"{k}={n}" for k, n in sorted(counts.items()))
                       + "; repair or drop those shards (tools/make_shards.py), or raise data.max_bad_sample_rate")

    def _stop(self, why: str) -> None:
        if self.window:  # the metrics of the steps that led here
            self.log()
        self.maybe_save(force=True)
        if self.is_main:
            log.error("stopping at step %d: %s", self.step, why)
        raise TrainingStopped(f"stopped at step {self.step} (checkpoint saved): {why}")

    def _reduce_losses(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean over micro-steps, averaged over data-parallel ranks (TP ranks hold equal values)."""
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys]).to(distributed.collective_device())
        group = data_parallel_group()
        if group is not None:
            dist.all_reduce(packed, group=group)
            packed[:, 0] /= dist.get_world_size(group)
            packed[:, 1] /= dist.get_world_size(group)
        packed = packed.cpu()
        return {k: (packed[i, 0] / packed[i, 1]).item() for i, k in enumerate(keys)}

    def _flops(self, batch) -> FlopCount:
        # FLOPs of this rank's micro-batch (recompute included when checkpointing); under TP each
        # rank does 1/TP of them.
        count = micro_batch_flops(self.model_config, batch, data_parallel_size=self.layout.data_parallel_size)
        return count / self.layout.tensor_parallel_size

    def _flops_stats(self, flops: FlopCount, seconds: float) -> dict[str, float]:
        """MFU counts the model's FLOPs (forward + backward, the ITC similarity every rank repeats
        once); HFU what the hardware did (also the repeats and the checkpointing recompute)."""
        dtype = torch.bfloat16 if self.engine.bf16() else torch.float32
        peak, _ = device_peak_flops(dtype)
        return {"tflops_per_rank": achieved_tflops(flops.model, seconds), "mfu": mfu(flops.model, seconds, peak),
                "hfu": mfu(flops.total, seconds, peak)}

    def _accumulate(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.window[key].append(value)

    # ---- logging, evaluation, checkpoints ---------------------------------------------------------
    def log(self) -> None:
        metrics = {k: sum(v) / len(v) for k, v in self.window.items()}
        metrics.update(self._memory())
        metrics["bad_samples"] = float(self.bad_samples_read)
        metrics.update(self._bad_samples_since_last_log())
        self.window.clear()
        if self.is_main:
            self.writer.write(self.step, metrics)
            log.info("step %d: %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                                     if k.startswith("loss/")))
        self.last_log = metrics

    def _memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
        import psutil

        return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}

    def _replica_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Per-key sums over data-parallel replicas of this rank's ``counts`` (collective)."""
        return _sum_counts(self._from_replicas(counts))

    def _from_replicas(self, value):
        """``value`` from every data-parallel replica (collective; ``None`` for the others). The TP
        ranks of a replica read the same samples, so each replica reports once, through its TP
        rank 0 (dividing every rank's count by TP would round a replica's odd count down)."""
        parts = distributed.gather_objects(value if self.layout.tensor_parallel_rank == 0 else None)
        return [part for part in parts if part is not None]

    def _bad_samples_since_last_log(self) -> dict[str, float]:
        """Warn (rank 0) of the bad samples met since the last log, per corpus and reason with the
        first keys and shards; returns the counts since the start, ``bad_samples/CORPUS/REASON``,
        for metrics.jsonl. One gather carries both."""
        new = self.loader.new_bad_samples()  # on every rank: its next report starts here
        parts = self._from_replicas((new, self.loader.bad_samples.as_dict()))
        report = merge_bad_sample_reports([reports for reports, _ in parts])
        if report and self.is_main:
            log.warning("bad samples skipped since the last log (each replaced by another sample of its corpus): %s",
                        format_bad_sample_report(report))
        totals = _sum_counts(counts for _, counts in parts)
        return {f"bad_samples/{key}": float(n) for key, n in sorted(totals.items())}

    def _bad_sample_total(self) -> int:
        """Bad samples read by all replicas (each counted once, through its TP rank 0)."""
        mine = self.loader.bad_samples.total() if self.layout.tensor_parallel_rank == 0 else 0
        return int(distributed.sum_over_ranks(mine))

    def maybe_eval(self, force: bool = False) -> None:
        every = self.cfg.train.eval_every
        if self.eval_data is None or not (force or (every and self.step % every == 0)):
            return
        if self.last_eval.get("step") == self.step:
            return
        from xfm_scale.train.evaluation import evaluate

        pairs, masked, labels = self.eval_data
        self.engine.eval()
        metrics = evaluate(self.engine.module, pairs, masked, labels, micro_batch=self.cfg.batch.micro_batch_size,
                           dp_rank=self.layout.data_parallel_rank, dp_size=self.layout.data_parallel_size,
                           group=data_parallel_group(), device=self.device)
        self.engine.train()
        self.last_eval = {**metrics, "step": self.step}
        if self.is_main:
            self.writer.write(self.step, metrics)
            log.info("eval at step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def maybe_save(self, force: bool = False) -> None:
        every = self.cfg.train.save_every
        if not (force or (every and self.step % every == 0)):
            return
        if self.last_saved_step == self.step:
            return
        folder = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.client_state(), self.cfg.train.keep_last)
        self.last_saved_step = self.step
        if self.is_main:
            self._say(f"checkpoint saved: {folder}")

    def client_state(self) -> dict:
        """What a checkpoint carries besides DeepSpeed's own state (see xfm_scale/checkpoint.py)."""
        return {"step": self.step, "data_cursor": self.loader.state_dict(), "run_config": self.cfg.to_dict(),
                "model_config": self.model_config.to_dict(), "seed": self.cfg.train.seed,
                "layout": {"tensor_parallel_size": self.layout.tensor_parallel_size,
                           "data_parallel_size": self.layout.data_parallel_size,
                           "global_ranks": self.global_ranks},
                "nvme_swap_ids": checkpoint_io.nvme_swap_ids(self.engine.deepspeed),
                "universal_checkpoint_info": checkpoint.universal_checkpoint_info(
                    self.engine.module, self.model_config.text.vocab_size,
                    self.model_config.padded_vocab_size(self.layout.tensor_parallel_size))}

    def finish(self) -> dict[str, float]:
        if self.window:
            self.log()
        self.maybe_eval(force=True)
        self.maybe_save(force=True)
        final = {**self.last_log, **self.last_eval, "step": float(self.step)}
        if self.is_main:
            durable.write_atomically(self.folder.final_metrics, json.dumps(final, indent=2))
            self.writer.close()
            self._say(f"run finished at step {self.step}: {self.folder.final_metrics}")
        dist.barrier()
        return final

    def _say(self, text: str) -> None:
        """A line for the person watching (between the bar's redraws), also in the log."""
        progress = getattr(self, "progress", None)
        if progress is not None and progress.enabled:
            progress.message(text)
        else:
            log.info("%s", text)


def text_padding(batches: list) -> dict[str, float]:
    """``text_padding/<kind>``: the share of this rank's text positions that are padding, per
    micro-batch kind with text (text, pair). The model computes them (MFU counts them as work):
    data.length_group_size lowers it where texts differ in length."""
    return {f"text_padding/{m}": 1 - real / positions for m, (real, positions) in text_positions(batches).items()}


def _sum_counts(parts) -> dict[str, int]:
    """Per-key sums of several ``{key: count}`` dicts."""
    totals: dict[str, int] = defaultdict(int)
    for part in parts:
        for key, n in part.items():
            totals[key] += n
    return dict(totals)
