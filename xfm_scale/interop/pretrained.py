"""Weights a run starts from: an exported xfm folder, a transformers BERT/RoBERTa folder or hub id,
a BEiT-v2 checkpoint in timm's layout or in Microsoft unilm's (the pre-training release
``beitv2_base_patch16_224_pt1k.pth`` that X-FM starts from). Each reader returns the encoder config
the weights imply and a :data:`xfm_scale.model.tp_layout.Source` of full tensors, which the trainer
writes into its TP-sharded, ZeRO-3-partitioned model (:func:`xfm_scale.engine.full_state.load_full_state`)
at any layout. Files are read as safetensors, or with ``weights_only=True`` (no unpickling of code).

Vision sources are checked strictly, key by key, before anything is read: a missing or
unexpected encoder weight, or one of another shape, is refused (:class:`ConfigError`, naming the
keys); only the keys of :data:`formats.VISION_UNUSED_KEYS` / :data:`formats.UNILM_UNUSED_KEYS` may be
left unused, and only the parameters of :data:`formats.VISION_NOT_IN_SOURCE` may be absent.

:func:`check_init_sources` (the launcher's ``--check``) and :func:`describe_starting_points` (the
run's first log lines) say what each encoder starts from without reading the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from xfm_scale.interop import formats
from xfm_scale.config.paths import is_hub_id
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
    """A transformers BERT or RoBERTa folder (``save_pretrained``/hub layout), or a hub id such as
    ``roberta-base`` (transformers fetches it, or reads it from its cache); its config decides
    layers, width, heads and vocabulary. Gives the language encoder and, when the folder has one
    (roberta-base does: ``lm_head.*``), its MLM head as ``text_mlm_head``; no pooler. Refuses a
    folder whose files lack an encoder weight or hold one of another shape than its config says
    (transformers would initialise it randomly and carry on)."""
    from transformers import AutoConfig

    if text_source_kind(str(folder)) == "hub":
        try:
            hf_config = AutoConfig.from_pretrained(str(folder))
        except OSError as err:  # not on the hub, no network, not in the cache
            raise ConfigError(f"{folder}: transformers could not load this hub id ({_first_lines(err, 2)}); "
                              f"download it where every rank can read it ({_DOWNLOAD_TEXT.format(id=folder)}) "
                              "and name that folder") from err
    else:
        folder = Path(folder)
        hf_config = AutoConfig.from_pretrained(folder)
    cfg = formats.text_config_from_hf(hf_config)
    state, has_head = _load_hf_masked_lm(folder, cfg)
    # vocab padding rows are added at load
    tensors = {f"text.{k}": v for k, v in formats.text_from_hf(state, cfg).items()}
    if has_head:
        tensors.update({formats.TEXT_HEAD_PREFIX + k: v for k, v in formats.text_head_from_hf(state, cfg).items()})
    else:
        log.warning("%s has no MLM head (lm_head / cls.predictions); text_mlm_head starts newly initialised", folder)
    return cfg, _Prefixed("", tensors)


def _load_hf_masked_lm(folder: Path | str, cfg: TextEncoderConfig) -> tuple[dict[str, torch.Tensor], bool]:
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


def _first_lines(err: Exception, lines: int = 4) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:lines]) + (" ..." if len(text) > lines else "")


# ---- what a source is (no weights read) --------------------------------------------------------------
UNILM_PT1K = "beitv2_base_patch16_224_pt1k.pth"
UNILM_PT1K_URL = "https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth"
"""Where Microsoft unilm's BEiT-v2 README (beit2/PRETRAINING.md, model zoo) publishes the 1600-epoch
ImageNet-1k pre-training checkpoint of BEiT-v2-B/16 that X-FM starts its vision encoder from."""
_DOWNLOAD_TEXT = "huggingface-cli download {id} --local-dir DIR, or save_pretrained"


def text_source_kind(value: str) -> str:
    """``"folder"`` (a local transformers folder, which must hold config.json) or ``"hub"`` (a hub
    id); anything else is refused, naming the fix. Reads nothing but the folder's listing."""
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{value} is not a transformers model folder (no config.json); pass a folder "
                              "written by save_pretrained, e.g. a downloaded roberta-base, or a hub id")
        return "folder"
    if path.exists():
        raise ConfigError(f"{value} is a file; the language encoder imports a transformers folder "
                          "(save_pretrained: config.json and weights) or a hub id such as roberta-base")
    if is_hub_id(value):
        return "hub"
    raise ConfigError(f"{value} does not exist; give a transformers BERT/RoBERTa folder, a hub id such as "
                      "roberta-base, or null to train the language encoder from scratch")


