"""Export a training checkpoint (any DP x TP) as merged weights for downstream users.

``OUT/xfm/``            model.safetensors + config.json: the whole model, loadable by xfm_scale at
                        any TP size (run config ``model.init_from: OUT/xfm``).
``OUT/text_encoder/``   a transformers RoBERTa/BERT directory (config.json, model.safetensors,
                        tokenizer files) in the hub's roberta-base layout: the encoder and the
                        trained MLM head, for ``AutoModel`` and ``AutoModelForMaskedLM``. The
                        tokenizer's model_max_length is at most the encoder's positions, so
                        ``tok(text, truncation=True)`` gives inputs the encoder takes.
``OUT/vision_encoder/`` a timm BEiT-v2 checkpoint: model.safetensors + config.json (architecture,
                        model_args, and pretrained_cfg: the training preprocessing) for
                        ``timm.create_model("local-dir:OUT/vision_encoder", pretrained=True)`` or
                        ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(
                        file=..., **pretrained_cfg), **model_args)``.

One pass over the parameters: each is merged (DP slices, then TP shards) once and written to every
file that takes it, so memory stays near one merged tensor plus the memory-mapped partitions.
Vocabulary rows past the tokenizer's vocabulary (padding for TP) are dropped everywhere.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from xfm_scale.interop import formats
from xfm_scale.config import ConfigError, TextEncoderConfig, XFMConfig
from xfm_scale.model.tp_layout import VOCAB_PARAMETERS
from xfm_scale.durable import replace_durably
from xfm_scale.interop.safetensors_stream import StreamingSafetensorsWriter
from xfm_scale.checkpoint.reader import ZeroCheckpoint, resolve_checkpoint

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
XFM_FORMAT = "xfm_scale-weights-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STAGING = ".export-staging"
"""Where a folder's config and tokenizer files wait until the weights are complete."""


@dataclass
class _Target:
    """One output folder: which parameters its weights file takes and how their names/tensors
    convert, and how to write its other files (config.json, tokenizer) into a staging folder."""
    folder: Path
    convert: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]
    write_files: Callable[[Path], None]
    writer: StreamingSafetensorsWriter | None = None

    @property
    def staging(self) -> Path:
        return self.folder / STAGING


def _trim_vocab(cfg: XFMConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:cfg.text.vocab_size] if VOCAB_PARAMETERS.search(name) else tensor


def _targets(cfg: XFMConfig, ck: ZeroCheckpoint, out: Path, dtype: str,
             tokenizer_dir: str | Path) -> dict[str, _Target]:
    """The three folders, their configs built and the tokenizer loaded now, so that a config timm or
    transformers cannot represent, or a wrong tokenizer, fails before minutes of streaming."""
    def whole(name, tensor):
        yield name, _trim_vocab(cfg, name, tensor)

    def text(name, tensor):
        yield from formats.text_model_to_hf(name, tensor, cfg.text)

    def vision(name, tensor):
        if name.startswith("vision."):
            yield from formats.vision_to_timm(name[len("vision."):], tensor)

    xfm_meta = {"format": XFM_FORMAT, "dtype": dtype, "step": ck.step, "source": str(ck.folder),
                "saved_layout": {"tensor_parallel_size": ck.tp, "data_parallel_size": ck.dp},
                "model_config": cfg.to_dict()}
    hf_config = formats.text_config_to_hf(cfg.text)
    hf_config.dtype = "float32" if dtype == "fp32" else "bfloat16"
    tokenizer = _load_tokenizer(tokenizer_dir, cfg.text.vocab_size)
    timm_config = formats.vision_timm_config(cfg.vision)

    def text_files(folder: Path) -> None:
        hf_config.save_pretrained(folder)
        # the encoder's positions bound the tokens it takes: tok(text, truncation=True) must fit them
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_text_tokens(cfg.text))
        tokenizer.save_pretrained(folder)

    return {"xfm": _Target(out / "xfm", whole, _json_file(xfm_meta)),
            "text_encoder": _Target(out / "text_encoder", text, text_files),
            "vision_encoder": _Target(out / "vision_encoder", vision, _json_file(timm_config))}


def max_text_tokens(text: TextEncoderConfig) -> int:
    """The most tokens the exported text encoder takes: its position rows, less RoBERTa's offset
    (positions are counted from pad id + 1)."""
    offset = text.pad_token_id + 1 if text.flavour == "roberta" else 0
    return text.max_position_embeddings - offset


def _json_file(content: dict) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(content, indent=2))
    return write


def _load_tokenizer(tokenizer_dir: str | Path, vocab_size: int):
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist; pass --tokenizer with the "
                                "tokenizer the run trained with")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{tokenizer_dir} is not a tokenizer folder transformers can load ({err}); pass "
                          "--tokenizer with the tokenizer the run trained with") from err
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"{vocab_size}; pass --tokenizer with the tokenizer the run trained with")
    return tokenizer


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tag: str | None = None, dtype: str = "fp32",
                      tokenizer_dir: str | Path | None = None, progress: bool = True) -> dict[str, Path]:
    """Write OUT/xfm, OUT/text_encoder and OUT/vision_encoder; returns their folders.

    Every file is written under a temporary name first and renamed into place only when all of
    them are complete (configs and tokenizer before weights), so a failure leaves a previous
    export as it was, and new weights never sit beside a stale or missing config."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; one of {', '.join(DTYPES)}")
    folder = resolve_checkpoint(checkpoint, tag)
    ck = ZeroCheckpoint(folder)
    ck.require_tensors()
    cfg = XFMConfig.from_dict(ck.meta["model_config"])
    tokenizer_dir = tokenizer_dir or ck.meta.get("run_config", {}).get("data", {}).get("tokenizer_dir")
    if not tokenizer_dir:
        raise ConfigError(f"{folder} names no tokenizer (run config data.tokenizer_dir); pass --tokenizer with "
                          "the tokenizer the run trained with")
    targets = _targets(cfg, ck, Path(out), dtype, tokenizer_dir)
    try:
        _stage(targets, ck, DTYPES[dtype], progress)
    except BaseException:
        for target in targets.values():
            if target.writer is not None:
                target.writer.abort()
            shutil.rmtree(target.staging, ignore_errors=True)
        raise
    for target in targets.values():
        _publish(target)
    log.info("exported %s (step %d, TP %d x DP %d) to %s", folder, ck.step, ck.tp, ck.dp, out)
    return {key: target.folder for key, target in targets.items()}


def _stage(targets: dict[str, _Target], ck: ZeroCheckpoint, torch_dtype: torch.dtype, progress: bool) -> None:
    """Every file under a temporary name: configs and tokenizer in each folder's staging folder,
    then the weights, streamed (one merged tensor at a time) into each folder's .partial file."""
    from tqdm import tqdm

    metadata = {"format": "pt", "source": str(ck.folder), "step": str(ck.step)}
    for target in targets.values():
        target.folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target.staging, ignore_errors=True)  # left by an export that was killed
        target.staging.mkdir()
        target.write_files(target.staging)
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
        target.writer.finish()


def _publish(target: _Target) -> None:
    """Configs and tokenizer files first, then the weights: each an atomic, durable rename."""
    for staged in sorted(target.staging.iterdir()):
        replace_durably(staged, target.folder / staged.name)
    target.staging.rmdir()
    target.writer.publish()
