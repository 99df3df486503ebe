"""Explicit FLOP counts of X-FM micro-batches, device peak FLOP/s, and MFU.

The count is written out per component, nanoGPT style: a multiply-add is 2 FLOPs, a matmul of an
[m, k] by a [k, n] matrix is ``2 m k n``. Only matrix products are counted (linear layers, the
attention score/value products, the patch-embedding convolution, the heads, the ITC similarity
matrices); elementwise work (LayerNorm, GELU, softmax, biases, residuals, dropout, losses) and
embedding lookups are left out: they are O(tokens x width), a few percent at most, and they are also
what ``torch.utils.flop_counter.FlopCounterMode`` leaves out, which is how tests/test_flops.py
checks every formula here against the real model.

What one micro-batch costs (model.xfm.XFM.forward), per kind:

* text: one language-encoder pass, the MLM head on the M masked positions.
* image: the MIM target (an unmasked vision pass under ``torch.no_grad``: forward only), then a
  masked vision pass that trains. With ``mim_target="none"`` nothing runs.
* pair: an unmasked vision pass and a caption text pass (both train: ITC, and ITM/IMLM for the
  vision side); ITC projections and the similarity matrix; the hard-negative similarities (no grad);
  the fusion encoder on 3B rows for ITM and the ITM head; a second text pass on the masked caption;
  the fusion encoder on B rows and the fusion MLM head for IMLM; a masked vision pass for MIM.
  The model runs the two vision passes as one pass of 2B rows and the two fusion passes as one of
  4B rows; a pass's count is linear in its rows, so the parts are counted as the method defines
  them (the breakdown keeps ITM's and IMLM's shares apart). All 4B fusion rows attend to the
  micro-batch's B images, and the model projects each image's keys and values once per fusion
  block: those projections are their own part (``fusion_image_keys_values``, B images), not
  counted per row. The count is of the work done: the reference projects them for each of the
  4B rows, 3B images' worth more.

Backward is counted where gradients flow, as the hardware computes it:

* A linear layer's backward is 2x its forward (input gradient + weight gradient). Megatron's
  column/row-parallel layers compute the input gradient even when their input needs none, so the
  fusion encoder's first projection costs 2x even on the detached text stream.
* The patch embedding's input (pixels) needs no gradient: its backward is the weight gradient only,
  1x its forward (a plain ``nn.Conv2d``: autograd skips the input gradient).
* With ``detach_text_for_fusion`` the masked-caption text pass feeds only the detached IMLM input:
  no backward at all. The caption text pass still has a full backward (from ITC). The fusion MLM
  head's decoder is the detached word embedding: its backward is the input gradient only (1x).
* The MIM target pass of an image micro-batch runs without grad: forward only. On pair micro-batches
  the target is the (detached) unmasked pass ITC/ITM/IMLM train through: no extra pass.
* The hard-negative similarities are computed under ``no_grad``: forward only.

Activation checkpointing recomputes each checkpointed block's forward once in backward, so the
recompute term is one more forward of the checkpointed transformer blocks (all of an encoder's, or
its first ``checkpointed_layers``) of every pass whose backward runs
(a checkpointed pass that is never back-propagated, like the detached masked-caption pass, is never
recomputed; the patch embedding and the heads are not checkpointed).

The counts are those of the whole model for one micro-batch of one data-parallel rank: with tensor
parallelism each of the TP ranks does 1/TP of it. The ITC similarity of the features gathered from
all DP ranks is computed whole on every rank: the hardware count has it all, the model count
(``FlopCount.model``, MFU's) each rank's 1/DP share (``FlopCount.repeated`` is the rest). Text lengths are the padded length L of the batch
tensors (the hardware computes the padding too).
Legend: B batch, L text tokens, P patches, N = 1 + P image tokens, D width, F MLP width,
C image width, E ITC width, V padded vocabulary, M predicted (masked) positions, R fusion rows.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from xfm_scale.batch import IGNORE_INDEX, Batch, ImageBatch, PairBatch, TextBatch
from xfm_scale.config import TransformerConfig, VisionEncoderConfig, XFMConfig

__all__ = ["FlopCount", "micro_batch_flops", "micro_batch_flop_breakdown", "device_peak_flops",
           "gpu_peak_flops", "mfu", "achieved_tflops"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one piece of training work. ``total`` = forward + backward + recompute."""
    forward: int = 0
    """The forward pass, including passes run without grad."""
    backward: int = 0
    """Gradient computation: 2x the forward of layers whose input and weight both need gradients,
    1x where only one of them does, nothing where no gradient flows."""
    recompute: int = 0
    """Activation checkpointing's second forward of the checkpointed blocks (0 when off)."""
    repeated: int = 0
    """The part of forward + backward that every data-parallel rank repeats on the same data: the
    ITC similarity of the gathered features (each rank computes all G x G of it). Hardware work
    (HFU counts it); the model's FLOPs (MFU) count each rank's 1/DP share only, else MFU would grow
    with the number of ranks (by ~40% at 1024 ranks of 96 pairs for ``base``)."""
    total: int = field(init=False)
    """Training FLOPs: forward + backward + recompute."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.forward + self.backward + self.recompute)

    @property
    def model(self) -> int:
        """MFU's count: forward + backward, without the recompute and the repeated work."""
        return self.forward + self.backward - self.repeated

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.forward + other.forward, self.backward + other.backward,
                         self.recompute + other.recompute, self.repeated + other.repeated)

    def __truediv__(self, parts: int) -> "FlopCount":
        """Each of ``parts`` equal shares (a tensor-parallel rank's)."""
        return FlopCount(self.forward / parts, self.backward / parts, self.recompute / parts, self.repeated / parts)


