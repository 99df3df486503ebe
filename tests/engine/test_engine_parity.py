"""ZeRO-3 engine parity on real ranks: TP=2 x DP=2 equals one TP=1 rank with the same global batch
and data at every step; stopping and resuming equals an uninterrupted run; offloading the optimizer
alone equals offloading the parameters too."""
import json
from pathlib import Path

import pytest

from engine_fixtures import run_config_dict, step_losses, train_rank
from harness import run_ranks

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS, STOP = 14, 7  # the resume runs: stopped after step STOP and relaunched
PARITY_STEPS = 20


def test_tp2_dp2_zero3_equals_single_rank_tp1_for_20_steps(demo_world, tmp_path):
    # One rank must see the union of the two DP ranks' micro-batches (micro-batch 8 = 2 x 4), and
    # draw ITM negatives within the same groups of 4 the DP=2 ranks use.
    # grad_clip 0.05 makes clipping act on every step, so the TP-correct norm is exercised too.
    single = run_config_dict(demo_world, tmp_path / "tp1", steps=PARITY_STEPS, micro_batch=8, global_batch=16,
                             model_overrides={"objectives.itm_negative_group": 4}, grad_clip=0.05)
    split = run_config_dict(demo_world, tmp_path / "tp2dp2", steps=PARITY_STEPS, micro_batch=4, global_batch=16,
                            tp=2, grad_clip=0.05)
    (ref,) = run_ranks(train_rank, 1, single)
    ranks = run_ranks(train_rank, 4, split)
    assert [(r["layout"].tensor_parallel_size, r["layout"].data_parallel_size) for r in ranks] == [(2, 2)] * 4
    expected, actual = step_losses(tmp_path / "tp1"), step_losses(tmp_path / "tp2dp2")
    assert sorted(expected) == sorted(actual) == list(range(1, PARITY_STEPS + 1))
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in expected)
    assert worst < 1e-4, f"worst relative loss difference {worst:.2e}"
    assert_trains(tmp_path / "tp1")


def test_optimizer_offload_with_parameters_on_the_device_trains_like_full_offload(demo_world, tmp_path):
    """ds_configs/zero3_offload_optimizer.json (the parameters stay on the device: 2 bytes per
    parameter less host memory, none fetched over PCIe) trains exactly as zero3_offload.json
    (parameters offloaded too) at TP=2 x DP=2, fp32: the same DeepSpeedCPUAdam steps the same
    master weights; only where the parameter partitions wait between uses differs."""
    losses, offloaded = {}, {}
    for name in ("zero3_offload.json", "zero3_offload_optimizer.json"):
        raw = run_config_dict(demo_world, tmp_path / name, steps=4, micro_batch=4, global_batch=16, tp=2)
        raw["deepspeed"] = {"config": str(REPO / "ds_configs" / name), "overrides": {"bf16.enabled": False}}
        offloaded[name] = {tuple(r["offloaded"].values()) for r in run_ranks(train_rank, 4, raw)}
        losses[name] = step_losses(tmp_path / name)
    # (optimizer, parameters) offloaded, on every rank
    assert offloaded == {"zero3_offload.json": {(True, True)}, "zero3_offload_optimizer.json": {(True, False)}}
    assert sorted(losses["zero3_offload.json"]) == [1, 2, 3, 4]
    assert losses["zero3_offload_optimizer.json"] == losses["zero3_offload.json"]


def assert_trains(output_dir):
    """The token objectives fall over the run (the total mixes modalities). ITC is not among them:
    a from-scratch ITC head first sits on its uniform plateau for a hundred-odd pair steps
    (launchers/configs/demo_tiny.yaml), so over 20 steps it falls or not with the data's order
    (it rose in the last three steps once the blend was computed per position)."""
    import json

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/mlm", "loss/imlm"):
        values = [r[key] for r in records if key in r]
        assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, (key, values)


