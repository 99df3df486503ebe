"""The run config: one typed, validated description of a pre-training run.

A run config is a YAML file (see launchers/configs/) whose sections map to the dataclasses below;
``--set dotted.key=value`` on the command line overrides any field (values parsed as YAML).
Relative paths are resolved against the config file's folder. Errors name the key and the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xfm_scale import runfolder
from xfm_scale.config import deepspeed_json, paths
from xfm_scale.config.errors import ConfigError
from xfm_scale.config.model import XFMConfig
from xfm_scale.config.overrides import coerce, set_dotted
from xfm_scale.config.yaml_files import read_yaml


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"
    """Name of an X-FM preset (tiny, base, large, giant)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of the preset, e.g. {"text.num_layers": 4}."""
    activation_checkpointing: bool = False
    """Recompute every encoder block in backward (DeepSpeed checkpointing). ``overrides`` refine it
    per encoder: ``{fusion.activation_checkpointing: false}``, or only the first N blocks with
    ``{vision.checkpointed_layers: N}``."""
    compile_blocks: bool = False
    """Compile each encoder block with ``torch.compile`` (the graphs of an encoder's blocks are
    shared, see ``XFM.compile_blocks``): fuses a block's element-wise work (LayerNorm, GELU, bias,
    dropout, residual, layer scale) into fewer kernels. Attention with dropout (text and fusion
    in the presets) runs eagerly between a block's graphs. With Apex installed, its
    FusedLayerNorm (a CUDA extension) may split the graphs too: check with the benchmark. The
    first micro-batches of each kind and shape pay the compilation (seconds to minutes).
    ZeRO-2 at TP=1 only: under ZeRO-3, DeepSpeed's parameter hooks (which torch.compile does not
    trace) split each block's graph at every layer, which was slower than eager; TP > 1 is not
    tested. Measure it with benchmarks/train_step.py ``--compile-blocks`` before turning it on
    for a long run."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend for ``compile_blocks``: ``inductor`` generates the fused
    kernels; ``aot_eager`` only traces (a quick check that the blocks compile, as the tests use)."""
    vocab_from_tokenizer: bool = True
    """Set text.vocab_size and pad id from the data section's tokenizer."""
    init_from: str | None = None
    """Start a new run from an xfm weights folder (OUT/xfm of tools/export_weights.py or
    tools/import_weights.py): its config.json replaces the preset (overrides still apply) and its
    tensors fill the model at this run's TP/DP. Ignored when resuming from a checkpoint."""
    init_text_from: str | None = None
    """Start the language encoder (and its MLM head) from a transformers BERT/RoBERTa folder or a
    hub id such as ``roberta-base`` (read from the Hugging Face cache; its config sets text.*);
    the tokenizer in data.tokenizer_dir must have its vocabulary size. None: from scratch."""
    init_vision_from: str | None = None
    """Start the vision encoder from Microsoft unilm's BEiT-v2 pre-training checkpoint (``.pth``,
    mask token included: the reference's beitv2_base_patch16_224_pt1k.pth), a timm BEiT-v2 folder
    (config.json + model.safetensors) or a timm weights file (their sizes set vision.*); refused
    when an encoder weight is missing or unexpected. None: from scratch."""


