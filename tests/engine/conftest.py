import pytest


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """A small demo world (pairs, images, text, tokenizer, eval pairs), built once per session."""
    from xfm_scale.data import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("demo_world"), num_pairs=600, num_images=200,
                           num_text=600, num_eval_pairs=40)
