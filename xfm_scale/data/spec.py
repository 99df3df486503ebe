"""The blend spec: which corpora, of which modality, with which weight; parsed and validated.

YAML form (paths relative to the spec file)::

    corpora:
      - {name: coco, modality: pair, manifest: shards/coco/coco.manifest.json, weight: 0.4}
      - {name: wiki, modality: text, shards: "shards/wiki/wiki-{000000..000031}.tar", weight: 0.6}

Megatron form (``--data-path "w1 p1 w2 p2"``): each path is a manifest or a shard pattern; the
modality is taken from the manifest or detected from the first sample's members.

Every error is a :class:`DataSpecError` whose message names the corpus and says what to change.
"""
from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from ..yaml_files import read_yaml
from .shards import MANIFEST_SUFFIX, MODALITIES, DataSpecError, detect_modality, load_index

_SHARD_HINT = "run tools/make_shards.py to (re)build it"


@dataclass(kw_only=True)
class CorpusSpec:
    """One corpus of the blend, as written in the spec (before its shards are opened)."""
    name: str
    """Unique name; samples are keyed ``name/key``."""
    modality: str | None
    """text | image | pair; ``None`` only in the Megatron form, where it is detected."""
    weight: float
    """Relative share of the blend (normalised over all corpora; 0 disables the corpus)."""
    shards: str | None = None
    """Shard pattern: brace expansion (``a-{000..009}.tar``) and/or glob, relative to the spec."""
    manifest: str | None = None
    """A ``*.manifest.json`` written by tools/make_shards.py (alternative to ``shards``)."""


@dataclass(kw_only=True)
class Corpus:
    """A validated corpus: its shard files and their sample counts."""
    name: str
    """Unique name of the corpus."""
    modality: str
    """text | image | pair."""
    weight: float
    """Weight as written in the spec (not normalised)."""
    shards: list[str]
    """Absolute shard paths, in order."""
    shard_samples: list[int]
    """Samples per shard (from each shard's index)."""
    shard_bytes: list[int] = field(default_factory=list)
    """Bytes per shard (part of the blend's cache key: a rewritten shard invalidates it)."""

    @property
    def num_samples(self) -> int:
        return sum(self.shard_samples)


def load_spec(path: str | Path) -> tuple[list[CorpusSpec], Path]:
    """Parse a YAML spec; returns the corpus specs and the folder relative paths resolve against."""
    path = Path(path)
    raw = read_yaml(path, what="blend spec file", error=DataSpecError)
    entries = raw.get("corpora") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataSpecError(f"spec file {path} has no 'corpora' list; write 'corpora:' with one entry "
                            "per corpus (name, modality, shards or manifest, weight)")
    return [_corpus_spec(entry, i) for i, entry in enumerate(entries)], path.parent


def _corpus_spec(entry, i: int) -> CorpusSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise DataSpecError(f"corpus #{i + 1} has no name; give every corpus a 'name:'")
    name = entry["name"]
    unknown = set(entry) - {"name", "modality", "weight", "shards", "manifest"}
    if unknown:
        raise DataSpecError(f"corpus '{name}': unknown field(s) {sorted(unknown)}; "
                            "allowed: name, modality, weight, shards, manifest")
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise DataSpecError(f"corpus '{name}': weight {weight!r} is not a number; give 'weight:' >= 0")
    if ("shards" in entry) == ("manifest" in entry):
        raise DataSpecError(f"corpus '{name}': give exactly one of 'shards:' (a pattern) or 'manifest:'")
    return CorpusSpec(name=name, modality=entry.get("modality"), weight=float(weight),
                      shards=entry.get("shards"), manifest=entry.get("manifest"))


def parse_data_path(data_path: str | list[str]) -> list[CorpusSpec]:
    """Megatron's ``"w1 p1 w2 p2 ..."`` (or ``"p1 p2"``: equal weights) form."""
    tokens = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not tokens:
        raise DataSpecError("--data-path is empty; give 'w1 path1 w2 path2 ...'")
    if _is_number(tokens[0]):
        if len(tokens) % 2:
            raise DataSpecError(f"--data-path has {len(tokens)} items; give weight/path pairs 'w1 p1 w2 p2'")
        pairs = [(tokens[i + 1], tokens[i]) for i in range(0, len(tokens), 2)]
        for path, w in pairs:
            if not _is_number(w):
                raise DataSpecError(f"corpus '{path}': weight {w!r} is not a number; write 'w1 p1 w2 p2'")
    else:
        pairs = [(path, "1") for path in tokens]
    specs, seen = [], set()
    for path, w in pairs:
        name = _name_from_path(path)
        while name in seen:
            name += "_"
        seen.add(name)
        is_manifest = path.endswith(MANIFEST_SUFFIX)
        specs.append(CorpusSpec(name=name, modality=None, weight=float(w),
                                manifest=path if is_manifest else None, shards=None if is_manifest else path))
    return specs


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _name_from_path(path: str) -> str:
    base = Path(path).name
    base = base[:-len(MANIFEST_SUFFIX)] if base.endswith(MANIFEST_SUFFIX) else base
    return re.split(r"[-_]?[{\[*]|\.tar", base)[0] or Path(path).parent.name