@dataclass(kw_only=True)
class DataSection:
    spec: str
    """Blend spec YAML (corpora, modalities, weights): see README "Data"."""
    tokenizer_dir: str
    """A transformers tokenizer directory (roberta-base / bert-base style, or the demo's)."""
    eval_manifest: str | None = None
    """Held-out pair corpus manifest for zero-shot retrieval and MLM accuracy; None disables eval."""
    eval_max_pairs: int = 1000
    """At most this many held-out pairs are evaluated."""
    cache_dir: str = "cache/blends"
    """Where built blends (and tar indexes) are cached."""
    num_workers: int = 0
    """DataLoader workers per rank (samples are the same for any number)."""
    seed: int = 0
    """Blend shuffling and per-sample augmentation/masking seed."""
    augment: bool = True
    """Random crops/flips/RandAugment for training images."""
    max_bad_sample_rate: float = 0.01
    """Bad samples (corrupt image, empty or over-long caption, truncated or missing shard) are
    skipped and counted per corpus and reason; above this share of the samples read, the run stops
    with the counts."""
    bad_sample_grace: int = 200
    """The rate is checked once this many samples have been read (a few early bad ones are noise)."""
    length_group_size: int = 0
    """Micro-batches of text and pairs from groups of samples of similar text length, so they are
    padded less (xfm_scale.data.lengths). 0 (default): off, the method's uniformly drawn batches.
    Else samples per group: a multiple of the global micro-batch of text and of pairs
    (micro-batch x DP size), e.g. 768 x DP for micro-batches of 256 and 96. Changes what a batch
    holds: ITC/ITM negatives are then captions of similar length."""
    length_group_window: int = 64
    """Groups per window of length_group_size x length_group_window samples, sorted by length
    and cut into groups whose order is shuffled: larger windows give closer lengths."""
    caption_cleaning: bool = False
    """Clean every pair caption (training and held-out) as X-FM's ``pre_caption`` does
    (xfm_scale.data.captions): lower-case; the punctuation ``,.'!?"()*#:;~`` and ``-``, ``/``
    become spaces; whitespace runs collapse; cut to 30 words. A caption left empty is skipped as
    an ``empty_caption`` bad sample. The reference cleans (launchers/configs/base.yaml: true);
    false (default): captions as stored (surrounding whitespace stripped), so existing configs
    and the demo read the text they were made with."""
    caption_choice: Literal["first", "draw"] = "first"
    """The caption of a pair sample that holds several (``KEY.captions.json``, written by
    ``tools/make_shards.py --captions all``: one sample per image). ``first`` (default): its
    ``KEY.txt``, the first caption, as before. ``draw``: one caption of its list per read, as the
    reference's ``random.choice`` (dataset/pretrain_dataset.py), seeded by (data.seed, the
    sample's blend position): the same caption at the same position for any DP size, worker count
    or resume. Pairs without a list read their ``KEY.txt`` either way; under ``draw`` a list that
    is empty or not a list of strings is a bad sample (``empty_caption_list``,
    ``bad_caption_list``)."""
    mlm_masking: Literal["reference", "xfm_scale"] = "xfm_scale"
    """How MLM (text) and IMLM (caption) masks are counted and placed
    (xfm_scale.data.masking.TokenMaskingConfig.scheme). ``reference`` (X-FM's, base.yaml): the
    number of masked tokens is round(prob x the whole sequence length, ``<s>`` and ``</s>``
    included), and any position but ``<s>`` may be masked, ``</s>`` too. ``xfm_scale`` (default):
    counted over the text's own tokens and special tokens never masked, so ``prob`` is the share
    of real tokens predicted and no target is the end-of-text marker (whose position the
    attention mask already gives away)."""


