"""X-FM: language, vision and fusion encoders with every pre-training head and loss.

One forward per micro-batch kind (batch.py): text -> MLM; image -> MIM; pair -> ITC, ITM, IMLM,
MIM. The method: docs/method.md. This module knows megatron's layers and parallel
state (to find the data-parallel group for ITC) but nothing of DeepSpeed.
Legend: B batch, L caption tokens, N image tokens (1+P), D width, E ITC width.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from xfm_scale.batch import Batch, ImageBatch, PairBatch, TextBatch
from xfm_scale.config import XFMConfig
from xfm_scale.model.fusion import FusionEncoder
from xfm_scale.model.heads import ContrastiveHead, MLMHead, itm_head
from xfm_scale.model.layers import data_parallel_group, megatron_config, tp_size
from xfm_scale.model.losses import contrastive_loss, mim_loss, sample_hard_negatives
from xfm_scale.model.text import TextEncoder
from xfm_scale.model.vision import VisionEncoder

OBJECTIVES = ("mlm", "itc", "itm", "imlm", "mim")


class XFMOutput(dict):
    """``{"losses": {...}, "intermediates": {...}}`` with attribute access.

    A dict, not a dataclass: ZeRO-3 wraps the tensors of a module's output to fire its backward
    hooks, and it can only find them inside tuples, lists and dicts."""

    def __init__(self, losses: dict[str, torch.Tensor], intermediates: dict[str, torch.Tensor] | None = None):
        super().__init__(losses=losses, intermediates=intermediates or {})

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        """Each objective's loss on this micro-batch (only those the micro-batch kind computes)."""
        return self["losses"]

    @property
    def intermediates(self) -> dict[str, torch.Tensor]:
        """With ``return_intermediates``: tensors the tests inspect (image tokens, MIM target...)."""
        return self["intermediates"]

    @property
    def total(self) -> torch.Tensor:
        """Sum of the losses (all weights 1); a zero without grad when there is none."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack(list(self.losses.values())).sum()


class XFM(nn.Module):
    def __init__(self, config: XFMConfig):
        super().__init__()
        config.validate(tp_size())
        self.config = config
        mp, std, dtype = megatron_config(config.torch_dtype), config.init_std, config.torch_dtype
        padded_vocab = config.padded_vocab_size(tp_size())
        t, v, f, o = config.text, config.vision, config.fusion, config.objectives
        self.text = TextEncoder(t, padded_vocab, mp, std)
        self.vision = VisionEncoder(v, mp, std)
        self.fusion = FusionEncoder(f, v.hidden_size, mp, std)
        word_embedding = self.text.embeddings.word_embeddings
        self.text_mlm_head = MLMHead(t.hidden_size, t.layer_norm_eps, padded_vocab, t.vocab_size,
                                     word_embedding, detach_decoder=False, std=std, dtype=dtype)
        self.fusion_mlm_head = MLMHead(f.hidden_size, f.layer_norm_eps, padded_vocab, t.vocab_size,
                                       word_embedding, detach_decoder=o.detach_text_for_fusion,
                                       std=std, dtype=dtype)
        self.itc = ContrastiveHead(t.hidden_size, v.hidden_size, o.itc_embed_dim, o.temperature_init,
                                   (o.temperature_min, o.temperature_max), std, dtype)
        self.itm_head = itm_head(f.hidden_size, std, dtype)

    # ---- public encoders --------------------------------------------------------------------------
    def encode_text(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
        """Language encoder's last hidden states [B, L, D]."""
        return self.text(input_ids_BL, attention_mask_BL)

    def encode_image(self, pixel_values_BCHW: torch.Tensor, mim_mask_BP: torch.Tensor | None = None) -> torch.Tensor:
        """Vision tokens [B, 1+P, D]: the pooled vector at index 0, patch tokens after."""
        return self.vision(pixel_values_BCHW, mim_mask_BP)

    def fuse(self, text_BLD: torch.Tensor, text_mask_BL: torch.Tensor, image_UND: torch.Tensor,
             image_index_B: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion encoder output [B, L, D]: the text stream attending to the image tokens (text row b
        to image ``image_index_B[b]`` when given, else to image b)."""
        return self.fusion(text_BLD, text_mask_BL, image_UND, image_index_B)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Parameters a module uses without owning them (the tied MLM decoders): ZeRO-3 must be told
        (``deepspeed.zero.register_external_parameter``) or it would not gather them there."""
        weight = self.text.embeddings.word_embeddings.weight
        return [(self.text_mlm_head, weight), (self.fusion_mlm_head, weight)]

    def encoder_blocks(self) -> list[nn.Module]:
        """Every transformer block of the three encoders."""
        return [*self.text.blocks, *self.vision.blocks, *self.fusion.blocks]

    def single_pass_blocks(self) -> list[nn.Module]:
        """The encoder blocks that keep their activations (each encoder's blocks after its first
        ``checkpointed_blocks``) and run at most once with grad per micro-batch. With
        ``detach_text_for_fusion`` off the masked caption's text pass trains too, so the text
        encoder's blocks run twice per pair micro-batch and are not among them."""
        encoders = [self.vision, self.fusion]
        if self.config.objectives.detach_text_for_fusion:
            encoders.insert(0, self.text)
        return [block for encoder in encoders for block in list(encoder.blocks)[encoder.cfg.checkpointed_blocks:]]

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Compile each encoder block with ``torch.compile`` (regional compilation).

        Blocks of one encoder share their code, and their parameters are graph inputs, so the
        graphs of one block serve all of that encoder's blocks (plus a few variants: with and
        without grad, eval, a new batch size or length before dynamo marks it dynamic). Without
        dropout a block is one graph; attention with dropout runs eagerly between graphs (see
        ``layers.attend``). Compiling blocks rather than the whole model keeps the losses, the tied
        heads and the micro-batch dispatch eager, and leaves state-dict names unchanged
        (``Module.compile`` compiles in place)."""
        for block in self.encoder_blocks():
            block.compile(backend=backend)

    # ---- pre-training forward -----------------------------------------------------------------------
    def forward(self, batch: Batch, return_intermediates: bool = False) -> XFMOutput:
        if isinstance(batch, TextBatch):
            return self._text_step(batch)
        if isinstance(batch, ImageBatch):
            return self._image_step(batch, return_intermediates)
        if isinstance(batch, PairBatch):
            return self._pair_step(batch, return_intermediates)
        raise TypeError(f"unknown micro-batch type {type(batch).__name__}")

    def _text_step(self, b: TextBatch) -> XFMOutput:
        hidden_BLD = self.text(b.input_ids_BL, b.attention_mask_BL)
        return XFMOutput({"mlm": self.text_mlm_head(hidden_BLD, b.mlm_labels_BL)})

    def _image_step(self, b: ImageBatch, return_intermediates: bool) -> XFMOutput:
        if self.config.objectives.mim_target == "none":
            return XFMOutput({})
        with torch.no_grad():  # the target only: the unmasked output, detached
            target_BND = self.vision(b.pixel_values_BCHW)
        pred_BND = self.vision(b.pixel_values_BCHW, b.mim_mask_BP)
        return self._add_mim(XFMOutput({}), pred_BND, target_BND, b.mim_mask_BP, return_intermediates)

    @staticmethod
    def _add_mim(out: XFMOutput, pred_BND: torch.Tensor, target_BND: torch.Tensor, mim_mask_BP: torch.Tensor,
                 return_intermediates: bool) -> XFMOutput:
        target_BND = target_BND.detach()
        out.losses["mim"] = mim_loss(pred_BND, target_BND, mim_mask_BP)
        if return_intermediates:
            out.intermediates["mim_target"] = target_BND
        return out

    def _pair_step(self, b: PairBatch, return_intermediates: bool) -> XFMOutput:
        # With the detach, each encoder block runs at most once with grad per micro-batch (without
        # it the text blocks run twice): see single_pass_blocks, which the engine's whole-block
        # gathers rely on (they reduce a block's gradients at its backward).
        detach = self.config.objectives.detach_text_for_fusion
        image_BND, pred_BND = self._unmasked_and_masked_images(b)
        text_BLD = self.text(b.caption_ids_BL, b.caption_mask_BL)
        image_feat_BE, text_feat_BE, temp = self.itc(image_BND[:, 0], text_BLD[:, 0])
        losses = {"itc": contrastive_loss(image_feat_BE, text_feat_BE, temp, data_parallel_group())}
        # Detach point 2 (IMLM): the masked caption's encoding feeds only the detached IMLM input, so
        # with the detach it runs without grad (no activations kept, no checkpointing); same values.
        with torch.no_grad() if detach else contextlib.nullcontext():
            masked_text_BLD = self.text(b.imlm_input_ids_BL, b.caption_mask_BL)
        fusion_text_BLD = text_BLD.detach() if detach else text_BLD  # detach point 1 (ITM)
        itm_logits, fused_BLD = self._fuse_itm_and_imlm(image_BND, fusion_text_BLD, masked_text_BLD,
                                                       b.caption_mask_BL, image_feat_BE, text_feat_BE, temp,
                                                       b.sample_keys)
        B = text_BLD.shape[0]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(itm_logits.device)
        losses["itm"] = F.cross_entropy(itm_logits.float(), labels)
        losses["imlm"] = self.fusion_mlm_head(fused_BLD, b.imlm_labels_BL)
        out = XFMOutput(losses)
        if return_intermediates:
            out.intermediates.update(image_tokens=image_BND, text_hidden=text_BLD)
        if pred_BND is None:
            return out
        return self._add_mim(out, pred_BND, image_BND, b.mim_mask_BP, return_intermediates)

    def _unmasked_and_masked_images(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unmasked images' tokens (ITC, ITM, IMLM, and the MIM target) and, with MIM, the masked
        images' (the MIM prediction), in one vision pass of 2B rows: both train, so one pass of twice
        the rows does the work of two with half the kernel launches and ZeRO-3 gathers. An all-False
        mask row leaves its image unchanged (the mask token is mixed in with weight 0)."""
        if self.config.objectives.mim_target == "none":
            return self.vision(b.pixel_values_BCHW), None
        pixels_2B = torch.cat([b.pixel_values_BCHW, b.pixel_values_BCHW])
        mask_2B = torch.cat([torch.zeros_like(b.mim_mask_BP), b.mim_mask_BP])
        return self.vision(pixels_2B, mask_2B).chunk(2)

    def _fuse_itm_and_imlm(self, image_BND, text_BLD, masked_text_BLD, mask_BL, image_feat_BE, text_feat_BE,
                           temp, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """One fusion pass of 4B rows: for ITM the positives, each text with a hard-negative image,
        each image with a hard-negative text (3B rows, the ITM head's logits on their [CLS]); for
        IMLM the masked captions with their images (B rows, returned whole for the MLM head).
        All 4B rows attend to the micro-batch's B images, so the fusion projects each image's keys
        and values once (B rows, not 4B) and indexes them per row: same values, a third of the
        fusion's FLOPs saved at ``base``."""
        neg_image, neg_text = sample_hard_negatives(image_feat_BE, text_feat_BE, temp, keys,
                                                    self.config.objectives.itm_negative_group)
        text_4B = torch.cat([text_BLD, text_BLD, text_BLD[neg_text], masked_text_BLD])
        mask_4B = torch.cat([mask_BL, mask_BL, mask_BL[neg_text], mask_BL])
        B = text_BLD.shape[0]
        own = torch.arange(B, device=neg_image.device)
        image_index_4B = torch.cat([own, neg_image, own, own])
        fused_4BLD = self.fusion(text_4B, mask_4B, image_BND, image_index_4B)
        return self.itm_head(fused_4BLD[:3 * B, 0]), fused_4BLD[3 * B:]