def validate(specs: list[CorpusSpec], root: Path, cache_dir: str | Path | None = None) -> list[Corpus]:
    """Check the spec and open every shard's index. Raises :class:`DataSpecError`."""
    names = [s.name for s in specs]
    for name in sorted(set(names)):
        if names.count(name) > 1:
            raise DataSpecError(f"corpus name '{name}' appears {names.count(name)} times; "
                                "give every corpus a unique name")
    for s in specs:
        if s.modality is not None and s.modality not in MODALITIES:
            raise DataSpecError(f"corpus '{s.name}': unknown modality '{s.modality}'; "
                                f"use one of {', '.join(MODALITIES)}")
        if s.weight < 0:
            raise DataSpecError(f"corpus '{s.name}': weight {s.weight:g} is negative; "
                                "weights must be >= 0 (0 disables a corpus)")
    if all(s.weight == 0 for s in specs):
        raise DataSpecError(f"all corpus weights are zero ({', '.join(names)}); "
                            "give at least one corpus a positive weight")
    return [_open_corpus(s, root, cache_dir) for s in specs]


def _open_corpus(s: CorpusSpec, root: Path, cache_dir) -> Corpus:
    modality = s.modality
    if s.manifest is not None:
        shards, modality = _manifest_shards(s, root)
    else:
        shards = _expand_pattern(s, root)
    samples, sizes = [], []
    for shard in shards:
        try:
            index = load_index(shard, cache_dir)
        except Exception as exc:  # noqa: BLE001 - tarfile raises several types for garbage
            raise DataSpecError(f"corpus '{s.name}': shard {shard} is not a readable tar ({exc}); "
                                f"{_SHARD_HINT}") from None
        if not index["keys"]:
            raise DataSpecError(f"corpus '{s.name}': shard {shard} holds no samples; remove it from "
                                f"the spec or {_SHARD_HINT}")
        if len(samples) == 0:
            modality = _check_modality(s, modality, index, shard)
        samples.append(len(index["keys"]))
        sizes.append(index["bytes"])
    return Corpus(name=s.name, modality=modality, weight=s.weight, shards=[str(p) for p in shards],
                  shard_samples=samples, shard_bytes=sizes)


def _check_modality(s: CorpusSpec, modality: str | None, index: dict, shard: Path) -> str:
    found = detect_modality(index["members"][0])
    if modality is None:
        if found is None:
            raise DataSpecError(f"corpus '{s.name}': cannot tell the modality of {shard} "
                                f"(members {sorted(index['members'][0])}); use a YAML spec with 'modality:'")
        return found
    if found != modality and not (modality == "image" and found == "pair"):  # pairs may serve as images
        raise DataSpecError(f"corpus '{s.name}': declared modality '{modality}' but {shard} holds "
                            f"'{found}' samples (members {sorted(index['members'][0])}); fix 'modality:'")
    return modality


def _expand_pattern(s: CorpusSpec, root: Path) -> list[Path]:
    paths: list[Path] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(s.shards):
        full = str(root / item)
        matches = sorted(glob.glob(full)) if glob.has_magic(item) else ([full] if Path(full).exists() else [])
        if not matches:
            missing.append(full)
        paths.extend(Path(m).resolve() for m in matches)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataSpecError(f"corpus '{s.name}': shard pattern '{s.shards}' has missing shards: {shown}; "
                            f"fix the pattern (relative to {root}) or {_SHARD_HINT}")
    return paths


def _manifest_shards(s: CorpusSpec, root: Path) -> tuple[list[Path], str]:
    path = root / s.manifest
    if not path.exists():
        raise DataSpecError(f"corpus '{s.name}': manifest {path} does not exist; fix 'manifest:' "
                            f"(relative to {root}) or {_SHARD_HINT}")
    manifest = json.loads(path.read_text())
    if s.modality is not None and manifest.get("modality") not in (s.modality, None) and \
            not (s.modality == "image" and manifest.get("modality") == "pair"):
        raise DataSpecError(f"corpus '{s.name}': spec says modality '{s.modality}' but the manifest says "
                            f"'{manifest.get('modality')}'; fix 'modality:'")
    if not manifest.get("shards"):
        raise DataSpecError(f"corpus '{s.name}': manifest {path} lists no shards (0 samples written: "
                            f"see its 'skipped' counts {manifest.get('skipped')}); fix the source and {_SHARD_HINT}")
    shards = []
    for entry in manifest["shards"]:
        shard = (path.parent / entry["name"]).resolve()
        if not shard.exists():
            raise DataSpecError(f"corpus '{s.name}': shard {shard} listed in {path.name} is missing; "
                                f"copy it back or {_SHARD_HINT}")
        if shard.stat().st_size != entry["bytes"]:
            raise DataSpecError(f"corpus '{s.name}': shard {shard} has {shard.stat().st_size} bytes, the "
                                f"manifest says {entry['bytes']} (truncated or rewritten); {_SHARD_HINT}")
        shards.append(shard)
    return shards, s.modality or manifest["modality"]