def _total(parts: dict[str, FlopCount]) -> FlopCount:
    return sum(parts.values(), FlopCount())


# ---- components: forward FLOPs of one operation ---------------------------------------------------
def linear_flops(rows: int, d_in: int, d_out: int) -> int:
    """``rows`` vectors through a [d_in -> d_out] linear layer (the bias add is not counted)."""
    return 2 * rows * d_in * d_out


def attention_projection_flops(tokens: int, D: int) -> int:
    """Fused Q/K/V projection (D -> 3D) and the output projection (D -> D) of self-attention."""
    return linear_flops(tokens, D, 3 * D) + linear_flops(tokens, D, D)


def attention_score_value_flops(batch: int, q_len: int, k_len: int, D: int) -> int:
    """Scores Q K^T and the weighted sum P V over all heads (heads x head width = D): each product is
    ``2 * batch * q_len * k_len * D``. Padding is computed: lengths are the padded ones."""
    return 2 * (2 * batch * q_len * k_len * D)


def mlp_flops(tokens: int, D: int, F: int) -> int:
    """Up-projection D -> F and down-projection F -> D."""
    return linear_flops(tokens, D, F) + linear_flops(tokens, F, D)


def self_attention_block_flops(batch: int, seq: int, cfg: TransformerConfig) -> int:
    """One transformer block of self-attention + MLP on ``batch`` sequences of ``seq`` tokens
    (identical matmuls for the post-LN text block and the pre-LN BEiT block)."""
    D, tokens = cfg.hidden_size, batch * seq
    return (attention_projection_flops(tokens, D) + attention_score_value_flops(batch, seq, seq, D)
            + mlp_flops(tokens, D, cfg.ffn_hidden_size))


def cross_attention_flops(rows: int, q_len: int, k_len: int, D: int, C: int, *, images: int) -> int:
    """``rows`` text rows of ``q_len`` queries (D -> D) attending to ``k_len`` image tokens of width
    C: the K/V projection (C -> 2D) of the tokens of ``images`` distinct images (rows that share an
    image share its keys and values), scores and values, output projection (D -> D)."""
    return (linear_flops(rows * q_len, D, D) + linear_flops(images * k_len, C, 2 * D)
            + attention_score_value_flops(rows, q_len, k_len, D) + linear_flops(rows * q_len, D, D))


def fusion_block_flops(rows: int, L: int, config: XFMConfig, *, images: int) -> int:
    """One fusion block: self-attention over the L text tokens, cross-attention to the N image
    tokens (keys and values projected for ``images`` distinct images), MLP."""
    f, v = config.fusion, config.vision
    D, N, tokens = f.hidden_size, 1 + v.num_patches, rows * L
    return (attention_projection_flops(tokens, D) + attention_score_value_flops(rows, L, L, D)
            + cross_attention_flops(rows, L, N, D, v.hidden_size, images=images)
            + mlp_flops(tokens, D, f.ffn_hidden_size))


