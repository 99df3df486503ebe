"""Pinned host memory for offload (xfm_scale.distributed.exact_pinned_allocations): the allocator
setting is applied exactly when a DeepSpeed config pins offloaded state, and a user's own value
wins. What it saves is GPU-only (benchmarks/memory.py --largest measures it); here the wiring."""
import json
import subprocess
import sys

import pytest

from harness import tool_env
from xfm_scale.engine.memory import pins_offloaded_memory, unpinned_partitions

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("zero, pins", [
    ({"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}}, True),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}, True),
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "pin_memory": True}}, True),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}, False),
    ({"stage": 3, "offload_optimizer": {"device": "none", "pin_memory": True}}, False),
    ({"stage": 3}, False),
])
def test_pinned_offload_is_recognised_from_the_deepspeed_config(zero, pins):
    assert pins_offloaded_memory({"zero_optimization": zero}) is pins


SETTINGS = """
import json, torch
from xfm_scale.engine import memory as engine_memory
before = torch._C._accelerator_getAllocatorSettings()
applied = engine_memory.exact_pinned_allocations()
engine_memory.release_cached_pinned_memory()
print(json.dumps({"before": before, "after": torch._C._accelerator_getAllocatorSettings(), "applied": applied}))
"""


def _settings_in_fresh_process(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SETTINGS], capture_output=True, text=True, env=tool_env(**env),
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_pinned_allocations_are_made_at_their_exact_size():
    result = _settings_in_fresh_process()
    assert result["applied"]
    assert "pinned_max_round_threshold_mb:16" in result["after"], result
    assert "pinned_max_round_threshold_mb" not in result["before"]


def test_a_threshold_the_user_set_is_kept():
    result = _settings_in_fresh_process(PYTORCH_ALLOC_CONF="pinned_max_round_threshold_mb:64")
    assert result["applied"] and "pinned_max_round_threshold_mb:64" in result["after"]
    assert "pinned_max_round_threshold_mb:16" not in result["after"], result


def test_the_model_is_built_with_pageable_partitions_and_the_engine_keeps_the_pinned_config():
    """zero.Init gets a copy with offload_param unpinned (its per-parameter partitions are freed
    once copied into the optimizer's flat pinned buffer); the config itself is not changed, and an
    NVMe offload, which swaps through pinned buffers, keeps its setting."""

    config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                    "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    built = unpinned_partitions(config)
    assert built["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert built["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert config["zero_optimization"]["offload_param"]["pin_memory"] is True
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "pin_memory": True}}}
    assert unpinned_partitions(nvme) == nvme