# ---- vision sources: timm BEiT-v2 (folder or file), unilm BEiT-v2 pre-training checkpoint ------------
class _Weights:
    """The tensors of one weights file, opened lazily: names and shapes without reading the data
    (safetensors, or torch.load memory-mapped with ``weights_only=True``)."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise ConfigError(f"{path} cannot be read as safetensors: {_first_lines(err, 2)}") from err
            self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            self._tensors = None
        else:
            self._tensors = _torch_state_dict(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name] if self._tensors is not None else self._handle.get_tensor(name)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.bin state dict, unwrapped from ``{"model": ...}`` / ``{"module": ...}`` as unilm
    saves it and as timm's filter unwraps it. Only tensors and containers are unpickled, plus
    ``argparse.Namespace`` (unilm's training scripts save their ``args`` beside the model)."""
    def load(mmap: bool):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as err:  # a legacy (pre-zip) file cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = load(mmap=False)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, a truncated zip, ...
        raise ConfigError(f"{path} cannot be read as a PyTorch weights file with weights_only=True: "
                          f"{_first_lines(err, 2)}") from err
    for key in ("model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{path} holds no state dict of tensors (nor one under 'model' or 'module'): found {what}")
    return obj


def _weights_of(path: Path) -> _Weights:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _Weights(path / name)
        raise ConfigError(f"{path} holds no model.safetensors or pytorch_model.bin; pass a timm BEiT-v2 folder "
                          "(config.json + weights) or a weights file")
    if path.is_file():
        return _Weights(path)
    raise ConfigError(missing_vision_source(str(path)))


def missing_vision_source(path: str) -> str:
    """What to do when the vision source ``path`` does not exist (the reference's file: where to get it)."""
    return (f"vision weights {path} do not exist. The reference starts the vision encoder from BEiT-v2's "
            f"self-supervised checkpoint {UNILM_PT1K} (Microsoft unilm's release): download {UNILM_PT1K_URL} "
            f"to {path}, or give a timm BEiT-v2 folder or weights file, or set model.init_vision_from: null "
            "to train the vision encoder from scratch")


@dataclasses.dataclass
class VisionSource:
    """A vision checkpoint, checked key by key, whose tensors are not read yet."""
    path: Path
    layout: str
    """``unilm`` (a shared relative-position table: unilm's pre-training checkpoint) or ``timm``."""
    cfg: VisionEncoderConfig
    weights: _Weights
    architecture: str | None
    """The timm architecture a weights file was read as (None: a folder, or the unilm layout)."""

    @property
    def has_mask_token(self) -> bool:
        return "mask_token" in self.weights.shapes

    def description(self) -> str:
        c = self.cfg
        sizes = f"{c.num_layers} layers x {c.hidden_size}, patch {c.patch_size}, image {c.image_size}"
        if self.layout == "unilm":
            return (f"unilm BEiT-v2 pre-training checkpoint, {sizes}: its shared relative-position table copied "
                    "into every block, mask token included; its final norm, lm_head and cls_pt_layers dropped, "
                    "fc_norm new")
        what = "timm BEiT-v2 folder" if self.architecture is None else f"timm {self.architecture} weights file"
        return f"{what}, {sizes}: mask token {'included' if self.has_mask_token else 'new (timm has none)'}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Our vision-encoder state (names without ``vision.``), every name checked against ours."""
        state = {name: self.weights.get(name) for name in sorted(self.weights.names())}
        if self.layout == "unilm":
            ours = formats.vision_from_unilm(state, self.cfg)
        else:
            kept = {k: v for k, v in state.items() if not formats.unused_vision_key(k, "timm")}
            ours = formats.vision_from_timm(kept, mask_token=None)
        expected = formats.vision_shapes(self.cfg)
        may_lack = {"unilm": {"fc_norm.weight", "fc_norm.bias"}, "timm": {"mask_token"}}[self.layout]
        problems = _key_problems(expected, {k: tuple(v.shape) for k, v in ours.items()}, may_lack=may_lack)
        if problems:  # the conversion must give exactly our parameters
            raise ConfigError(f"{self.path}: its {self.layout}-layout weights do not convert to the vision encoder's "
                              f"parameters: {problems}")
        return ours