def patch_embed_flops(batch: int, v: VisionEncoderConfig) -> int:
    """The patch-embedding convolution: per patch, a (C x p x p) -> D linear map."""
    return linear_flops(batch * v.num_patches, v.num_channels * v.patch_size ** 2, v.hidden_size)


# ---- passes: forward, backward and recompute of one encoder call ----------------------------------
def text_encoder_pass(config: XFMConfig, B: int, L: int, *, trains: bool, checkpointed: int) -> FlopCount:
    """The language encoder on [B, L] ids (``checkpointed``: how many of its blocks recompute). The
    embedding lookups cost no FLOPs; the blocks' backward is 2x their forward when ``trains`` (the
    embedding output needs gradients, so even the first block computes its input gradient)."""
    block = self_attention_block_flops(B, L, config.text)
    blocks = config.text.num_layers * block
    return FlopCount(blocks, 2 * blocks if trains else 0, checkpointed * block if trains else 0)


def vision_encoder_pass(config: XFMConfig, B: int, *, trains: bool, checkpointed: int) -> FlopCount:
    """The vision encoder on B images (masked or not: the mask token replaces patches, same shapes).
    Backward: the blocks 2x; the patch embedding 1x (weight gradient only: pixels need none)."""
    v = config.vision
    patch = patch_embed_flops(B, v)
    block = self_attention_block_flops(B, 1 + v.num_patches, v)
    blocks = v.num_layers * block
    if not trains:
        return FlopCount(patch + blocks)
    return FlopCount(patch + blocks, patch + 2 * blocks, checkpointed * block)


def fusion_encoder_pass(config: XFMConfig, rows: int, L: int, *, images: int, checkpointed: int) -> FlopCount:
    """The fusion encoder on ``rows`` captions of L tokens, each attending to an image's N tokens,
    with the keys and values of ``images`` distinct images projected (``rows=0, images=B``: only
    those projections). It always trains (its own weights; the image tokens carry gradients to the
    vision encoder). Its megatron linears compute input gradients unconditionally, so a detached
    text stream changes nothing here: backward 2x forward."""
    block = fusion_block_flops(rows, L, config, images=images)
    blocks = config.fusion.num_layers * block
    return FlopCount(blocks, 2 * blocks, checkpointed * block)


# ---- heads ----------------------------------------------------------------------------------------
def mlm_head(config: XFMConfig, M: int, *, decoder_trains: bool) -> FlopCount:
    """MLM head on the M masked positions only: dense D -> D (GELU, LayerNorm) and the decoder
    D -> V tied to the word embedding (V padded). Backward: dense 2x; decoder 2x when the tied
    embedding takes a gradient, 1x (input gradient only) when it is detached."""
    D, V = config.text.hidden_size, config.padded_vocab_size(1)
    dense, decoder = linear_flops(M, D, D), linear_flops(M, D, V)
    return FlopCount(dense + decoder, 2 * dense + (2 if decoder_trains else 1) * decoder)


