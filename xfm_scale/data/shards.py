"""Webdataset tar shards: writing corpora, manifests, and a random-access index per shard.

A corpus is a set of tar shards written with webdataset's ``ShardWriter``. Every sample is a
group of tar members sharing a key (webdataset's convention, ``000000012.txt`` + ``000000012.jpg``):

* text:  ``KEY.txt`` (UTF-8 text)
* image: ``KEY.<jpg|png|...>`` (encoded image bytes, as found in the source)
* pair:  ``KEY.<jpg|png|...>`` + ``KEY.txt`` (caption)

Next to the shards, ``NAME.manifest.json`` records per shard: name, samples, bytes, sha256; plus
the counts of source records skipped per reason. A ``SHARD.idx.json`` sidecar holds the byte
offsets of every member, so the loader can read one sample with one seek (random access) instead
of streaming the tar.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# webdataset is imported where it is used: importing it imports torch (about 0.9 GB and 2 s), which
# the blend and its CLI (tools/blend_data.py) do not need.

MODALITIES = ("text", "image", "pair")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXT = "txt"
MANIFEST_SUFFIX = ".manifest.json"
INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1
SHARD_HINT = "run tools/make_shards.py to (re)build it"


class DataSpecError(ValueError):
    """Invalid data input (spec, shards, manifest). The message names the corpus and the fix."""


@dataclass(frozen=True)
class Skip:
    """A source record that cannot become a sample; ``reason`` is counted, never dropped silently."""
    reason: str
    detail: str = field(default="", compare=False)
    """Which record, for the message (``photos/17.jpg``, ``pairs.jsonl:12``); not part of equality."""


@dataclass(kw_only=True)
class WriteResult:
    """What :func:`write_corpus` produced."""
    manifest_path: Path
    """The corpus manifest (``OUT/NAME.manifest.json``)."""
    num_samples: int
    """Samples written."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Source records skipped, per reason."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few skipped records of each reason, named (their distinct :attr:`Skip.detail`)."""


SKIPPED_EXAMPLES = 5
"""Skipped records named per reason in a manifest and in make_shards' report."""


