"""Helpers shared by the data tests, importable by a unique name (``from data_fixtures import ...``):
``conftest`` names another module when these tests run together with tests/model or tests/faults."""
from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from PIL import Image

from xfm_scale.data.shards import write_corpus


def png(colour=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def text_corpus(root: Path, name: str, n: int, maxcount: int = 10) -> Path:
    """``n`` text samples ``"<name> sentence <i>"`` in shards of ``maxcount``; returns the manifest."""
    records = ({"txt": f"{name} sentence number {i} is short"} for i in range(n))
    return write_corpus(records, out_dir=root / name, name=name, modality="text", maxcount=maxcount).manifest_path


def write_spec(path: Path, corpora: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"corpora": corpora}, sort_keys=False))
    return path


def take(loader, n=None) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y) and x.sample_keys == y.sample_keys
        for f in fields(x):
            if isinstance(getattr(x, f.name), torch.Tensor):
                assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f.name
