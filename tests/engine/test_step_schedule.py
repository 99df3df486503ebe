"""The per-modality step schedule (batch.step_schedule: per_modality), the reference X-FM loop:
each training step is an iteration of one optimizer step per modality (text, image, pair), each
on its own global batch, with the lr schedule counting iterations. Its optimizer steps and lrs
equal the reference loop's; TP=2 x DP=2 trains as one TP=1 rank; the mixed schedule is unchanged
(tests/engine/test_engine_parity.py); a kill inside an iteration resumes exactly
(tests/faults/test_faults.py)."""
from __future__ import annotations

import pytest

from engine_fixtures import run_config_dict, step_losses, train_rank
from harness import run_ranks

pytestmark = pytest.mark.dist
ITERATIONS, WARMUP = 5, 3


def per_modality(raw: dict, text_global: int) -> dict:
    raw["batch"].update(step_schedule="per_modality", text_global_batch_size=text_global)
    return raw


def recording_train_rank(raw: dict) -> list[dict]:
    """One rank of a real run, recording each optimizer step: the modalities its micro-batches hold,
    its global batch (this rank's samples x DP) and the lr of every param group it runs at."""
    import os

    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    engine, steps, step = trainer.engine, [], trainer.engine.step

    def recorded(micro_batches, *args, **kwargs):
        steps.append({"modalities": sorted({b.modality for b in micro_batches}),
                      "global_batch": sum(b.size for b in micro_batches) * trainer.layout.data_parallel_size,
                      "lrs": list(engine.scheduler.get_last_lr()),
                      "base_lrs": [g["lr_scale"] * raw["optim"]["lr"] for g in engine.optimizer.param_groups]})
        return step(micro_batches, *args, **kwargs)

    engine.step = recorded
    trainer.run()
    return steps


def reference_loop(sources: set[str], text_batch: int, batch: int, warmup: int, iterations: int) -> list[dict]:
    """X-FM's Pretrain.py ``train`` for the same sources, as written there: per iteration k a text
    step (run_text_iter, its own zero_grad and step), then the image-only step (the imagenet
    source), then the image-text pair step; every step of iteration k at base_lr x lambda(k) of
    scheduler.py's linear schedule (k / warmup, then (total - k) / (total - warmup)), the scheduler
    stepped once per iteration."""
    out = []
    for k in range(iterations):
        lam = k / warmup if k < warmup else max(0.0, (iterations - k) / (iterations - warmup))
        for modality, size in (("text", text_batch), ("image", batch), ("pair", batch)):
            if modality in sources:
                out.append({"modalities": [modality], "global_batch": size, "lr_factor": lam})
    return out


def test_optimizer_steps_and_learning_rates_follow_the_reference_loop(demo_world, tmp_path):
    raw = per_modality(run_config_dict(demo_world, tmp_path / "run", steps=ITERATIONS, micro_batch=4,
                                       global_batch=8), text_global=16)
    raw["optim"].update(warmup_steps=WARMUP, schedule="linear", min_lr_ratio=0.0)
    steps = run_ranks(recording_train_rank, 2, raw)[0]
    expected = reference_loop({"text", "image", "pair"}, text_batch=16, batch=8, warmup=WARMUP,
                              iterations=ITERATIONS)
    assert len(steps) == len(expected) == 3 * ITERATIONS
    for got, want in zip(steps, expected):
        assert got["modalities"] == want["modalities"] and got["global_batch"] == want["global_batch"], (got, want)
        assert got["lrs"] == pytest.approx([base * want["lr_factor"] for base in got["base_lrs"]], rel=1e-12, abs=1e-15)
    assert steps[0]["lrs"][0] == 0.0  # iteration 0 runs at lr 0, as the reference's
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, ITERATIONS + 1))  # train.steps counts iterations


def test_per_modality_tp2_dp2_equals_one_tp1_rank_for_20_iterations(demo_world, tmp_path):
    # One rank sees the union of the two DP ranks' micro-batches (micro-batch 8 = 2 x 4) and draws
    # ITM negatives within the same groups of 4; clipping at 0.05 acts on every step.
    single = per_modality(run_config_dict(demo_world, tmp_path / "tp1", steps=20, micro_batch=8, global_batch=8,
                                          model_overrides={"objectives.itm_negative_group": 4}, grad_clip=0.05),
                          text_global=16)
    split = per_modality(run_config_dict(demo_world, tmp_path / "tp2dp2", steps=20, micro_batch=4, global_batch=8,
                                         tp=2, grad_clip=0.05), text_global=16)
    run_ranks(train_rank, 1, single)
    run_ranks(train_rank, 4, split)
    expected, actual = step_losses(tmp_path / "tp1"), step_losses(tmp_path / "tp2dp2")
    assert sorted(expected) == sorted(actual) == list(range(1, 21))
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in expected)
    assert worst < 1e-4, f"worst relative loss difference {worst:.2e}"


def test_a_cursor_of_one_schedule_is_refused_by_the_other(demo_world, tmp_path):
    from xfm_scale.data import BlendLoader, LoaderConfig, build_blend
    from xfm_scale.data.shards import DataSpecError

    blend = build_blend(demo_world.spec, num_samples=2000, seed=0, cache_dir=tmp_path / "cache")
    sizes = {"text": 4, "image": 4, "pair": 4}
    mixed = BlendLoader(blend, LoaderConfig(tokenizer_dir=str(demo_world.tokenizer_dir), micro_batch_sizes=sizes))
    grouped = BlendLoader(blend, LoaderConfig(tokenizer_dir=str(demo_world.tokenizer_dir), micro_batch_sizes=sizes,
                                              micro_steps_per_group={"text": 2, "image": 1, "pair": 1}))
    with pytest.raises(DataSpecError, match="saved with batch.step_schedule=mixed, this run has per_modality"):
        grouped.load_state_dict(mixed.state_dict())
    iteration = next(grouped.iter_iterations())
    assert [[b.modality for b in group] for group in iteration] == [["text", "text"], ["image"], ["pair"]]
    assert grouped.state_dict()["micro_step"] == 1  # the cursor counts whole iterations