@pytest.fixture(scope="module")
def resumed_and_full(demo_world, tmp_path_factory):
    """A 14-step run, and the same run stopped after step 7 and relaunched; both with text and
    pairs in length groups (data.length_group_size: 16 samples, two global micro-batches of 4 x DP 2,
    in windows of 64), so the relaunch resumes inside a window of the reordered streams."""
    root = tmp_path_factory.mktemp("resume")
    grouping = {"length_group_size": 16, "length_group_window": 4}
    full = run_config_dict(demo_world, root / "full", steps=STEPS, micro_batch=4, global_batch=16)
    full["data"].update(grouping)
    assert {r["length_group_size"] for r in run_ranks(train_rank, 2, full)} == {16}
    resumed = run_config_dict(demo_world, root / "resumed", steps=STEPS, micro_batch=4, global_batch=16)
    resumed["data"].update(grouping)
    resumed["train"]["stop_at_step"] = STOP  # the first invocation stops after step 7 ...
    run_ranks(train_rank, 2, resumed)
    stopped = step_losses(root / "resumed")
    assert max(stopped) == STOP and not (root / "resumed" / "final_metrics.json").exists()
    resumed["train"]["stop_at_step"] = None  # ... the same command relaunched continues it
    run_ranks(train_rank, 2, resumed)
    return root