@dataclass(kw_only=True)
class BatchSection:
    micro_batch_size: int
    """Per-rank samples in a pair or image micro-batch."""
    text_micro_batch_size: int | None = None
    """Per-rank samples in a text micro-batch (default: micro_batch_size; the method uses 256 vs 96)."""
    global_batch_size: int
    """micro_batch_size x micro-steps per optimizer step x data-parallel size (DeepSpeed's
    train_batch_size). Must be divisible by micro_batch_size x data-parallel size. With
    ``step_schedule: per_modality``: the samples of one pair step and of one image step."""
    step_schedule: Literal["mixed", "per_modality"] = "mixed"
    """How micro-batches form optimizer steps. ``mixed`` (xfm_scale's default): each optimizer
    step sums global_batch_size / (micro_batch_size x DP) micro-batches, each of one modality, the
    modalities interleaved in proportion to the blend's weights. ``per_modality`` (the reference
    X-FM's Pretrain.py loop): a training step (what train.steps counts) is an iteration of one
    optimizer step per modality the blend holds, in the order text, image, pair, each on its own
    global batch (text_global_batch_size, global_batch_size) with its own gradients; the lr
    schedule moves once per iteration (warm-up and decay count iterations; iteration 0 runs at lr
    0, as the reference's). The blend's weights then only divide each modality among its corpora."""
    text_global_batch_size: int | None = None
    """With ``step_schedule: per_modality``: the samples of one text step (the reference: 256 per
    GPU, against 96 for pairs and images); default global_batch_size. Must be divisible by
    text_micro_batch_size x data-parallel size."""

    def micro_batch_sizes(self) -> dict[str, int]:
        text = self.text_micro_batch_size or self.micro_batch_size
        return {"pair": self.micro_batch_size, "image": self.micro_batch_size, "text": text}

    def modality_global_batch_sizes(self) -> dict[str, int]:
        """Samples of one optimizer step of each modality (``step_schedule: per_modality``)."""
        text = self.text_global_batch_size or self.global_batch_size
        return {"text": text, "image": self.global_batch_size, "pair": self.global_batch_size}

    def micro_steps_per_group(self, data_parallel_size: int) -> dict[str, int]:
        """Per modality, this rank's micro-batches in one optimizer step (``per_modality``)."""
        out = {}
        for modality, size in self.modality_global_batch_sizes().items():
            per_micro_step = self.micro_batch_sizes()[modality] * data_parallel_size
            if size % per_micro_step:
                key = "batch.text_global_batch_size" if modality == "text" else "batch.global_batch_size"
                micro = "batch.text_micro_batch_size" if modality == "text" else "batch.micro_batch_size"
                raise ConfigError(f"{key}={size} is not divisible by {micro} ({self.micro_batch_sizes()[modality]}) "
                                  f"x data-parallel size ({data_parallel_size}) = {per_micro_step}; choose a "
                                  f"multiple of {per_micro_step}")
            out[modality] = size // per_micro_step
        return out


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-4
    """Peak learning rate of pretrained (encoder) parameters."""
    new_param_lr_scale: float = 2.0
    """Learning-rate multiplier for newly initialised parameters (fusion encoder and heads)."""
    pretrained_modules: list[str] = field(default_factory=lambda: ["text", "vision", "text_mlm_head"])
    """Top-level model modules counted as pretrained (the rest get new_param_lr_scale). The language
    encoder's MLM head is imported with it (roberta-base's lm_head), as the reference's
    RobertaForMaskedLM is, so it trains at lr x1 like the encoder; a text source saved without a
    head leaves it newly initialised (the import warns) and still at x1 unless removed from here."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; not applied to norms, biases, gammas, tokens, bias tables."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 2500
    """Linear warm-up from 0 to the peak learning rate."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Decay after warm-up, to min_lr_ratio x peak at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (TP-correct: DeepSpeed's norm with the mpu)."""
    lr_x2: Literal["reference", "new_modules"] = "new_modules"
    """Which parameters train at lr x new_param_lr_scale (xfm_scale.engine.optim.param_groups).
    ``reference`` (X-FM's, base.yaml): only the ITC projections and temperature (``itc``) and the
    ITM head (``itm_head``); the fusion encoder, both MLM heads and the encoders train at the base
    lr (``pretrained_modules`` is then not used). ``new_modules`` (default): every top-level
    module not in ``pretrained_modules``, so the fusion encoder and its MLM head too. Fixed for a
    run: resuming with another value would give the saved optimizer groups other parameters."""
    no_decay_rule: Literal["reference", "xfm_scale"] = "xfm_scale"
    """Which parameters get no weight decay. ``reference`` (X-FM's, base.yaml): those whose name
    contains ``bias`` or a norm's ``norm.weight``/``norm.bias`` (so biases, LayerNorms and the
    relative-position bias tables), decaying the cls and mask tokens, layer-scale gammas, the
    temperature and the LayerNorm weight inside the ITM head (named ``itm_head.1``). ``xfm_scale``
    (default): every 1-D parameter (biases, norm weights, gammas) plus the cls/mask tokens, the
    bias tables and the temperature (timm's BEiT ``no_weight_decay`` list). Fixed for a run, as
    ``lr_x2`` is."""


