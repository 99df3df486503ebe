"""The blend spec: which corpora, of which modality, with which weight; parsed and validated.

YAML form (paths relative to the spec file)::

    corpora:
      - {name: coco, modality: pair, manifest: shards/coco/coco.manifest.json, weight: 0.4}
      - {name: wiki, modality: text, shards: "shards/wiki/wiki-{000000..000031}.tar", weight: 0.6}

Megatron form (``--data-path "w1 p1 w2 p2"``): each path is a manifest or a shard pattern; the
modality is taken from the manifest or detected from the members of the first samples.

Every error is a :class:`DataSpecError` whose message names the corpus and says what to change.
:func:`check_spec` is the cheap form of :func:`validate` (one process, before any rank starts):
it trusts the manifests' sample counts instead of reading every shard's index.
"""
from __future__ import annotations

import glob
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from ..config.yaml_files import read_yaml
from .shards import (MANIFEST_SUFFIX, MODALITIES, MODALITY_SAMPLES, SHARD_HINT, DataSpecError, detect_modality,
                     first_samples, load_index, read_manifest)

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


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
        raise DataSpecError(f"corpus '{name}': weight {weight!r} is not a finite number; give 'weight:' >= 0")
    if ("shards" in entry) == ("manifest" in entry):
        raise DataSpecError(f"corpus '{name}': give exactly one of 'shards:' (a pattern) or 'manifest:'")
    for key, example in (("shards", "shards/NAME/NAME-{000000..000031}.tar"),
                         ("manifest", f"shards/NAME/NAME{MANIFEST_SUFFIX}")):
        value = entry.get(key, example)
        if not isinstance(value, str) or not value.strip():  # `shards: null` would fail deep in braceexpand
            raise DataSpecError(f"corpus '{name}': '{key}:' is {value!r}; give a path string such as "
                                f"'{example}' (relative to the spec)")
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
            if not _is_number(w) or not math.isfinite(float(w)):  # "nan" and "inf" parse as floats
                raise DataSpecError(f"corpus '{path}': weight {w!r} is not a finite number; write 'w1 p1 w2 p2' "
                                    "with weights >= 0")
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


def check_spec(path: str | Path) -> list[CorpusSpec]:
    """Check a YAML blend spec in one process, cheaply; raises :class:`DataSpecError` naming the
    corpus and the file to fix. For ``--check`` and the run config's validation, before any rank.

    Checks the spec's structure (unique names, weights finite and >= 0 with one > 0, modalities
    known); per manifest corpus, that the manifest exists and parses, that its modality agrees with
    the spec's, and that every shard it lists exists with the recorded size and is recorded with
    samples (the manifest's counts are trusted: no shard index is read); per pattern corpus, that
    the pattern matches shards; per corpus, the modality of the first samples of its first shard (a
    few KB of tar headers). The blend build and every rank open manifest corpora the same way.
    Returns the corpus specs it checked.
    """
    specs, root = load_spec(path)
    check_structure(specs)
    for s in specs:
        if s.manifest is not None:
            _open_manifest_corpus(s, root)  # what the build and every rank do: no index read
        else:
            shards = _expand_pattern(s, root)
            _check_modality(s, s.modality, _first_samples(s, shards[0]), shards[0])
    return specs


def check_structure(specs: list[CorpusSpec]) -> None:
    """The checks that need no file: names unique, modalities known, weights usable."""
    names = [s.name for s in specs]
    for name in sorted(set(names)):
        if names.count(name) > 1:
            raise DataSpecError(f"corpus name '{name}' appears {names.count(name)} times; "
                                "give every corpus a unique name")
    for s in specs:
        if s.modality is not None and s.modality not in MODALITIES:
            raise DataSpecError(f"corpus '{s.name}': unknown modality '{s.modality}'; "
                                f"use one of {', '.join(MODALITIES)}")
        if not math.isfinite(s.weight):
            raise DataSpecError(f"corpus '{s.name}': weight {s.weight} is not a finite number; give a weight >= 0")
        if s.weight < 0:
            raise DataSpecError(f"corpus '{s.name}': weight {s.weight:g} is negative; "
                                "weights must be >= 0 (0 disables a corpus)")
    if all(s.weight == 0 for s in specs):
        raise DataSpecError(f"all corpus weights are zero ({', '.join(names)}); "
                            "give at least one corpus a positive weight")


