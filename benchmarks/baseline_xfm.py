"""X-FM built the way the reference code builds it: the comparison point of benchmarks/train_step.py.

The reference X-FM trains on one node: a transformers BERT/RoBERTa language encoder, a BEiT-v2 vision
encoder (timm-style code), a fusion encoder of BERT layers with cross-attention (its ``xbert``),
eager attention, torch autocast and data parallelism without sharding. This module builds the same
model from the libraries themselves:

* language encoder: ``transformers.RobertaModel`` (BertModel for the BERT flavour), eager attention;
* vision encoder: ``timm.models.beit.Beit`` with its fused attention switched off (eager), plus the
  MIM mask token the reference's BEiT adds;
* fusion encoder: a stack of ``transformers`` ``RobertaLayer``/``BertLayer`` with cross-attention
  (eager; keys/values read the image width, as the reference's ``encoder_width``);
* MLM heads as ``RobertaLMHead`` over every position (the reference's BertForMaskedLM), the fusion
  head decoding with the detached word embedding;
* ITC/ITM heads and the loss functions are xfm_scale's own (plain torch), so the comparison measures
  the encoders, attention, parameter handling and the parallel wrapper, not two loss codes.

It computes the same objectives on the same micro-batches as :class:`xfm_scale.model.xfm.XFM`;
:func:`load_xfm_state` copies a TP=1 XFM state dict into it, and tests/test_benchmarks.py asserts
that both then give the same losses. :class:`BaselineTrainer` is the reference's training step:
``DistributedDataParallel`` (unused parameters allowed: a text step leaves the vision encoder idle),
autocast, gradient accumulation with ``no_sync``, clipping, torch AdamW.
Legend: B batch, L tokens, N image tokens (1 + P), D width, C image width, V vocabulary.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xfm_scale.interop import formats
from xfm_scale.batch import Batch, ImageBatch, PairBatch, TextBatch
from xfm_scale.config import XFMConfig
from xfm_scale.model.heads import ContrastiveHead, itm_head
from xfm_scale.model.losses import contrastive_loss, mim_loss, sample_hard_negatives


def _hf_config(config: XFMConfig, fusion: bool):
    """The transformers config of the language encoder, or of the fusion stack (its own depth and
    widths, decoder mode so the layers get cross-attention; the masks passed are bidirectional)."""
    hf = formats.text_config_to_hf(config.text)
    hf._attn_implementation = "eager"
    if fusion:
        f = config.fusion
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads = f.num_layers, f.hidden_size, f.num_heads
        hf.intermediate_size, hf.layer_norm_eps = f.ffn_hidden_size, f.layer_norm_eps
        hf.hidden_dropout_prob, hf.attention_probs_dropout_prob = f.hidden_dropout, f.attention_dropout
        hf.is_decoder = hf.add_cross_attention = True
    return hf


class BaselineFusion(nn.Module):
    """transformers BERT layers with cross-attention to the (normalised) image tokens."""

    def __init__(self, config: XFMConfig):
        super().__init__()
        import transformers

        hf = _hf_config(config, fusion=True)
        layer_cls = (transformers.models.roberta.modeling_roberta.RobertaLayer if config.text.flavour == "roberta"
                     else transformers.models.bert.modeling_bert.BertLayer)
        self.image_norm = nn.LayerNorm(config.vision.hidden_size, eps=1e-6)
        self.layer = nn.ModuleList(layer_cls(hf, layer_idx=i) for i in range(hf.num_hidden_layers))
        if config.vision.hidden_size != hf.hidden_size:  # the reference's encoder_width
            for layer in self.layer:
                attn = layer.crossattention.self
                attn.key = nn.Linear(config.vision.hidden_size, hf.hidden_size)
                attn.value = nn.Linear(config.vision.hidden_size, hf.hidden_size)

    def forward(self, text_BLD: torch.Tensor, mask_BL: torch.Tensor, image_BNC: torch.Tensor) -> torch.Tensor:
        additive_B11L = (1.0 - mask_BL[:, None, None, :].to(text_BLD.dtype)) * torch.finfo(text_BLD.dtype).min
        image_BNC = self.image_norm(image_BNC)
        for layer in self.layer:
            text_BLD = layer(text_BLD, attention_mask=additive_B11L, encoder_hidden_states=image_BNC)
        return text_BLD


class BaselineVision(nn.Module):
    """timm's Beit with eager attention, and the mask token of the reference's MIM-capable BEiT.
    Output as xfm_scale's: [fc_norm(mean of patch tokens); patch tokens]."""

    def __init__(self, config: XFMConfig):
        super().__init__()
        from timm.models.beit import Beit

        v = config.vision
        self.beit = Beit(**formats.vision_model_args(v), drop_path_rate=v.drop_path_rate)
        for block in self.beit.blocks:
            block.attn.fused_attn = False
        self.mask_token = nn.Parameter(torch.zeros(1, 1, v.hidden_size))

    def forward(self, pixels_BCHW: torch.Tensor, mim_mask_BP: torch.Tensor | None = None) -> torch.Tensor:
        beit = self.beit
        x_BPC = beit.patch_embed(pixels_BCHW)
        if mim_mask_BP is not None:
            w_BP1 = mim_mask_BP.unsqueeze(-1).to(x_BPC.dtype)
            x_BPC = x_BPC * (1 - w_BP1) + self.mask_token * w_BP1
        x_BNC = beit.pos_drop(torch.cat([beit.cls_token.expand(x_BPC.shape[0], -1, -1), x_BPC], dim=1))
        for block in beit.blocks:
            x_BNC = block(x_BNC)
        x_BNC = beit.norm(x_BNC)
        return torch.cat([beit.fc_norm(x_BNC[:, 1:].mean(dim=1)).unsqueeze(1), x_BNC[:, 1:]], dim=1)


