"""Fixtures of the data tests: tiny corpora written as real webdataset shards in tmp dirs."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from PIL import Image

from xfm_scale.data.demo import build_demo_data
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


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo world (the real builder, fewer samples)."""
    root = tmp_path_factory.mktemp("demo")
    return build_demo_data(root, num_pairs=300, num_images=120, num_text=300, num_eval_pairs=40)