class SkipCounter:
    """Skipped records per reason, with the first :data:`SKIPPED_EXAMPLES` distinct ones of each named."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        named = self.examples.setdefault(skip.reason, [])
        if skip.detail and len(named) < SKIPPED_EXAMPLES and skip.detail not in named:
            named.append(skip.detail)


# ----------------------------------------------------------------------------- writing

def write_corpus(records: Iterable[dict | Skip], *, out_dir: str | Path, name: str, modality: str,
                 maxcount: int = 10_000, maxsize: float = 1e9, source: str = "") -> WriteResult:
    """Write ``records`` as webdataset shards ``OUT/NAME-000000.tar`` ... plus the manifest.

    A record is a dict of webdataset members without the key (``{"txt": str}``,
    ``{"png": bytes}``, ``{"jpg": bytes, "txt": str}``) or a :class:`Skip`. The corpus's previous
    shards in ``out_dir`` are deleted first, and only they: other corpora may share the folder.
    """
    if modality not in MODALITIES:
        raise DataSpecError(f"corpus '{name}': unknown modality '{modality}'; use one of {', '.join(MODALITIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in own_files(out_dir, name):  # a rewrite must not leave stale shards behind
        old.unlink()
    skipped = SkipCounter()
    count = 0
    pattern = str(out_dir / f"{name}-%06d.tar")
    import webdataset as wds

    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for record in records:
            if isinstance(record, Skip):
                skipped.add(record)
                continue
            writer.write({"__key__": f"{count:09d}", **record})
            count += 1
    entries = []
    for shard in own_files(out_dir, name, indexes=False):
        index = build_index(shard)
        if not index["keys"]:  # ShardWriter opens its first shard before any record: 0 written
            shard.unlink()
            continue
        write_index(shard, index)
        entries.append({"name": shard.name, "samples": len(index["keys"]),
                        "bytes": shard.stat().st_size, "sha256": sha256_file(shard)})
    examples = {reason: named for reason, named in sorted(skipped.examples.items()) if named}
    manifest = {"name": name, "modality": modality, "num_samples": count, "shards": entries,
                "skipped": dict(sorted(skipped.counts.items())), "skipped_examples": examples, "source": source}
    manifest_path = out_dir / f"{name}{MANIFEST_SUFFIX}"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return WriteResult(manifest_path=manifest_path, num_samples=count, skipped=dict(skipped.counts),
                       skipped_examples=examples)


def shard_name_pattern(name: str) -> re.Pattern:
    """Exactly the files :func:`write_corpus` writes for corpus ``name``: ``NAME-<digits>.tar``
    (ShardWriter's ``%06d``, wider past 999999) and its ``.idx.json`` sidecar.

    A glob such as ``NAME-*.tar`` would also match another corpus's shards in the same folder
    (``wiki`` would take ``wiki-en-000000.tar``), and a rewrite of one must never delete the other.
    """
    return re.compile(rf"{re.escape(name)}-(\d{{6,}})\.tar(?:{re.escape(INDEX_SUFFIX)})?")


def own_files(out_dir: Path, name: str, *, indexes: bool = True) -> list[Path]:
    """Corpus ``name``'s shards in ``out_dir`` (and their index sidecars), in shard-number order."""
    pattern = shard_name_pattern(name)
    found = []
    for path in out_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (indexes or not path.name.endswith(INDEX_SUFFIX)) and path.is_file():
            found.append((int(match.group(1)), path.name, path))
    return [path for _, _, path in sorted(found)]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | Path, corpus: str) -> dict:
    """A manifest, checked field by field: anything malformed is a :class:`DataSpecError` naming
    ``corpus``, the file and the field (never a bare JSONDecodeError or KeyError in a rank)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a manifest file" if path.is_dir() else "does not exist"
        raise DataSpecError(f"corpus '{corpus}': manifest {path} {what}; point 'manifest:' at its "
                            f"NAME{MANIFEST_SUFFIX} or {SHARD_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataSpecError(f"corpus '{corpus}': manifest {path} is not readable JSON ({exc}); "
                            f"{SHARD_HINT}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataSpecError(f"corpus '{corpus}': manifest {path} has no 'shards' list; {SHARD_HINT}")
    modality = manifest.get("modality")
    if modality is not None and modality not in MODALITIES:
        raise DataSpecError(f"corpus '{corpus}': manifest {path} says modality {modality!r}; fix it to one "
                            f"of {', '.join(MODALITIES)} or {SHARD_HINT}")
    for i, entry in enumerate(manifest["shards"]):
        bad = [key for key in ("name", "bytes", "samples") if not _valid_entry_field(entry, key)]
        if bad:
            raise DataSpecError(f"corpus '{corpus}': manifest {path}, shard entry #{i + 1} has no valid "
                                f"{', '.join(repr(k) for k in bad)} (want name: str, bytes and samples: "
                                f"ints >= 0); {SHARD_HINT}")
    return manifest


def _valid_entry_field(entry, key: str) -> bool:
    value = entry.get(key) if isinstance(entry, dict) else None
    if key == "name":
        return isinstance(value, str) and bool(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_manifest(manifest_path: str | Path) -> list[str]:
    """Recompute every shard's size and sha256; return the names of shards that differ."""
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path, manifest_path.name.removesuffix(MANIFEST_SUFFIX))
    bad = []
    for entry in manifest["shards"]:
        path = manifest_path.parent / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry.get("sha256"):
            bad.append(entry["name"])
    return bad


# ----------------------------------------------------------------------------- the random-access index

def build_index(shard: str | Path) -> dict:
    """Scan one tar once with :mod:`tarfile` and record ``key -> {ext: (offset, size)}``.

    webdataset itself only streams tars; random access needs the byte offset of each member's
    data (``TarInfo.offset_data``), which ``tarfile`` gives in one sequential pass.
    """
    keys: list[str] = []
    members: list[dict[str, list[int]]] = []
    position: dict[str, int] = {}
    for key, ext, span in _sample_members(shard):
        if key not in position:
            position[key] = len(keys)
            keys.append(key)
            members.append({})
        members[position[key]][ext] = span
    return {"version": INDEX_VERSION, "bytes": os.path.getsize(shard), "keys": keys, "members": members}