def validate(specs: list[CorpusSpec], root: Path, cache_dir: str | Path | None = None) -> list[Corpus]:
    """Check the spec and open its corpora (a pattern corpus's shard indexes are read for their
    counts; a manifest corpus's counts come from its manifest). Raises :class:`DataSpecError`."""
    check_structure(specs)
    return [_open_corpus(s, root, cache_dir) for s in specs]


def _open_corpus(s: CorpusSpec, root: Path, cache_dir) -> Corpus:
    if s.manifest is not None:
        return _open_manifest_corpus(s, root)
    shards = _expand_pattern(s, root)
    modality, samples, sizes = s.modality, [], []
    for shard in shards:
        try:
            index = load_index(shard, cache_dir)
        except Exception as exc:  # noqa: BLE001 - tarfile raises several types for garbage
            raise DataSpecError(f"corpus '{s.name}': shard {shard} is not a readable tar ({exc}); "
                                f"{SHARD_HINT}") from None
        if not index["keys"]:
            raise DataSpecError(f"corpus '{s.name}': shard {shard} holds no samples; remove it from "
                                f"the spec or {SHARD_HINT}")
        if len(samples) == 0:
            modality = _check_modality(s, modality, list(zip(index["keys"][:MODALITY_SAMPLES],
                                                             index["members"][:MODALITY_SAMPLES])), shard)
        samples.append(len(index["keys"]))
        sizes.append(index["bytes"])
    return Corpus(name=s.name, modality=modality, weight=s.weight, shards=[str(p) for p in shards],
                  shard_samples=samples, shard_bytes=sizes)


def _open_manifest_corpus(s: CorpusSpec, root: Path) -> Corpus:
    """A manifest corpus from its manifest's counts, without reading any shard's sample index:
    every rank opens the blend's corpora, and at web scale (10^5 shards of 10^4 samples) reading
    every index from shared storage on every rank would take the start-up, and the filesystem,
    down. The manifest's byte sizes are checked against the files (a stat each), and the first
    sample's members against the modality; a shard's index is read by the loader, lazily, when
    one of its samples is (a shard holding fewer samples than its manifest says then yields bad
    samples, counted, not a crash)."""
    shards, modality, samples, sizes = _manifest_shards(s, root)
    empty = [shard.name for shard, n in zip(shards, samples) if n == 0]
    if empty:
        raise DataSpecError(f"corpus '{s.name}': manifest {root / s.manifest} lists shards with no "
                            f"samples ({', '.join(empty[:3])}); {SHARD_HINT}")
    modality = _check_modality(s, modality, _first_samples(s, shards[0]), shards[0])
    return Corpus(name=s.name, modality=modality, weight=s.weight, shards=[str(p) for p in shards],
                  shard_samples=samples, shard_bytes=sizes)


def _check_modality(s: CorpusSpec, modality: str | None, samples: list[tuple[str, dict]], shard: Path) -> str:
    """The corpus's modality, judged from the members of the first samples of its first shard
    (``samples``: ``(key, members)``): one broken sample (a pair without its caption) neither
    decides it nor refuses a right one. A declared modality passes when some of those samples have
    it; the others are named in a warning (the loader skips and counts them)."""
    found = [(key, members, detect_modality(members)) for key, members in samples]
    kinds = Counter(kind for _, _, kind in found)
    fits = {modality, "pair"} if modality == "image" else {modality}  # pairs may serve as images
    if modality is None:
        modality = max((kind for kind in kinds if kind is not None), key=lambda k: kinds[k], default=None)
        if modality is None:
            raise DataSpecError(f"corpus '{s.name}': cannot tell the modality of {shard} (members of its first "
                                f"samples: {_named(found, 3)}); use a YAML spec with 'modality:'")
        fits = {modality}
    elif not kinds.keys() & fits:
        held = " and ".join(f"'{kind}'" for kind in sorted(kinds, key=str))
        raise DataSpecError(f"corpus '{s.name}': declared modality '{modality}' but {shard} holds {held} samples "
                            f"(none of its first {len(found)} is a '{modality}' sample: {_named(found, 3)}); fix "
                            "'modality:'")
    odd = [item for item in found if item[2] not in fits]
    if odd and (s.name, str(shard)) not in _warned:  # once per process: every rank opens the corpora
        _warned.add((s.name, str(shard)))
        log.warning("corpus '%s': %d of the first %d samples of %s are not '%s' samples (%s); the loader skips and "
                    "counts such samples", s.name, len(odd), len(found), shard, modality, _named(odd, 3))
    return modality


