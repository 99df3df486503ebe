"""Export a training checkpoint (any DP x TP) as merged weights for downstream users.

``OUT/xfm/``            model.safetensors + config.json: the whole model, loadable by xfm_scale at
                        any TP size (run config ``model.init_from: OUT/xfm``).
``OUT/text_encoder/``   a transformers RoBERTa/BERT directory (config.json, model.safetensors,
                        tokenizer files) for ``AutoModel.from_pretrained``.
``OUT/vision_encoder/`` a timm BEiT-v2 checkpoint: model.safetensors + config.json (architecture and
                        model_args) for ``timm.create_model(arch, pretrained=True,
                        pretrained_cfg_overlay=dict(file=...), **model_args)`` or
                        ``timm.create_model("local-dir:OUT/vision_encoder")``.

One pass over the parameters: each is merged (DP slices, then TP shards) once and written to every
file that takes it, so memory stays near one merged tensor plus the memory-mapped partitions.
Vocabulary rows past the tokenizer's vocabulary (padding for TP) are dropped everywhere.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from xfm_scale import formats
from xfm_scale.config import XFMConfig
from xfm_scale.engine_state import VOCAB_PARAMETERS
from xfm_scale.safetensors_stream import StreamingSafetensorsWriter
from xfm_scale.zero_checkpoint import ZeroCheckpoint, resolve_checkpoint

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
XFM_FORMAT = "xfm_scale-weights-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class _Target:
    """One output file: which parameters it takes and how their names/tensors convert."""
    folder: Path
    convert: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]
    writer: StreamingSafetensorsWriter | None = None


def _trim_vocab(cfg: XFMConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:cfg.text.vocab_size] if VOCAB_PARAMETERS.search(name) else tensor


def _targets(cfg: XFMConfig, out: Path) -> dict[str, _Target]:
    def whole(name, tensor):
        yield name, _trim_vocab(cfg, name, tensor)

    def text(name, tensor):
        if name.startswith("text."):
            yield from formats.text_to_hf(name[len("text."):], tensor, cfg.text.vocab_size)

    def vision(name, tensor):
        if name.startswith("vision."):
            yield from formats.vision_to_timm(name[len("vision."):], tensor)

    return {"xfm": _Target(out / "xfm", whole), "text_encoder": _Target(out / "text_encoder", text),
            "vision_encoder": _Target(out / "vision_encoder", vision)}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tag: str | None = None, dtype: str = "fp32",
                      tokenizer_dir: str | Path | None = None, progress: bool = True) -> dict[str, Path]:
    """Write OUT/xfm, OUT/text_encoder and OUT/vision_encoder; returns their folders."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    folder = resolve_checkpoint(checkpoint, tag)
    ck = ZeroCheckpoint(folder)
    cfg = XFMConfig.from_dict(ck.meta["model_config"])
    tokenizer_dir = tokenizer_dir or ck.meta["run_config"]["data"]["tokenizer_dir"]
    if not Path(tokenizer_dir).is_dir():  # checked before minutes of streaming, not after
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist; pass --tokenizer with the "
                                "tokenizer the run trained with")
    out = Path(out)
    targets = _targets(cfg, out)
    metadata = {"format": "pt", "source": str(folder), "step": str(ck.step)}
    try:
        for target in targets.values():
            target.folder.mkdir(parents=True, exist_ok=True)
            plan = [(n, tuple(t.shape), torch_dtype) for name in ck.param_names
                    for n, t in target.convert(name, torch.empty(ck.full_shape(name), device="meta"))]
            target.writer = StreamingSafetensorsWriter(target.folder / WEIGHTS, plan, metadata)
        for name in tqdm(ck.param_names, desc="export", disable=not progress, unit="tensor"):
            full = ck.full(name).to(torch_dtype)
            for target in targets.values():
                for converted, tensor in target.convert(name, full):
                    target.writer.write(converted, tensor)
            del full
        for target in targets.values():
            target.writer.close()
    except BaseException:
        for target in targets.values():
            if target.writer is not None:
                target.writer.abort()
        raise
    _write_configs(cfg, ck, targets, dtype, tokenizer_dir)
    log.info("exported %s (step %d, TP %d x DP %d) to %s", folder, ck.step, ck.tp, ck.dp, out)
    return {key: target.folder for key, target in targets.items()}


def _write_configs(cfg: XFMConfig, ck: ZeroCheckpoint, targets: dict[str, _Target], dtype: str,
                   tokenizer_dir: str | Path) -> None:
    from transformers import AutoTokenizer

    xfm_meta = {"format": XFM_FORMAT, "dtype": dtype, "step": ck.step, "source": str(ck.folder),
                "saved_layout": {"tensor_parallel_size": ck.tp, "data_parallel_size": ck.dp},
                "model_config": cfg.to_dict()}
    (targets["xfm"].folder / "config.json").write_text(json.dumps(xfm_meta, indent=2))
    hf_config = formats.text_config_to_hf(cfg.text)
    hf_config.dtype = "float32" if dtype == "fp32" else "bfloat16"
    hf_config.save_pretrained(targets["text_encoder"].folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(targets["text_encoder"].folder)
    (targets["vision_encoder"].folder / "config.json").write_text(
        json.dumps(formats.vision_timm_config(cfg.vision), indent=2))