@dataclass(kw_only=True)
class TrainSection:
    steps: int
    """Optimizer steps of the run."""
    seed: int = 1234
    """Model init and dropout seed (dropout is reseeded from (seed, step) every step)."""
    output_dir: str = "runs/xfm"
    """Checkpoints, metrics.jsonl, TensorBoard events, final_metrics.json."""
    log_every: int = 10
    """Log losses, throughput, MFU, memory and lr every N steps."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is published."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir if there is one."""
    stop_at_step: int | None = None
    """End this invocation after this step with a checkpoint, as if interrupted (a cluster job's
    wall-time slice); relaunching the same command continues the run. None: run to ``steps``."""
    max_skipped_in_a_row: int = 5
    """Optimizer steps whose losses or gradient norm are not finite are skipped (weights and Adam
    state untouched) and counted; this many in a row save a checkpoint and stop the run with a
    diagnosis (which objective, which micro-batch kind)."""
    collective_timeout_s: int = 600
    """Process-group timeout: when a rank dies, the others stop within this many seconds (the
    launcher usually stops them sooner)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard events under output_dir/tb."""


@dataclass(kw_only=True)
class ParallelSection:
    tensor_parallel_size: int = 1
    """Ranks sharing one model copy (megatron TP); must divide the world size and every head count."""


