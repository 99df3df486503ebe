"""A run sized at billions of samples (train.steps x global batch ~ 10^10), as X-FM's larger runs
are: the blend is closed forms, so the ranks train their first steps with a cache of one small
file and no per-sample index, stop with a checkpoint (train.stop_at_step, a cluster job's slice),
and a relaunch continues the loader's cursor with nothing read twice or skipped."""
from __future__ import annotations

import pytest

from engine_fixtures import run_config_dict, step_losses
from harness import run_ranks

pytestmark = pytest.mark.dist
STEPS = 600_000_000  # x global batch 16: 9.6 billion samples, with the trainer's margin above that


def billions_rank(raw: dict) -> dict:
    import os

    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    trainer.run()
    loader = trainer.loader
    return {"step": trainer.step, "num_samples": loader.blend.num_samples, "num_steps": loader.num_steps,
            "cursor": loader.state_dict(), "micro_batch": raw["batch"]["micro_batch_size"],
            "dp": trainer.layout.data_parallel_size}


def consumed(result: dict) -> int:
    """Global samples the cursor has read: every micro-step reads micro-batch x DP of one modality."""
    return sum(v for k, v in result["cursor"].items() if k.startswith("offset_"))


def test_a_ten_billion_sample_run_trains_stops_and_continues(demo_world, tmp_path):
    raw = run_config_dict(demo_world, tmp_path / "run", steps=STEPS, micro_batch=4, global_batch=16)
    raw["train"]["stop_at_step"] = 3
    first = run_ranks(billions_rank, 2, raw)[0]
    assert first["step"] == 3 and first["num_samples"] >= STEPS * 16 > 9e9
    assert STEPS - 3 <= first["num_steps"]  # the blend feeds the rest of the run (closed form)
    assert consumed(first) == 3 * 16
    cache = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.name for p in cache] == ["blend.json"] and cache[0].stat().st_size < 20_000

    raw["train"]["stop_at_step"] = 5
    second = run_ranks(billions_rank, 2, raw)[0]
    assert second["step"] == 5 and consumed(second) == 5 * 16  # continued: 2 more steps' samples
    assert second["num_steps"] == first["num_steps"] - 2
    assert sorted(step_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
