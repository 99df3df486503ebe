"""Fixtures of the data tests: tiny corpora written as real webdataset shards in tmp dirs."""
from __future__ import annotations


import pytest

from xfm_scale.data.demo import build_demo_data
from xfm_scale.data.shards import write_corpus  # noqa: F401

from data_fixtures import png, text_corpus, write_spec  # noqa: F401  (the data tests import them from here)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo world (the real builder, fewer samples)."""
    root = tmp_path_factory.mktemp("demo")
    return build_demo_data(root, num_pairs=300, num_images=120, num_text=300, num_eval_pairs=40)