def itc(config: XFMConfig, B: int, data_parallel_size: int) -> FlopCount:
    """ITC: text [CLS] and image pooled vector projected to E, then the similarity matrix of the
    features gathered over data-parallel ranks, [G, E] x [E, G] with G = B x DP (every rank computes
    all of it: all but 1/DP of it is ``repeated``). Everything trains: 2x."""
    E, G = config.objectives.itc_embed_dim, B * data_parallel_size
    similarity = linear_flops(G, E, G)
    forward = linear_flops(B, config.text.hidden_size, E) + linear_flops(B, config.vision.hidden_size, E) + similarity
    trained = 3 * similarity
    return FlopCount(forward, 2 * forward, repeated=trained - trained // data_parallel_size)


def itm_head(config: XFMConfig, B: int) -> FlopCount:
    """ITM: the hard-negative similarities [B, E] x [E, B] (under no_grad: forward only), and the
    2-way head on the fusion [CLS] of the 3B rows: D -> 2D -> 2 (trains: 2x)."""
    D, E = config.fusion.hidden_size, config.objectives.itc_embed_dim
    negatives = linear_flops(B, E, B)
    head = linear_flops(3 * B, D, 2 * D) + linear_flops(3 * B, 2 * D, 2)
    return FlopCount(negatives + head, 2 * head)


# ---- micro-batches --------------------------------------------------------------------------------
def _checkpointing(config: XFMConfig, override: bool | None) -> tuple[int, int, int]:
    """Checkpointed blocks of (text, vision, fusion): the config's, or all (``override`` True) or
    none (False)."""
    encoders = (config.text, config.vision, config.fusion)
    if override is not None:
        return tuple(e.num_layers if override else 0 for e in encoders)
    return tuple(e.checkpointed_blocks for e in encoders)


def _num_predicted(labels_BL: torch.Tensor) -> int:
    """M: positions an MLM head predicts (labels != -100); the head only computes those rows."""
    return int(labels_BL.ne(IGNORE_INDEX).sum())


def text_micro_batch(config: XFMConfig, b: TextBatch, ckpt: tuple[int, int, int]) -> dict[str, FlopCount]:
    """MLM: a training text pass and the MLM head (its tied decoder trains the embedding)."""
    B, L = b.input_ids_BL.shape
    return {"text_encoder": text_encoder_pass(config, B, L, trains=True, checkpointed=ckpt[0]),
            "mlm_head": mlm_head(config, _num_predicted(b.mlm_labels_BL), decoder_trains=True)}


def image_micro_batch(config: XFMConfig, b: ImageBatch, ckpt: tuple[int, int, int]) -> dict[str, FlopCount]:
    """MIM: the target pass (no grad: forward only, never checkpointed) and the masked pass that
    trains. Nothing with ``mim_target="none"``."""
    if config.objectives.mim_target == "none":
        return {}
    B = b.pixel_values_BCHW.shape[0]
    return {"vision_mim_target": vision_encoder_pass(config, B, trains=False, checkpointed=0),
            "vision_mim_masked": vision_encoder_pass(config, B, trains=True, checkpointed=ckpt[1])}


def pair_micro_batch(config: XFMConfig, b: PairBatch, ckpt: tuple[int, int, int],
                     data_parallel_size: int = 1) -> dict[str, FlopCount]:
    """ITC, ITM, IMLM and MIM (see the module docstring for what trains where)."""
    B, L = b.caption_ids_BL.shape
    detach = config.objectives.detach_text_for_fusion
    text_ckpt, vision_ckpt, fusion_ckpt = ckpt
    parts = {
        "vision_unmasked": vision_encoder_pass(config, B, trains=True, checkpointed=vision_ckpt),
        "text_caption": text_encoder_pass(config, B, L, trains=True, checkpointed=text_ckpt),
        "itc": itc(config, B, data_parallel_size),
        # The keys and values of the B images, projected once in each fusion block for all 4B rows.
        "fusion_image_keys_values": fusion_encoder_pass(config, 0, L, images=B, checkpointed=fusion_ckpt),
        "itm_fusion": fusion_encoder_pass(config, 3 * B, L, images=0, checkpointed=fusion_ckpt),
        "itm_head": itm_head(config, B),
        # Detached for IMLM: no gradient reaches it, so no backward and no recompute.
        "text_masked_caption": text_encoder_pass(config, B, L, trains=not detach, checkpointed=text_ckpt),
        "imlm_fusion": fusion_encoder_pass(config, B, L, images=0, checkpointed=fusion_ckpt),
        "imlm_head": mlm_head(config, _num_predicted(b.imlm_labels_BL), decoder_trains=not detach),
    }
    if config.objectives.mim_target != "none":
        parts["vision_mim_masked"] = vision_encoder_pass(config, B, trains=True, checkpointed=vision_ckpt)
    return parts


def micro_batch_flop_breakdown(config: XFMConfig, batch: Batch, activation_checkpointing: bool | None = None,
                               *, data_parallel_size: int = 1) -> dict[str, FlopCount]:
    """:func:`micro_batch_flops` per component (encoder passes and heads), in the method's order (the
    model runs some of these passes merged: see the module docstring)."""
    ckpt = _checkpointing(config, activation_checkpointing)
    if isinstance(batch, TextBatch):
        return text_micro_batch(config, batch, ckpt)
    if isinstance(batch, ImageBatch):
        return image_micro_batch(config, batch, ckpt)
    if isinstance(batch, PairBatch):
        return pair_micro_batch(config, batch, ckpt, data_parallel_size)
    raise TypeError(f"unknown micro-batch type {type(batch).__name__}")


def micro_batch_flops(config: XFMConfig, batch: Batch, activation_checkpointing: bool | None = None,
                      *, data_parallel_size: int = 1) -> FlopCount:
    """Training FLOPs of one micro-batch (whole model, one data-parallel rank; divide by the TP size
    for one GPU's share). ``activation_checkpointing``: None reads each encoder's flag from the
    config, a bool overrides all three. ``data_parallel_size`` sizes the ITC similarity matrix,
    which every rank computes over the gathered global batch. Reads the MLM/IMLM label tensors to
    count masked positions (a device sync when they live on a GPU)."""
    return _total(micro_batch_flop_breakdown(config, batch, activation_checkpointing,
                                             data_parallel_size=data_parallel_size))


# ---- peak FLOP/s ----------------------------------------------------------------------------------
# Dense (no 2:4 sparsity) peak per GPU from NVIDIA's data sheets; the sheets quote tensor-core
# figures "with sparsity", i.e. twice the dense ones.
#   H100 SXM5 / H200 SXM (H100 and H200 data sheets): BF16/FP16 1,979* -> 989; TF32 989* -> 494.7;
#     FP32 67 (non-tensor).
#   H100 NVL / H200 NVL: BF16 1,671* -> 835.5; TF32 835* -> 417.5; FP32 60.
#   H100 PCIe (H100 data sheet, PCIe column): BF16 1,513* -> 756.5; TF32 756* -> 378; FP32 51.
#   A100 SXM4 / PCIe (A100 data sheet): BF16 312 dense (624*); TF32 156 (312*); FP32 19.5.
# First substring match of torch.cuda.get_device_name() wins, so the specific names come first
# ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200").
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def _precision_key(dtype: torch.dtype) -> str:
    """bf16/fp16 -> the tensor-core figure; fp32 -> TF32 tensor cores when torch allows TF32
    matmuls (``torch.set_float32_matmul_precision("high")``), else the non-tensor FP32 figure."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    raise ValueError(f"no peak FLOP/s for dtype {dtype}; use bfloat16, float16 or float32")


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """Spec-sheet dense peak for a GPU named like ``torch.cuda.get_device_name()``; None if unknown."""
    key = _precision_key(dtype)
    for substring, peaks in GPU_PEAK_FLOPS:
        if substring in device_name:
            return peaks[key], f"spec sheet {substring} dense {key} ({device_name})"
    return None


@functools.cache
def _measured_matmul_peak(device: str, dtype: torch.dtype, threads: int, n: int = 2048, reps: int = 3) -> float:
    """Best of ``reps`` timed [n, n] x [n, n] matmuls after a warm-up (``threads`` keys the cache:
    the CPU figure depends on torch's thread count)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def device_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
                      ) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). A known GPU: its spec-sheet dense
    figure for ``dtype``. A CPU or an unknown GPU: the measured matmul peak (a 2048^2 matmul in
    ``dtype``, timed once per process and thread count, then cached)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name, dtype)
        if known is not None:
            return known
        label = name
    else:
        label = f"cpu, {torch.get_num_threads()} threads"
    peak = _measured_matmul_peak(str(device), dtype, torch.get_num_threads())
    return peak, f"measured matmul peak ({str(dtype).removeprefix('torch.')} 2048x2048, {label})"


# ---- utilisation ----------------------------------------------------------------------------------
def achieved_tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s (10^12 FLOP per second)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (0..1). ``flops`` and ``peak`` must
    describe the same devices (e.g. one micro-step's FLOPs per GPU and one GPU's peak)."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds and peak must be > 0, got {seconds} and {peak}")
    return flops / seconds / peak