@dataclass(kw_only=True)
class DeepSpeedSection:
    config: str = "ds_configs/cpu_fp32.json"
    """A DeepSpeed JSON config (ds_configs/); batch sizes and clipping are filled in from this file."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of that JSON, e.g. {"zero_optimization.stage": 2}; a dict value is merged
    into the section it names ({"zero_optimization": {"stage": 2}} keeps the section's other keys)."""
    exact_pinned_host_memory: bool = True
    """With offload to pinned host memory: large pinned allocations at their exact size rather than
    torch's next power of two, and the pinned blocks ZeRO-3 frees while building the engine returned
    to the OS (xfm_scale.engine.memory.exact_pinned_allocations). False: torch's defaults."""
    zero3_gather_whole_blocks: bool = True
    """ZeRO-3: gather each encoder block that is not activation-checkpointed in one all-gather
    (DeepSpeed z3 leaf modules) rather than one per layer inside it: fewer, larger collectives and
    a tenth of the hooks. False: DeepSpeed's per-layer gathering everywhere."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection
    batch: BatchSection
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, base: XFMConfig | None = None) -> XFMConfig:
        """The preset (or ``base``, e.g. the config of the weights a run starts from) with the
        overrides and activation checkpointing applied."""
        config = XFMConfig.from_dict(base.to_dict()) if base else XFMConfig.from_preset(self.model.preset)
        config.set_activation_checkpointing(self.model.activation_checkpointing)
        config.apply_overrides(self.model.overrides)  # may refine it per encoder (vision.checkpointed_layers: 6)
        return config

    def deepspeed_config(self, data_parallel_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON with batch sizes, accumulation and clipping from this run config."""
        ds = self._deepspeed_json()
        ds.update(train_batch_size=self.batch.global_batch_size,
                  train_micro_batch_size_per_gpu=self.batch.micro_batch_size,
                  gradient_accumulation_steps=self.micro_steps_per_step(data_parallel_size),
                  gradient_clipping=self.optim.grad_clip)
        return ds

    def _deepspeed_json(self) -> dict[str, Any]:
        """deepspeed.config with deepspeed.overrides applied."""
        return deepspeed_json.read(self.deepspeed.config, self.deepspeed.overrides)

    def _check_compile(self, zero_stage: int) -> None:
        if self.parallel.tensor_parallel_size > 1:
            # megatron's TP collectives would run inside the compiled graphs: not tested
            raise ConfigError(f"model.compile_blocks=true with parallel.tensor_parallel_size="
                              f"{self.parallel.tensor_parallel_size}: compiled blocks are supported at TP=1 "
                              "(ZeRO-2); set parallel.tensor_parallel_size: 1 or model.compile_blocks: false")
        if zero_stage == 3:
            # DeepSpeed's ZeRO-3 hooks around every layer (not traceable) cut each compiled block
            # into per-layer graphs: on CPU at tiny size the blended step went from 0.37x to 0.28x
            # the baseline (benchmarks/RESULTS.md), and this combination is not tested
            raise ConfigError(f"model.compile_blocks=true with zero_optimization.stage=3 in {self.deepspeed.config}: "
                              "compiled blocks need ZeRO-2 (ds_configs/zero2_bf16.json, or deepspeed.overrides "
                              "{zero_optimization.stage: 2}); or set model.compile_blocks: false")
        import torch._dynamo  # (seconds to import: only when a run compiles)

        known = torch._dynamo.list_backends(exclude_tags=())
        if self.model.compile_backend not in known:
            raise ConfigError(f"model.compile_backend={self.model.compile_backend!r} is not a torch.compile backend; "
                              f"use one of {', '.join(sorted(known))} (or set model.compile_blocks: false)")

    # (key, smallest allowed value): fields whose bad values would otherwise fail inside the ranks
    # (a zero log_every divides by zero at the first step; a zero TP size in the model check)
    _MINIMUM = (("batch.micro_batch_size", 1), ("batch.global_batch_size", 1), ("batch.text_global_batch_size", 1),
                ("train.steps", 1),
                ("train.log_every", 1), ("train.eval_every", 0), ("train.save_every", 0), ("train.keep_last", 0),
                ("train.max_skipped_in_a_row", 1), ("train.collective_timeout_s", 1),
                ("parallel.tensor_parallel_size", 1), ("data.num_workers", 0), ("data.bad_sample_grace", 0),
                ("data.length_group_size", 0), ("data.length_group_window", 1),
                ("data.eval_max_pairs", 1), ("optim.lr", 0), ("optim.warmup_steps", 0), ("optim.grad_clip", 0))

    # (key, allowed values): Literal fields, checked before the ranks start
    _CHOICES = (("optim.schedule", ("linear", "cosine")), ("batch.step_schedule", ("mixed", "per_modality")), ("optim.lr_x2", ("reference", "new_modules")),
                ("optim.no_decay_rule", ("reference", "xfm_scale")), ("data.mlm_masking", ("reference", "xfm_scale")),
                ("data.caption_choice", ("first", "draw")))

    def _check_choices(self) -> None:
        for key, allowed in self._CHOICES:
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: use {' or '.join(repr(a) for a in allowed)}")

    def _check_ranges(self) -> None:
        for key, lowest in self._MINIMUM:
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value is not None and value < lowest:
                raise ConfigError(f"{key}={value} must be >= {lowest}")
        text_mbs = self.batch.text_micro_batch_size
        if text_mbs is not None and text_mbs < 1:
            raise ConfigError(f"batch.text_micro_batch_size={text_mbs} must be >= 1 (or null: micro_batch_size)")
        if not 0 <= self.data.max_bad_sample_rate <= 1:
            raise ConfigError(f"data.max_bad_sample_rate={self.data.max_bad_sample_rate} must be in [0, 1]")

    def check_itm_groups(self, group: int) -> None:
        """ITM draws each pair's hard negatives from the other pairs of its micro-batch (or of its
        ``itm_negative_group``): a pair micro-batch of one has none, and the draw fails at the first
        pair step. Called before the ranks start where the model is known there, and by the trainer
        on the model it assembled (a run from imported encoders, or resumed from its checkpoint's config)."""
        pairs = self.batch.micro_batch_size
        if pairs < 2:
            raise ConfigError(f"batch.micro_batch_size={pairs}: pair micro-batches need at least 2 pairs (ITM draws "
                              f"each pair's hard negatives from the other pairs of its micro-batch); use 2 or more")
        if group and pairs % group:
            source = ("model.overrides" if "objectives.itm_negative_group" in self.model.overrides
                      else f"the config of model.init_from {self.model.init_from}" if self.model.init_from
                      else f"preset {self.model.preset}")
            raise ConfigError(f"objectives.itm_negative_group={group} (from {source}) must divide "
                              f"batch.micro_batch_size={pairs}; set model.overrides "
                              f"objectives.itm_negative_group to a divisor of it (0: the whole micro-batch)")

    def _starting_model_config(self) -> tuple[bool, XFMConfig | None]:
        """(whether the model the ranks will build is known here, the config they start from
        before the overrides: None for the preset). A run from exported weights takes their model
        config (the trainer's _initial_weights), objectives included, so that one is checked. Not
        known without reading weights: encoders imported from transformers/timm checkpoints (their
        sizes come from those), or a run from exported weights that resumes (its checkpoint's
        config wins); the ranks check the model they assemble at start."""
        m = self.model
        if m.init_text_from or m.init_vision_from:
            return False, None
        if not m.init_from:
            return True, None
        if self.train.resume:
            if runfolder.RunFolder(Path(self.train.output_dir)).latest_complete() is not None:
                return False, None
        return True, XFMConfig.from_xfm_folder(m.init_from)

    def _check_data_spec(self) -> list:
        """The blend spec parses and names corpora that exist, checked here in one process rather
        than inside every rank after the process group is up; returns its corpus specs."""
        from xfm_scale.data import spec as data_spec

        try:
            return data_spec.check_spec(self.data.spec)
        except ValueError as err:  # DataSpecError, and anything the spec's YAML raises
            raise ConfigError(f"data.spec: {err}") from None

    def micro_steps_per_step(self, data_parallel_size: int) -> int:
        per_micro_step = self.batch.micro_batch_size * data_parallel_size
        if self.batch.global_batch_size % per_micro_step:
            raise ConfigError(
                f"batch.global_batch_size={self.batch.global_batch_size} is not divisible by "
                f"batch.micro_batch_size ({self.batch.micro_batch_size}) x data-parallel size "
                f"({data_parallel_size}) = {per_micro_step}; choose a multiple of {per_micro_step}")
        return self.batch.global_batch_size // per_micro_step

    def validate(self, world_size: int | None = None, *, check_data: bool = True) -> None:
        """Checks that need no ranks: files exist, sizes are consistent, the model config is valid.
        ``check_data``: also open the blend spec's corpora (:func:`xfm_scale.data.spec.check_spec`;
        a stat per shard, so done once per rank, not again where the loader opens them anyway)."""
        for key, path in (("data.spec", self.data.spec), ("data.tokenizer_dir", self.data.tokenizer_dir),
                          ("deepspeed.config", self.deepspeed.config)):
            if not os.path.exists(path):
                raise ConfigError(f"{key}: {path} does not exist; fix the path (relative paths are read from "
                                  f"the run config's folder, or from the current directory when given by --set)")
        if self.data.eval_manifest and not os.path.exists(self.data.eval_manifest):
            raise ConfigError(f"data.eval_manifest: {self.data.eval_manifest} does not exist; fix the "
                              f"path or set it to null to disable evaluation")
        for key in ("model.init_from", "model.init_text_from", "model.init_vision_from"):
            path = getattr(self.model, key.split(".")[1])
            hub_id = key == "model.init_text_from" and path and paths.is_hub_id(path)
            if path and not os.path.exists(path) and not hub_id:
                raise ConfigError(f"{key}: {path} does not exist; fix the path or remove the key")
        self._check_ranges()
        corpora = self._check_data_spec() if check_data else []
        ds = self._deepspeed_json()
        deepspeed_json.check(ds, self.deepspeed.config)
        if self.model.compile_blocks:
            self._check_compile(deepspeed_json.zero_stage(ds))
        self._check_choices()
        tp = self.parallel.tensor_parallel_size
        known, base = self._starting_model_config()
        model_config = self.model_config(base)
        if known:
            model_config.validate(tp)
        # a pair corpus with weight (or one whose modality only its shards tell) runs ITM
        if any(c.weight > 0 and c.modality in ("pair", None) for c in corpora):
            # (where the model is not known here, the group is checked by the ranks; the two-pairs
            # minimum holds for any group)
            self.check_itm_groups(model_config.objectives.itm_negative_group if known else 0)
        if world_size is not None:
            if world_size % tp:
                raise ConfigError(f"parallel.tensor_parallel_size={tp} does not divide the {world_size} "
                                  f"ranks; choose a divisor of {world_size}")
            self.micro_steps_per_step(world_size // tp)
            if self.batch.step_schedule == "per_modality":
                self.batch.micro_steps_per_group(world_size // tp)


# ---- loading --------------------------------------------------------------------------------------
_SECTIONS = {"model": ModelSection, "data": DataSection, "batch": BatchSection, "optim": OptimSection,
             "train": TrainSection, "parallel": ParallelSection, "deepspeed": DeepSpeedSection}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=2e-4", "model.overrides={text.num_layers: 4}"]`` -> dotted dict (YAML values)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected dotted.key=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _build_section(name: str, cls, values: Any):
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known keys of {name}: {', '.join(sorted(fields))}")
    required = [k for k, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(f'{name}.{k}' for k in missing)} in the run config")
    return cls(**{k: coerce(f"{name}.{k}", v, str(fields[k].type)) for k, v in values.items()})


def from_dict(raw: dict[str, Any], base_dir: str | Path = ".", overrides: dict[str, Any] | None = None) -> RunConfig:
    raw = copy.deepcopy(raw or {})
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] not in _SECTIONS:
            raise ConfigError(f"--set {dotted}: unknown section {dotted.split('.')[0]!r}; "
                              f"sections: {', '.join(_SECTIONS)}")
        section, *rest = dotted.split(".")
        if section in ("model", "deepspeed") and rest and rest[0] == "overrides" and len(rest) > 1:
            raw.setdefault(section, {}).setdefault("overrides", {})[".".join(rest[1:])] = value
        else:
            set_dotted(raw, dotted, value)
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(_SECTIONS)}")
    for required in ("data", "batch", "train"):
        if required not in raw:
            raise ConfigError(f"missing section {required!r} in the run config")
    # A relative path in the file is read from the file's folder; one given on the command line
    # (--set, a sweep's values) from the current directory, as a shell user expects.
    base, here = Path(base_dir).resolve(), Path.cwd()
    from_command_line = {tuple(dotted.split(".", 1)) for dotted in (overrides or {})}
    for section, key in paths.PATH_KEYS:
        if section in raw and key in raw[section]:
            root = here if (section, key) in from_command_line else base
            raw[section][key] = paths.resolve(raw[section][key], root, (section, key))
    if "config" not in raw.get("deepspeed", {}):
        raw.setdefault("deepspeed", {})["config"] = str(paths.REPOSITORY / DeepSpeedSection().config)
    return RunConfig(**{name: _build_section(name, cls, raw[name]) for name, cls in _SECTIONS.items() if name in raw})


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    raw = read_yaml(path, what="run config", error=ConfigError)
    return from_dict(raw, path.parent, overrides)