def _named(found: list[tuple[str, dict, str | None]], n: int) -> str:
    """The first ``n`` samples as ``KEY ['jpg', 'txt']``."""
    named = ", ".join(f"{key} {sorted(members)}" for key, members, _ in found[:n])
    return named + (f" (+{len(found) - n} more)" if len(found) > n else "")


def _first_samples(s: CorpusSpec, shard: Path) -> list[tuple[str, dict]]:
    try:
        samples = first_samples(shard)
    except Exception as exc:  # noqa: BLE001 - tarfile raises several types for garbage
        raise DataSpecError(f"corpus '{s.name}': shard {shard} is not a readable tar ({exc}); "
                            f"{SHARD_HINT}") from None
    if not samples:
        raise DataSpecError(f"corpus '{s.name}': shard {shard} holds no samples; remove it from "
                            f"the spec or {SHARD_HINT}")
    return samples


def _expand_pattern(s: CorpusSpec, root: Path) -> list[Path]:
    paths: list[Path] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(s.shards):
        full = str(root / item)
        matches = sorted(glob.glob(full)) if glob.has_magic(item) else [full]
        matches = [m for m in matches if Path(m).is_file()]  # a folder is no shard
        if not matches:
            missing.append(full)
        paths.extend(Path(m).resolve() for m in matches)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataSpecError(f"corpus '{s.name}': shard pattern '{s.shards}' has missing shards: {shown}; "
                            f"fix the pattern (relative to {root}) or {SHARD_HINT}")
    return paths


def _manifest_shards(s: CorpusSpec, root: Path) -> tuple[list[Path], str, list[int], list[int]]:
    """(shard paths, modality, samples and bytes per shard as recorded) of a manifest corpus; every shard
    listed must exist with the recorded size (a stat each: no shard is read)."""
    path = root / s.manifest
    if not path.is_file():
        what = "is a folder, not a manifest file" if path.is_dir() else "does not exist"
        raise DataSpecError(f"corpus '{s.name}': manifest {path} {what}; fix 'manifest:' "
                            f"(relative to {root}) or {SHARD_HINT}")
    manifest = read_manifest(path, s.name)
    modality = _manifest_modality(s, manifest.get("modality"), path)
    if not manifest["shards"]:
        raise DataSpecError(f"corpus '{s.name}': manifest {path} lists no shards (0 samples written: "
                            f"see its 'skipped' counts {manifest.get('skipped')}); fix the source and {SHARD_HINT}")
    shards = []
    for entry in manifest["shards"]:
        shard = (path.parent / entry["name"]).resolve()
        if not shard.is_file():
            raise DataSpecError(f"corpus '{s.name}': shard {shard} listed in {path.name} is missing; "
                                f"copy it back or {SHARD_HINT}")
        if shard.stat().st_size != entry["bytes"]:
            raise DataSpecError(f"corpus '{s.name}': shard {shard} has {shard.stat().st_size} bytes, the "
                                f"manifest says {entry['bytes']} (truncated or rewritten); {SHARD_HINT}")
        shards.append(shard)
    return (shards, modality, [entry["samples"] for entry in manifest["shards"]],
            [entry["bytes"] for entry in manifest["shards"]])


def _manifest_modality(s: CorpusSpec, recorded: str | None, path: Path) -> str:
    """The spec's modality, checked against the manifest's; the manifest's when the spec has none."""
    if s.modality is None:
        if recorded is None:
            raise DataSpecError(f"corpus '{s.name}': manifest {path} records no 'modality' and the spec gives "
                                f"none; give the corpus 'modality:' in a YAML spec, or {SHARD_HINT}")
        return recorded
    if recorded not in (s.modality, None) and not (s.modality == "image" and recorded == "pair"):
        raise DataSpecError(f"corpus '{s.name}': spec says modality '{s.modality}' but the manifest says "
                            f"'{recorded}'; fix 'modality:'")
    return s.modality
