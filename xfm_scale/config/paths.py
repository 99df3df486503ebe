"""Where a run config's relative paths point: inputs next to the config file (or, failing that,
in the repository, so configs can name ``ds_configs/...``), outputs and caches where the run is
launched, and command-line values where the shell user is."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (ds_configs/ and launchers/configs/ live there)."""
PATH_KEYS = {("data", "spec"), ("data", "tokenizer_dir"), ("data", "eval_manifest"), ("data", "cache_dir"),
             ("train", "output_dir"), ("model", "init_from"), ("model", "init_text_from"),
             ("model", "init_vision_from"), ("deepspeed", "config")}
"""(section, key) of every path-valued field."""
OUTPUT_KEYS = {("train", "output_dir"), ("data", "cache_dir")}
"""Paths the run writes: relative to the current directory."""
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
"""The shape of a Hugging Face hub id (``roberta-base``, ``FacebookAI/roberta-base``)."""
HUB_ID_KEYS = {("model", "init_text_from")}
"""Fields that may name a hub model instead of a path."""


def is_hub_id(value: str) -> bool:
    """Whether ``value`` names a hub model rather than a path: no local file or folder of that
    name, not absolute, not ``./``/``../``/``~``, and shaped like ``name`` or ``org/name``."""
    return (not os.path.exists(value) and not os.path.isabs(value) and not value.startswith((".", "~"))
            and HUB_ID.fullmatch(value) is not None)


def resolve(path: str | None, base: Path, key: tuple[str, str]) -> str | None:
    """``path`` (of field ``key``) made absolute: from ``base`` (the config's folder, or the current
    directory for command-line values), falling back to the repository for inputs."""
    if path is None or os.path.isabs(path):
        return path
    if key in OUTPUT_KEYS:
        return os.path.abspath(path)
    for root in (base, REPOSITORY):
        if (root / path).exists():
            return str((root / path).resolve())
    if key in HUB_ID_KEYS and is_hub_id(path):
        return path  # a hub model, as written
    return str((base / path).resolve())