def _key_problems(expected: dict[str, tuple], found: dict[str, tuple], *, may_lack=frozenset(),
                  unused=lambda name: False, limit: int = 40) -> str:
    """'' when ``found`` (name -> shape) has every ``expected`` name at its shape and nothing else
    (but names ``unused`` accepts); else which names are missing, unexpected or of another shape."""
    missing = sorted(set(expected) - set(found) - set(may_lack))
    unexpected = sorted(n for n in set(found) - set(expected) if not unused(n))
    shapes = [f"{n} {found[n]} (expected {expected[n]})" for n in sorted(set(expected) & set(found))
              if tuple(found[n]) != tuple(expected[n])]
    parts = [f"{what} {_listed(names, limit)}" for what, names in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if names]
    return "; ".join(parts)


def _allowed_text(layout: str) -> str:
    allowed = formats.UNILM_UNUSED_KEYS if layout == "unilm" else formats.VISION_UNUSED_KEYS
    absent = formats.VISION_NOT_IN_SOURCE[layout]
    return (f"Only these may be left unused: {'; '.join(names for names, _, _ in allowed)}. Only these may be "
            f"absent: {'; '.join(names for names, _ in absent)} (docs/checkpoints.md, Import)")


_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


def _unilm_config(path: Path, shapes: dict[str, tuple]) -> tuple[VisionEncoderConfig, bool]:
    """Sizes of a unilm BEiT-v2 checkpoint read off its tensors (it carries no config): width from
    the cls token, patch and channels from the patch embedding, heads and grid from the shared
    table, MLP width from the first block that has one, depth from the highest block index (a
    missing last block cannot be told from a shallower model; any other missing block is named);
    LayerNorm eps 1e-6 as every unilm BEiT-v2 model is built. Returns (config, whether it has
    layer scale)."""
    fc1 = sorted((int(m.group(1)), k) for k in shapes for m in [re.fullmatch(r"blocks\.(\d+)\.mlp\.fc1\.weight", k)] if m)
    needed = ("cls_token", "patch_embed.proj.weight", formats.UNILM_SHARED_TABLE)
    lacking = [k for k in needed if k not in shapes] + ([] if fc1 else ["blocks.N.mlp.fc1.weight (any block)"])
    if lacking:
        raise ConfigError(f"{path} (unilm BEiT-v2 layout: it has {formats.UNILM_SHARED_TABLE}) is incomplete: "
                          f"missing {', '.join(lacking)}; its sizes cannot be read. {_allowed_text('unilm')}")
    hidden = shapes["cls_token"][-1]
    _, channels, patch, _ = shapes["patch_embed.proj.weight"]
    rows, heads = shapes[formats.UNILM_SHARED_TABLE]
    grid = formats.grid_from_table_rows(rows)
    if grid is None:
        raise ConfigError(f"{path}: {formats.UNILM_SHARED_TABLE} has {rows} rows, which no square patch grid "
                          "has ((2 x grid - 1)^2 + 3); it is not a BEiT-v2 relative-position table")
    depth = 1 + max(int(m.group(1)) for k in shapes for m in [_BLOCK_INDEX.match(k)] if m)
    layer_scale = any(re.fullmatch(r"blocks\.\d+\.gamma_[12]", k) for k in shapes)
    cfg = VisionEncoderConfig(num_layers=depth, hidden_size=hidden, num_heads=heads,
                              ffn_hidden_size=shapes[fc1[0][1]][0], layer_norm_eps=1e-6,
                              image_size=grid * patch, patch_size=patch, num_channels=channels)
    return cfg, layer_scale


def _timm_model(path: Path, architecture: str):
    """The timm model a timm-layout source is read as, on the meta device (shapes only)."""
    import timm

    try:
        with torch.device("meta"):
            if path.is_dir():
                return timm.create_model(f"local-dir:{path}", pretrained=False, num_classes=0), None
            return timm.create_model(architecture, pretrained=False, num_classes=0), architecture
    except (RuntimeError, ValueError, OSError, TypeError) as err:
        what = f"the model of {path / 'config.json'}" if path.is_dir() else f"timm's {architecture}"
        raise ConfigError(f"timm cannot build {what}: {_first_lines(err, 2)}") from err


