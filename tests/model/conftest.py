"""Fixtures of the single-process model tests."""
import pytest

from xfm_scale import distributed


@pytest.fixture(scope="module")
def world_of_one():
    """A real one-rank process group and megatron parallel state in this process (the model's TP
    layers need it; the row-parallel layers' group lookup, which used to break compiled graphs,
    happens only then)."""
    distributed.initialize(tensor_parallel_size=1, seed=5)
    yield
