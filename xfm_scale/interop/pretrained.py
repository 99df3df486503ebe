"""Weights a run starts from: an exported xfm folder, a transformers BERT/RoBERTa folder, a timm
BEiT-v2 checkpoint. Each reader returns the encoder config the weights imply and a
:data:`xfm_scale.model.tp_layout.Source` of full tensors, which the trainer writes into its
TP-sharded, ZeRO-3-partitioned model (:func:`xfm_scale.engine.full_state.load_full_state`) at any layout.
Files are read as safetensors, or with ``weights_only=True`` (no unpickling of code).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from xfm_scale.interop import formats
from xfm_scale.config import XFM_WEIGHTS, ConfigError, TextEncoderConfig, VisionEncoderConfig, XFMConfig
from xfm_scale.model.tp_layout import Source

log = logging.getLogger(__name__)


def read_xfm_folder(folder: str | Path) -> tuple[XFMConfig, Source]:
    """An ``OUT/xfm`` folder written by tools/export_weights.py or tools/import_weights.py."""
    from safetensors import safe_open

    cfg = XFMConfig.from_xfm_folder(folder)
    handle = safe_open(str(Path(folder) / XFM_WEIGHTS), framework="pt")
    names = set(handle.keys())

    def source(name: str, key: str):
        return handle.get_tensor(name).float() if key == "fp32" and name in names else None

    source.names = sorted(names)  # which parameters these weights give (the rest start newly initialised)
    return cfg, source


class _Prefixed:
    """A Source over an in-memory state dict whose names get ``prefix`` (text. / vision. / none)."""

    def __init__(self, prefix: str, state: dict[str, torch.Tensor]):
        self.full = {prefix + k: v for k, v in state.items()}
        self.names = list(self.full)

    def __call__(self, name: str, key: str):
        return self.full[name].float() if key == "fp32" and name in self.full else None


def read_hf_text(folder: str | Path) -> tuple[TextEncoderConfig, Source]:
    """A transformers BERT or RoBERTa folder (``save_pretrained``/hub layout); its config decides
    layers, width, heads and vocabulary. Gives the language encoder and, when the folder has one
    (roberta-base does: ``lm_head.*``), its MLM head as ``text_mlm_head``; no pooler. Refuses a
    folder whose files lack an encoder weight or hold one of another shape than its config says
    (transformers would initialise it randomly and carry on)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a transformers model folder (no config.json); pass a folder "
                          "written by save_pretrained, e.g. a downloaded roberta-base")
    cfg = formats.text_config_from_hf(AutoConfig.from_pretrained(folder))
    state, has_head = _load_hf_masked_lm(folder, cfg)
    # vocab padding rows are added at load
    tensors = {f"text.{k}": v for k, v in formats.text_from_hf(state, cfg).items()}
    if has_head:
        tensors.update({formats.TEXT_HEAD_PREFIX + k: v for k, v in formats.text_head_from_hf(state, cfg).items()})
    else:
        log.warning("%s has no MLM head (lm_head / cls.predictions); text_mlm_head starts newly initialised", folder)
    return cfg, _Prefixed("", tensors)


def _load_hf_masked_lm(folder: Path, cfg: TextEncoderConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """The folder's weights, loaded by transformers into its ...ForMaskedLM (a bare encoder's save
    loads too): (state dict, whether the files hold the MLM head). Mismatched shapes are reported
    by transformers as a list (ignore_mismatched_sizes) so that all of them can be named here."""
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)
    head = set(formats.text_head_hf_names(cfg.flavour))
    # not ours to read: the pooler (no X-FM head uses it), the decoder (tied to the word embeddings)
    ignored = re.compile(r"(^|\.)pooler\.|^(lm_head|cls\.predictions)\.decoder\.")
    missing = sorted(k for k in info["missing_keys"] if not ignored.search(k))
    has_head = not head <= set(missing)  # a bare encoder: the whole head is missing, and is not read
    missing = [k for k in missing if has_head or k not in head]
    problems = []
    if missing:
        problems.append(f"missing from its weight files: {_listed(missing)}")
    if info["mismatched_keys"]:
        shapes = [f"{name} {tuple(file)} (config: {tuple(want)})"
                  for name, file, want in sorted(info["mismatched_keys"])]
        problems.append(f"of another shape than config.json implies: {_listed(shapes)}")
    if info.get("error_msgs"):
        problems.append("; ".join(info["error_msgs"]))
    if problems:
        raise ConfigError(f"{folder}: weights {'; weights '.join(problems)}. Its config.json must describe the "
                          "model its weight files hold (layers, sizes, vocabulary); pass a complete "
                          "save_pretrained folder")
    return model.state_dict(), has_head