class BaselineXFM(nn.Module):
    """The reference-style X-FM: same objectives, shapes and parameter count as xfm_scale's XFM
    (less the vocabulary padding)."""

    def __init__(self, config: XFMConfig):
        super().__init__()
        import transformers

        self.config = config
        text_cls = transformers.RobertaModel if config.text.flavour == "roberta" else transformers.BertModel
        hf = _hf_config(config, fusion=False)
        lm_head_cls = transformers.models.roberta.modeling_roberta.RobertaLMHead
        self.text = text_cls(hf, add_pooling_layer=False)
        self.vision = BaselineVision(config)
        self.fusion = BaselineFusion(config)
        self.text_mlm_head = lm_head_cls(hf)
        self.text_mlm_head.decoder.weight = self.text.embeddings.word_embeddings.weight  # tied, as BertForMaskedLM
        self.text_mlm_head.decoder.bias = self.text_mlm_head.bias
        self.fusion_mlm_head = lm_head_cls(hf)
        del self.fusion_mlm_head.decoder  # decodes with the detached word embedding (see _fusion_mlm)
        o, std = config.objectives, config.init_std
        self.itc = ContrastiveHead(config.text.hidden_size, config.vision.hidden_size, o.itc_embed_dim,
                                   o.temperature_init, (o.temperature_min, o.temperature_max), std, torch.float32)
        self.itm_head = itm_head(config.fusion.hidden_size, std, torch.float32)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each objective's loss on this micro-batch, as XFM.forward's ``losses``."""
        if isinstance(batch, TextBatch):
            hidden = self.text(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).last_hidden_state
            return {"mlm": _mlm_loss(self.text_mlm_head(hidden), batch.mlm_labels_BL)}
        if isinstance(batch, ImageBatch):
            with torch.no_grad():
                target = self.vision(batch.pixel_values_BCHW)
            return {"mim": self._mim(batch, target)}
        if isinstance(batch, PairBatch):
            return self._pair(batch)
        raise TypeError(f"unknown micro-batch type {type(batch).__name__}")

    def _mim(self, b: ImageBatch | PairBatch, target_BND: torch.Tensor) -> torch.Tensor:
        return mim_loss(self.vision(b.pixel_values_BCHW, b.mim_mask_BP), target_BND.detach(), b.mim_mask_BP)

    def _pair(self, b: PairBatch) -> dict[str, torch.Tensor]:
        detach = self.config.objectives.detach_text_for_fusion
        group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        image_BND = self.vision(b.pixel_values_BCHW)
        text_BLD = self.text(input_ids=b.caption_ids_BL, attention_mask=b.caption_mask_BL).last_hidden_state
        image_feat, text_feat, temp = self.itc(image_BND[:, 0], text_BLD[:, 0])
        losses = {"itc": contrastive_loss(image_feat, text_feat, temp, group)}
        fusion_text = text_BLD.detach() if detach else text_BLD
        neg_image, neg_text = sample_hard_negatives(image_feat, text_feat, temp, b.sample_keys,
                                                    self.config.objectives.itm_negative_group)
        B = text_BLD.shape[0]
        fused = self.fusion(torch.cat([fusion_text, fusion_text, fusion_text[neg_text]]),
                            torch.cat([b.caption_mask_BL, b.caption_mask_BL, b.caption_mask_BL[neg_text]]),
                            torch.cat([image_BND, image_BND[neg_image], image_BND]))
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(fused.device)
        losses["itm"] = F.cross_entropy(self.itm_head(fused[:, 0]).float(), labels)
        masked = self.text(input_ids=b.imlm_input_ids_BL, attention_mask=b.caption_mask_BL).last_hidden_state
        if detach:
            masked = masked.detach()
        fused = self.fusion(masked, b.caption_mask_BL, image_BND)
        losses["imlm"] = _mlm_loss(self._fusion_mlm(fused, detach), b.imlm_labels_BL)
        losses["mim"] = self._mim(b, image_BND)
        return losses

    def _fusion_mlm(self, hidden_BLD: torch.Tensor, detach: bool) -> torch.Tensor:
        head, weight = self.fusion_mlm_head, self.text.embeddings.word_embeddings.weight
        h = head.layer_norm(F.gelu(head.dense(hidden_BLD)))
        return F.linear(h, weight.detach() if detach else weight) + head.bias


def _mlm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BLV.flatten(0, 1).float(), labels_BL.flatten())


# ---- weights from xfm_scale ------------------------------------------------------------------------
_FUSION_BLOCK = {  # ours (fusion.blocks.N.) -> transformers layer (fusion.layer.N.)
    "self_attn.proj": "attention.output.dense", "self_norm": "attention.output.LayerNorm",
    "cross_attn.q": "crossattention.self.query", "cross_attn.proj": "crossattention.output.dense",
    "cross_norm": "crossattention.output.LayerNorm", "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense", "mlp_norm": "output.LayerNorm",
}
_SPLIT = {"self_attn.qkv": ("attention.self.", ("query", "key", "value")),
          "cross_attn.kv": ("crossattention.self.", ("key", "value"))}


def _fusion_names(name: str, tensor: torch.Tensor):
    """(baseline name, tensor) pairs for one of our fusion-encoder tensors (name without ``fusion.``)."""
    if name.startswith("image_norm."):
        yield name, tensor
        return
    _, layer, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    prefix = f"layer.{layer}."
    if module in _SPLIT:
        where, parts = _SPLIT[module]
        for part, piece in zip(parts, tensor.chunk(len(parts), dim=0)):
            yield f"{prefix}{where}{part}.{kind}", piece
        return
    yield f"{prefix}{_FUSION_BLOCK[module]}.{kind}", tensor


def baseline_state_from_xfm(xfm_state: dict[str, torch.Tensor], config: XFMConfig) -> dict[str, torch.Tensor]:
    """The baseline's state dict from a TP=1 XFM state dict (the vocabulary padding dropped)."""
    vocab = config.text.vocab_size
    out = {}
    for name, tensor in xfm_state.items():
        if name.endswith("._extra_state"):  # megatron's per-layer metadata (no weights)
            continue
        top, rest = name.split(".", 1)
        if top == "text":
            out.update({f"text.{k}": v for k, v in formats.text_to_hf(rest, tensor, vocab)})
        elif top == "vision":
            if rest == "mask_token":
                out["vision.mask_token"] = tensor
            out.update({f"vision.beit.{k}": v for k, v in formats.vision_to_timm(rest, tensor)})
        elif top == "fusion":
            out.update({f"fusion.{k}": v for k, v in _fusion_names(rest, tensor)})
        elif top in ("text_mlm_head", "fusion_mlm_head"):
            out[name] = tensor[:vocab] if rest == "bias" else tensor
        else:  # itc, itm_head: the same modules
            out[name] = tensor
    return out