def test_resume_restores_model_data_cursor_and_step_exactly(resumed_and_full):
    """The first loss after the resume (step 8: weights after step 7's update, the cursor's next
    batch) equals the uninterrupted run's, and the run completes with its checkpoints."""
    from xfm_scale.checkpoint import writer as checkpoint

    expected, resumed = step_losses(resumed_and_full / "full"), step_losses(resumed_and_full / "resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STOP + 2):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    assert checkpoint.complete_steps(resumed_and_full / "resumed" / "checkpoints") == [STOP, STEPS]
    records = [json.loads(line) for line in (resumed_and_full / "full" / "metrics.jsonl").read_text().splitlines()]
    padding = {k: r[k] for r in records for k in r if k.startswith("text_padding/")}  # logged per kind
    assert sorted(padding) == ["text_padding/pair", "text_padding/text"] and all(0 <= v < 1 for v in padding.values())


def test_every_step_after_resume_equals_uninterrupted(resumed_and_full):
    """Steps 9..14 after the resume equal the uninterrupted run's. The blend has steps that leave
    the vision and fusion encoders untouched, so this fails if ZeRO-3 steps them with the previous
    step's gradient (see grads.clear_stale_gradients)."""
    expected, resumed = step_losses(resumed_and_full / "full"), step_losses(resumed_and_full / "resumed")
    for step in range(STOP + 2, STEPS + 1):
        assert abs(resumed[step] - expected[step]) <= 1e-6 * abs(expected[step]), (step, resumed[step], expected[step])


def counting_train_rank(raw: dict) -> dict:
    """One rank of a real run that also counts the blocks it checkpointed, the blocks compiled, the
    graphs dynamo built and the blocks ZeRO-3 gathers whole (z3 leaf modules)."""
    import os

    from deepspeed.utils import z3_leaf_module
    from torch._dynamo.utils import counters

    from xfm_scale.config import run as run_config
    from xfm_scale.model import hooks
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    installed, calls = hooks.HOOKS.checkpoint, [0]

    def counting(fn, *args):
        calls[0] += 1
        return installed(fn, *args)

    hooks.HOOKS.checkpoint = counting
    trainer.run()
    blocks = trainer.engine.module.encoder_blocks()
    return {"checkpointed_block_calls": calls[0], "blocks": len(blocks),
            "compiled_blocks": sum(b._compiled_call_impl is not None for b in blocks),
            "whole_gathered_blocks": sum(z3_leaf_module(b) for b in blocks),
            "graphs": counters["stats"]["unique_graphs"]}


# name: (activation checkpointing of each encoder's first N blocks (None: all, 0: none), ZeRO stage,
# compiled blocks, text detach for fusion). The tiny preset's encoders have 2 blocks each, 6 in all.
ENGINE_VARIANTS = {"plain": (0, 3, False, True), "checkpointed": (None, 3, False, True),
                   "first_block_checkpointed": (1, 3, False, True), "checkpointed_compiled_zero2": (None, 2, True, True),
                   "no_detach": (0, 3, False, False), "no_detach_checkpointed": (None, 3, False, False)}
# blocks ZeRO-3 gathers whole: those that keep their activations, less the text encoder's without
# the detach (its blocks then run twice per pair micro-batch)
WHOLE_GATHERED = {"plain": 6, "checkpointed": 0, "first_block_checkpointed": 3, "checkpointed_compiled_zero2": 0,
                  "no_detach": 4, "no_detach_checkpointed": 0}


def test_checkpointed_and_compiled_blocks_in_the_engine_equal_plain(demo_world, tmp_path):
    """Every encoder block checkpointed, with dropout, attention dropout and drop-path on, at DP=2
    (ZeRO-3 partitions and reduce-scatters over two ranks): the same losses at every step as
    without checkpointing (the recompute replays the dropout masks), through ZeRO-3's gradient
    reduction. Without checkpointing ZeRO-3 gathers each block whole (z3 leaf modules), with it
    per layer, and with each encoder's first block checkpointed both at once: the same losses
    (engine_build.gather_blocks_whole); with the text detach off (text blocks per layer, as they run
    twice) the same against its checkpointed run. And the same again with the blocks
    compiled (model.compile_blocks) in a ZeRO-2 engine: the aot_eager backend runs dynamo's tracing
    and AOTAutograd's compiled backward (what inductor builds on) in seconds and draws random
    numbers as eager does; ZeRO-2's gradient hooks must see what that backward produces, and
    DeepSpeed's checkpoint must recompute compiled blocks with the same masks."""
    dropout = {f"{enc}.{key}": 0.1 for enc in ("text", "fusion") for key in ("hidden_dropout", "attention_dropout")}
    runs, ranks = {}, {}
    for name, (checkpointed, stage, compiled, detach) in ENGINE_VARIANTS.items():
        selective = {f"{e}.checkpointed_layers": checkpointed for e in ("text", "vision", "fusion")} if checkpointed else {}
        raw = run_config_dict(demo_world, tmp_path / name, steps=3, micro_batch=4, global_batch=16,
                              model_overrides={**dropout, "vision.drop_path_rate": 0.1, **selective,
                                               "objectives.detach_text_for_fusion": detach})
        raw["model"].update(activation_checkpointing=checkpointed != 0, compile_blocks=compiled,
                            compile_backend="aot_eager")
        raw["deepspeed"] = {"overrides": {"zero_optimization.stage": stage}}
        ranks[name] = run_ranks(counting_train_rank, 2, raw)
        runs[name] = step_losses(tmp_path / name)
    for name, (checkpointed, stage, compiled, _) in ENGINE_VARIANTS.items():
        checkpointing = checkpointed != 0
        for r in ranks[name]:
            assert (r["checkpointed_block_calls"] >= 3 * 2 * 2) == checkpointing, (name, r)  # steps x micro x blocks
            assert r["compiled_blocks"] == (r["blocks"] if compiled else 0) and (r["graphs"] > 0) == compiled, (name, r)
            assert r["whole_gathered_blocks"] == WHOLE_GATHERED[name], (name, r)
        # the logged MFU counts model FLOPs, HFU also the recompute
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        utilisation = [(r["mfu"], r["hfu"]) for r in records if "mfu" in r]
        assert utilisation and all(0 < mfu <= hfu for mfu, hfu in utilisation)
        # the recompute: one more forward of every block (~1/3 more), of half of them, or none
        low, high = {None: (1.2, 2.0), 1: (1.05, 1.2), 0: (1.0, 1.05)}[checkpointed]
        assert all(low * mfu <= hfu <= high * mfu for mfu, hfu in utilisation), (name, utilisation)
    plain = runs["plain"]
    assert sorted(plain) == [1, 2, 3]
    pairs = [(name, "plain") for name in ("checkpointed", "first_block_checkpointed", "checkpointed_compiled_zero2")]
    for name, reference in pairs + [("no_detach_checkpointed", "no_detach")]:
        expected = runs[reference]
        assert sorted(runs[name]) == sorted(expected) == [1, 2, 3]
        worst = max(abs(runs[name][s] - expected[s]) / abs(expected[s]) for s in expected)
        assert worst < 1e-5, f"{name} vs {reference}: worst relative loss difference {worst:.2e}: {runs}"