def _listed(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_timm_vision(path: str | Path, architecture: str = formats.TIMM_ARCHITECTURE) -> tuple[VisionEncoderConfig, Source]:
    """A timm BEiT-v2 checkpoint: a folder with config.json + model.safetensors (timm's hub layout,
    as the exporter writes) or a weights file of ``architecture`` at its default sizes. timm itself
    loads it (its BEiT checkpoint filter included, strictly: every weight present, every shape
    right); the sizes are read off the built model."""
    import timm

    path = Path(path)
    try:
        if path.is_dir():
            model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
        elif path.is_file():
            model = timm.create_model(architecture, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay=dict(file=str(path)))
        else:
            raise ConfigError(f"vision weights {path} do not exist; pass a timm BEiT-v2 folder or weights file")
    except RuntimeError as err:  # torch's strict load_state_dict: missing/unexpected keys, size mismatches
        what = "its config.json's model" if path.is_dir() else f"timm's {architecture}"
        raise ConfigError(f"{path} does not hold the weights of {what}: {_first_lines(err)}. For a weights "
                          "file, give the architecture it was saved from (--vision-arch, e.g. "
                          "beitv2_large_patch16_224), or pass a folder with config.json") from err
    cfg = formats.vision_config_from_timm_model(model)
    return cfg, _Prefixed("vision.", formats.vision_from_timm(model.state_dict(), mask_token=None))


def _first_lines(err: Exception, lines: int = 4) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:lines]) + (" ..." if len(text) > lines else "")


def fit_fusion_to_text(cfg: XFMConfig) -> None:
    """The fusion encoder continues the text stream: give it the imported text encoder's width,
    heads and MLP width (X-FM's fusion layers are shaped like its language layers)."""
    for attr in ("hidden_size", "num_heads", "ffn_hidden_size"):
        setattr(cfg.fusion, attr, getattr(cfg.text, attr))


def combine(*sources: Source) -> Source:
    """The first source that has a tensor gives it."""
    def source(name: str, key: str):
        for s in sources:
            tensor = s(name, key)
            if tensor is not None:
                return tensor
        return None
    source.names = sorted({name for s in sources for name in getattr(s, "names", ())})
    return source


def write_xfm_folder(out: str | Path, cfg: XFMConfig, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """OUT/xfm as the exporter writes it (config.json + model.safetensors), from in-memory tensors."""
    from safetensors.torch import save_file

    from xfm_scale.interop.export import XFM_FORMAT

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / XFM_WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"format": XFM_FORMAT, **meta, "model_config": cfg.to_dict()}, indent=2))
    return out


def import_encoders(out: str | Path, *, preset: str, text: str | Path | None = None,
                    vision: str | Path | None = None, vision_architecture: str = formats.TIMM_ARCHITECTURE) -> Path:
    """An xfm weights folder holding the language encoder from a transformers BERT/RoBERTa folder
    and/or the vision encoder from a timm BEiT-v2 checkpoint; the rest of the config (fusion
    encoder, heads, objectives) comes from ``preset`` and is initialised fresh when a run starts
    from it (``model.init_from``)."""
    if text is None and vision is None:
        raise ConfigError("nothing to import: give --text and/or --vision")
    cfg = XFMConfig.from_preset(preset)
    tensors: dict[str, torch.Tensor] = {}
    if text is not None:
        cfg.text, source = read_hf_text(text)
        fit_fusion_to_text(cfg)
        tensors.update(_materialise(source, ("text.", formats.TEXT_HEAD_PREFIX)))
    if vision is not None:
        drop_path = cfg.vision.drop_path_rate
        cfg.vision, source = read_timm_vision(vision, vision_architecture)
        cfg.vision.drop_path_rate = drop_path
        tensors.update(_materialise(source, "vision."))
    cfg.validate()
    return write_xfm_folder(out, cfg, tensors, {"imported_from": {"text": str(text) if text else None,
                                                                 "vision": str(vision) if vision else None}})


def _materialise(source: Source, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: tensor for name in source.names if name.startswith(prefix)
            for tensor in [source(name, "fp32")] if tensor is not None}
