import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # so spawned ranks can import test modules and harness

import pytest  # noqa: E402

from xfm_scale.quiet import silence_known_noise  # noqa: E402

silence_known_noise()  # as every entry point does: tools run in-process here (run_tool) read clean stderr


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """A small demo world (pairs, images, text, tokenizer, eval pairs), built once per session."""
    from xfm_scale.data import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("demo_world"), num_pairs=600, num_images=200,
                           num_text=600, num_eval_pairs=40)