MODALITY_SAMPLES = 16
"""Samples at the start of a corpus's first shard from which its modality is judged (one broken
sample must not decide it)."""


def first_samples(shard: str | Path, n: int = MODALITY_SAMPLES) -> list[tuple[str, dict[str, list[int]]]]:
    """``(key, members)`` of the first ``n`` samples from the tar headers at the start of the shard
    (a few KB read instead of the whole scan; how :func:`xfm_scale.data.spec.check_spec` checks a
    corpus's modality cheaply)."""
    samples: list[tuple[str, dict[str, list[int]]]] = []
    for key, ext, span in _sample_members(shard):
        if not samples or samples[-1][0] != key:
            if len(samples) == n:
                break  # webdataset writes a sample's members together: the n-th sample is complete
            samples.append((key, {}))
        samples[-1][1][ext] = span
    return samples


_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """(key, extensions) of a tar member name: webdataset.tariterators.base_plus_ext's rule
    (tests/data/test_data_spec.py checks they agree), without importing webdataset (and torch)."""
    match = _BASE_PLUS_EXT.match(path)
    return (match.group(1), match.group(2)) if match else (None, None)


def _sample_members(shard: str | Path):
    """(key, ext, [data offset, size]) of each sample member, in tar order, read lazily from the
    headers. Keys and extensions are split with webdataset's own rule (``base_plus_ext``);
    webdataset's ``__``-prefixed entries are not samples."""
    with tarfile.open(shard, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None or key.startswith("__"):
                continue
            yield key, ext.lower(), [info.offset_data, info.size]


def write_index(shard: str | Path, index: dict, cache_dir: str | Path | None = None) -> None:
    path = index_path(shard, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(index))
    tmp.replace(path)  # atomic: concurrent ranks never read a half-written index


def index_path(shard: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The sidecar next to the shard, or (for shards we may not write beside) one in ``cache_dir``."""
    shard = Path(shard).resolve()
    if cache_dir is None:
        return shard.with_name(shard.name + INDEX_SUFFIX)
    digest = hashlib.sha256(str(shard).encode()).hexdigest()[:20]
    return Path(cache_dir) / "tar-index" / f"{shard.stem}-{digest}{INDEX_SUFFIX}"


def load_index(shard: str | Path, cache_dir: str | Path | None = None) -> dict:
    """The shard's index from its sidecar or the cache, rebuilt if missing or stale (size changed)."""
    size = os.path.getsize(shard)
    for candidate in (index_path(shard), index_path(shard, cache_dir) if cache_dir else None):
        if candidate is not None and candidate.exists():
            try:
                index = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if index.get("version") == INDEX_VERSION and index.get("bytes") == size:
                return index
    index = build_index(shard)
    try:
        write_index(shard, index, cache_dir)
    except OSError:
        pass  # read-only everywhere: keep the in-memory index, it is only a cache
    return index


class ShardReader:
    """Reads one sample's members by seek + read. One open file per shard, per process.

    File objects are opened lazily and keyed by pid: a DataLoader worker forked from a process
    that already had files open must not share their offsets.
    """

    def __init__(self):
        self._files: dict[str, io.BufferedReader] = {}
        self._pid = os.getpid()

    def read(self, shard: str, member: tuple[int, int]) -> bytes:
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 64:  # bound open files on corpora with thousands of shards
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open(shard, "rb")
        offset, size = member
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:  # the shard was cut after it was indexed
            raise EOFError(f"{shard}: {size} bytes expected at offset {offset}, {len(data)} there")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def iter_tar_samples(shard: str | Path) -> Iterator[dict]:
    """Stream one shard as webdataset dicts (used by tests and the benchmark baseline)."""
    import webdataset as wds

    yield from wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)


def image_ext(members: dict) -> str | None:
    """The first image member's extension of a sample, if any."""
    return next((ext for ext in members if ext in IMAGE_EXTS), None)


def detect_modality(members: dict) -> str | None:
    """Which modality a sample's members form (``None``: neither)."""
    has_image, has_text = image_ext(members) is not None, TEXT_EXT in members
    if has_image and has_text:
        return "pair"
    if has_image:
        return "image"
    if has_text:
        return "text"
    return None