def inspect_vision(path: str | Path, architecture: str = formats.TIMM_ARCHITECTURE) -> VisionSource:
    """A vision checkpoint, opened and checked strictly without reading its tensors: its layout
    (``unilm`` when it has unilm's shared table ``rel_pos_bias.relative_position_bias_table``, else
    ``timm``), its sizes (unilm: read off the tensors; timm: its folder's config.json, or
    ``architecture`` for a weights file), and every key and shape. A missing or unexpected encoder
    weight, or one of another shape, is refused, naming the keys."""
    path = Path(path)
    weights = _weights_of(path)
    shapes = weights.shapes
    if formats.UNILM_SHARED_TABLE in shapes and not path.is_dir():
        cfg, layer_scale = _unilm_config(path, shapes)
        problems = _key_problems(formats.unilm_shapes(cfg, layer_scale), shapes,
                                 unused=lambda n: formats.unused_vision_key(n, "unilm"))
        if problems:
            raise ConfigError(f"{path} (unilm BEiT-v2 layout: it has {formats.UNILM_SHARED_TABLE}) is not a complete "
                              f"BEiT-v2 encoder of {cfg.num_layers} layers x {cfg.hidden_size}: {problems}. "
                              f"{_allowed_text('unilm')}")
        if layer_scale:
            cfg.layer_scale_init = float(weights.get("blocks.0.gamma_1").float().mean())
        else:  # without layer scale the blocks add attn/mlp unscaled: gammas of 1.0 do the same
            cfg.layer_scale_init = 1.0
        return VisionSource(path, "unilm", cfg, weights, None)
    model, arch = _timm_model(path, architecture)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
    expected_with_token = {**expected, "mask_token": (1, 1, model.embed_dim)}
    problems = _key_problems(expected_with_token, shapes, may_lack={"mask_token"},
                             unused=lambda n: formats.unused_vision_key(n, "timm"))
    if problems:
        if path.is_dir():
            what, fix = "its config.json's model", "Its config.json must describe the model its weights hold"
        else:
            what, fix = f"timm's {architecture}", ("Give the architecture it was saved from (--vision-arch, e.g. "
                                                   "beitv2_large_patch16_224), or pass a folder with config.json")
        raise ConfigError(f"{path} does not hold the weights of {what}: {problems}. {fix}. {_allowed_text('timm')}")
    gamma = "blocks.0.gamma_1"
    cfg = formats.vision_config_from_timm_model(
        model, layer_scale_init=float(weights.get(gamma).float().mean()) if gamma in shapes else None)
    return VisionSource(path, "timm", cfg, weights, arch)


def read_vision(path: str | Path, architecture: str = formats.TIMM_ARCHITECTURE) -> tuple[VisionEncoderConfig, Source]:
    """A BEiT-v2 checkpoint: a timm folder (config.json + model.safetensors, timm's hub layout, as
    the exporter writes it), a timm weights file of ``architecture``, or Microsoft unilm's BEiT-v2
    pre-training checkpoint (``beitv2_base_patch16_224_pt1k.pth``; its sizes are read off its
    tensors). Checked strictly (:func:`inspect_vision`); the mask token is imported when the file
    has one (unilm's has), else it starts new."""
    source = inspect_vision(path, architecture)
    log.info("vision encoder from %s (%s)", source.path, source.description())
    return source.cfg, _Prefixed("vision.", source.tensors())


read_timm_vision = read_vision
"""The former name (the trainer calls it): it reads the unilm layout too."""


# ---- what each encoder starts from ----------------------------------------------------------------
def _field(model: Any, name: str):
    return model.get(name) if isinstance(model, dict) else getattr(model, name, None)