def load_xfm_state(model: BaselineXFM, xfm_state: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1 XFM state dict into the baseline; every baseline tensor must be given."""
    state = baseline_state_from_xfm(xfm_state, model.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("relative_position_index", "k_bias"))
               and k != "text_mlm_head.decoder.weight" and k != "text_mlm_head.decoder.bias"]
    if missing or unexpected:
        raise KeyError(f"baseline weights: missing {missing}, unexpected {unexpected}")


# ---- the reference's training step -----------------------------------------------------------------
class BaselineTrainer:
    """One optimizer step over a list of micro-batches, as the reference trains: DDP, autocast,
    accumulation with ``no_sync``, global-norm clipping, torch AdamW (xfm_scale's parameter groups:
    same learning rates and decay)."""

    def __init__(self, config: XFMConfig, optim_cfg, device: torch.device, bf16: bool, seed: int = 0):
        from xfm_scale.engine import optim

        torch.manual_seed(seed)
        self.model = BaselineXFM(config).to(device)
        self.device, self.bf16, self.grad_clip = device, bf16, optim_cfg.grad_clip
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        groups = [{k: v for k, v in g.items() if k not in ("name", "lr_scale")}
                  for g in optim.param_groups(self.model, optim_cfg)]
        self.optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)

    def train_step(self, batches: list) -> dict[str, float]:
        """One step; returns each loss's mean over the micro-batches (read with ``.item()`` as the
        reference's metric logger does every iteration)."""
        self.ddp.train()
        logged: dict[str, list[float]] = {}
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with (contextlib.nullcontext() if last else self.ddp.no_sync()), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                losses = self.ddp(batch.to(self.device, non_blocking=True))
                total = torch.stack(list(losses.values())).sum() / len(batches)
            total.backward()
            for name, value in losses.items():
                logged.setdefault(name, []).append(value.item())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {name: sum(values) / len(values) for name, values in logged.items()}