def _hf_weight_names(folder: Path) -> set[str]:
    """Tensor names of a transformers folder's weight files (single or sharded), read from the
    safetensors headers, the shard index, or a memory-mapped torch file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(json.loads((folder / index).read_text())["weight_map"])
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _Weights(folder / name).names()
    raise ConfigError(f"{folder} holds no transformers weights (model.safetensors, pytorch_model.bin or a shard "
                      "index); pass a complete save_pretrained folder")


def _text_line(value: str) -> str:
    kind = text_source_kind(value)
    if kind == "hub":
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            cached = isinstance(try_to_load_from_cache(value, "config.json"), str)
        except ValueError:  # huggingface_hub's validation of the id
            cached = False
        if not cached and constants.HF_HUB_OFFLINE:
            raise ConfigError(f"model.init_text_from: {value} is a hub id but HF_HUB_OFFLINE is set and it is not in "
                              f"the Hugging Face cache ({constants.HF_HUB_CACHE}); download it first "
                              f"({_DOWNLOAD_TEXT.format(id=value)}) and name that folder, or unset HF_HUB_OFFLINE")
        where = ("found in the Hugging Face cache" if cached else
                 f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}): transformers downloads it when the "
                 "ranks start, so every node needs the network, or download it first and name the folder")
        return f"text: {value} (transformers hub id, {where}; encoder and its MLM head when the checkpoint has one)"
    folder = Path(value)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
    names = _hf_weight_names(folder)
    head = any(n.startswith(("lm_head.", "cls.predictions.")) for n in names)
    return (f"text: {value} (transformers {model_type} folder: encoder and MLM head)" if head else
            f"text: {value} (transformers {model_type} folder: encoder; no MLM head in its files, so "
            "text_mlm_head starts random)")


def _xfm_folder_names(folder: str) -> set[str] | None:
    """The parameter names of an xfm weights folder, read from its weights file's header; None when
    they cannot be read (the run config's own check, XFMConfig.from_xfm_folder, then refuses the
    folder with its message)."""
    from safetensors import SafetensorError, safe_open

    from xfm_scale.config import XFM_WEIGHTS

    path = Path(folder) / XFM_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except (OSError, SafetensorError):
        return None


def check_init_sources(model: Any, vision_architecture: str = formats.TIMM_ARCHITECTURE) -> list[str]:
    """What each encoder of a new run starts from, one line each (text, vision, fusion), for the
    launcher's ``--check`` and the run's first log lines. ``model``: the run config's model
    section (a ``ModelSection`` or its YAML mapping). Refuses (:class:`ConfigError`, naming the
    fix) a source that cannot be read: a missing path, a text folder without config.json or
    weights, a vision checkpoint with a missing, unexpected or misshapen encoder weight. Reads no
    tensor data and needs no network: a hub id is reported as such (and whether it is in the local
    Hugging Face cache); it is an error only with HF_HUB_OFFLINE set and nothing cached. A local
    folder is checked for existence and config.json."""
    text, vision, init_from = (_field(model, k) for k in ("init_text_from", "init_vision_from", "init_from"))
    exported = _xfm_folder_names(init_from) if init_from else set()

    def from_export(prefix: str, encoder: str, key: str) -> str:
        if init_from and (exported is None or any(n.startswith(prefix) for n in exported)):
            return f"{encoder}: {init_from} (xfm weights folder, model.init_from)"
        if init_from:
            return f"{encoder}: random init (model.init_from {init_from} has no {prefix}* weights)"
        return f"{encoder}: from scratch (random init; model.{key} is null)"

    lines = []
    try:
        lines.append(_text_line(str(text)) if text else from_export("text.", "text", "init_text_from"))
    except ConfigError as err:
        raise ConfigError(f"model.init_text_from: {err}" if not str(err).startswith("model.") else str(err)) from None
    if vision:
        try:
            source = inspect_vision(vision, vision_architecture)
        except ConfigError as err:
            raise ConfigError(f"model.init_vision_from: {err}") from None
        lines.append(f"vision: {vision} ({source.description()})")
    else:
        lines.append(from_export("vision.", "vision", "init_vision_from"))
    fusion = from_export("fusion.", "fusion", "init_from")
    lines.append(fusion if init_from else "fusion: random init (X-FM does not pretrain it either)")
    return lines


def describe_starting_points(model: Any, resume_step: int | None = None) -> list[str]:
    """The run's first log lines: what each encoder starts from (:func:`check_init_sources`), or,
    for a run that resumes, that its checkpoint gives every weight (``model.init_*`` not read)."""
    if resume_step is not None:
        return [f"text, vision, fusion: resumed from the checkpoint of step {resume_step} (model.init_* not read)"]
    return check_init_sources(model)

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
    and/or the vision encoder from a BEiT-v2 checkpoint (unilm .pth, timm folder or file); the rest of the config (fusion
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
        cfg.vision, source = read_vision(vision, vision_architecture)
        cfg.vision.drop_path_rate = drop_path
        tensors.update(_materialise(source, "vision."))
    cfg.validate()
    return write_xfm_folder(out, cfg, tensors, {"imported_from": {"text": str(text) if text else None,
                                                                 "vision": str(vision) if vision else None}})


def _materialise(source: Source, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: tensor for name in source.names if name.startswith(prefix)
            for tensor in [source(name, "fp32")] if tensor is not None}
