"""ZeRO-Infinity (ds_configs/zero3_nvme_template.json) on real ranks: with the optimizer state and
parameters offloaded to NVMe (a folder here), a run trains exactly as with CPU offload, stops and
resumes exactly, and its checkpoints (whose swapped state DeepSpeed keeps in its own swap files)
read, export and reshard like any other. Needs DeepSpeed's async_io op, built on libaio
(``apt-get install libaio-dev``): skipped without it."""
import os
import shutil
from pathlib import Path

import pytest

from engine_fixtures import NEEDS_ASYNC_IO, async_io_builds, run_config_dict, step_losses, train_rank
from harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
STEPS, STOP = 6, 3
TP, DP = 2, 2  # the swap folders are named by global rank, which differs from both (d, t) here
# DeepSpeed keeps a sub-group in host memory, NVMe offload or not, when its partition is smaller
# than the aio block (1 MiB); every sub-group of `tiny` is. A vision MLP of 16384 makes the
# encoders' weight sub-group 4.5M parameters, 1.1M per rank at TP=2 x DP=2: that one is swapped.
WIDE_VISION_MLP = {"vision.ffn_hidden_size": 16384}


pytestmark = [pytest.mark.dist, pytest.mark.skipif(not async_io_builds(), reason=NEEDS_ASYNC_IO)]


def offload_run(world, output_dir: Path, swap_dir: Path | None, tp: int = TP) -> dict:
    """An fp32 run with CPU offload of parameters and optimizer (swap_dir None) or with both
    offloaded to NVMe in swap_dir, saving every STOP steps."""
    raw = run_config_dict(world, output_dir, steps=STEPS, micro_batch=4, global_batch=16, save_every=STOP, tp=tp,
                          model_overrides=WIDE_VISION_MLP)
    overrides = {"bf16.enabled": False}
    if swap_dir is not None:
        overrides |= {f"zero_optimization.{part}.nvme_path": str(swap_dir)
                      for part in ("offload_param", "offload_optimizer")}
    template = "zero3_nvme_template.json" if swap_dir is not None else "zero3_offload.json"
    raw["deepspeed"] = {"config": str(REPO / "ds_configs" / template), "overrides": overrides}
    return raw


def stop_and_relaunch(raw: dict) -> None:
    """Train to STOP, then relaunch the run to STEPS."""
    raw["train"]["stop_at_step"] = STOP
    run_ranks(train_rank, TP * DP, raw)
    raw["train"]["stop_at_step"] = None
    run_ranks(train_rank, TP * DP, raw)


@pytest.fixture(scope="module")
def runs(demo_world, tmp_path_factory):
    """A CPU-offload run and an NVMe run, each stopped after STOP and relaunched. (Both relaunched:
    DeepSpeedCPUAdam keeps beta^t by repeated multiplication while it runs and takes pow(beta, t)
    after a relaunch, so a relaunched offload run differs from an uninterrupted one by rounding,
    which Adam scales up to 1.6e-7 in the attention key biases, whose gradient is only noise.)"""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("AsyncIOBuilder").load()  # a first build (minutes) here, not in a rank
    root = tmp_path_factory.mktemp("nvme")
    stop_and_relaunch(offload_run(demo_world, root / "cpu", None))
    stop_and_relaunch(offload_run(demo_world, root / "nvme", root / "swap"))
    return root


def checkpoint_of(run: Path, step: int) -> Path:
    from xfm_scale.checkpoint.writer import tag_for

    return run / "checkpoints" / tag_for(step)


def assert_first_sub_group_swapped(folder: Path, tp: int, dp: int) -> None:
    """Each rank's first sub-group (the encoders' weights) has its fp32 weights and both Adam
    moments in swap files only: its partition in the optimizer file is empty."""
    from xfm_scale.checkpoint.reader import load_trusted

    for rank in range(tp * dp):
        swapped = sorted(p.name.split("-")[0] for p in (folder / "offloaded_tensors" / f"rank{rank:02d}").iterdir())
        assert len(swapped) == 3 and swapped.count("exp_avg") == 1 and swapped.count("exp_avg_sq") == 1, swapped
    for d in range(dp):
        for t in range(tp):
            optim = load_trusted(folder / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")["optimizer_state_dict"]
            assert optim["fp32_flat_groups"][0].numel() == 0, (d, t)


def test_nvme_offload_swaps_and_trains_as_cpu_offload_through_a_stop_and_resume(runs):
    """Every step's loss equals the CPU-offload run's exactly: the three before the stop, and the three
    after the relaunch, which start from the optimizer state DeepSpeed swapped back in from the
    checkpoint's swap files (a lost Adam moment would change step 4 on)."""
    for step in (STOP, STEPS):
        assert_first_sub_group_swapped(checkpoint_of(runs / "nvme", step), TP, DP)
    expected, actual = step_losses(runs / "cpu"), step_losses(runs / "nvme")
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    assert actual == expected  # bit for bit, as the checkpoints are


def test_nvme_checkpoint_reads_and_exports_as_the_cpu_offload_one(runs, demo_world, tmp_path):
    """Weights and both Adam moments, merged from the swap files and the partition files, equal
    those of the CPU-offload run's checkpoint bit for bit, before and after the relaunch; the
    export writes them."""
    import torch
    from safetensors.torch import load_file

    from xfm_scale.interop.export import export_checkpoint
    from xfm_scale.checkpoint.reader import ZeroCheckpoint

    for step in (STOP, STEPS):
        nvme, cpu = ZeroCheckpoint(checkpoint_of(runs / "nvme", step)), ZeroCheckpoint(checkpoint_of(runs / "cpu", step))
        assert nvme.nvme_offloaded and not cpu.nvme_offloaded
        assert nvme.param_names == cpu.param_names
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            for (name, a), (_, b) in zip(nvme.tensors(key), cpu.tensors(key)):
                assert torch.equal(a, b), (step, key, name, float((a - b).abs().max()))
    fc1 = nvme.full("vision.blocks.0.mlp.fc1.weight")  # the swapped sub-group's, not zeros
    assert fc1.shape[0] == WIDE_VISION_MLP["vision.ffn_hidden_size"] and fc1.abs().sum() > 0
    export_checkpoint(nvme.folder, tmp_path / "out", tokenizer_dir=demo_world.tokenizer_dir, progress=False)
    exported = load_file(str(tmp_path / "out" / "xfm" / "model.safetensors"))
    assert torch.equal(exported["vision.blocks.0.mlp.fc1.weight"], fc1)


def resave_rank(raw: dict, resave_dir: str) -> dict:
    """Build the run (resuming its latest checkpoint at this layout) and save the loaded state to
    ``resave_dir`` before any step."""
    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    checkpoint.save(trainer.engine, resave_dir, trainer.step, trainer.client_state(), keep_last=1)
    return {"resumed_at": trainer.step, "layout": (trainer.layout.tensor_parallel_size,
                                                   trainer.layout.data_parallel_size)}


@pytest.mark.parametrize("source,target,tp,ranks", [
    ("nvme", None, 1, 1), ("cpu", "swap", 1, 1), ("nvme", None, TP, TP * DP), ("cpu", "swap", TP, TP * DP)],
    ids=["from_nvme_on_one_rank", "into_nvme_on_one_rank", "nvme_switched_off", "nvme_switched_on"])
def test_resume_from_and_into_nvme_at_another_layout_or_the_same(runs, demo_world, tmp_path, source, target, tp,
                                                                  ranks):
    """The TP=2 x DP=2 checkpoints resumed with NVMe offload switched off (the NVMe run's: the
    swapped sub-group's weights and moments read from its swap files) or on (the CPU-offload
    run's: written into swapped state, which the re-save keeps in swap files), on one rank and at
    the saved layout (where DeepSpeed's own load would fail on the other swap setting): the state
    saved right after the load equals the source checkpoint tensor for tensor, with its step
    count, lr and data cursor."""
    import torch

    from xfm_scale.checkpoint.reader import STATE_KEYS, ZeroCheckpoint

    shutil.copytree(runs / source, tmp_path / "run")
    (tmp_path / "run" / "final_metrics.json").unlink(missing_ok=True)
    raw = offload_run(demo_world, tmp_path / "run", target and tmp_path / target, tp=tp)
    got = run_ranks(resave_rank, ranks, raw, str(tmp_path / "resaved"))
    assert got[0] == {"resumed_at": STEPS, "layout": (tp, ranks // tp)}
    saved = ZeroCheckpoint(checkpoint_of(runs / source, STEPS))
    resaved = ZeroCheckpoint(tmp_path / "resaved" / checkpoint_of(tmp_path, STEPS).name)
    assert (resaved.tp, resaved.dp, resaved.nvme_offloaded) == (tp, ranks // tp, target is not None)
    if target is not None:  # the loaded state went into the swap files, not into host memory
        assert_first_sub_group_swapped(resaved.folder, tp, ranks // tp)
    assert resaved.param_names == saved.param_names
    for name in saved.param_names:
        for key in STATE_KEYS:
            assert torch.equal(resaved.full(name, key), saved.full(name, key)), (name, key)
    assert resaved.optimizer_step_count() == saved.optimizer_step_count() == STEPS
    assert [g["lr"] for g in resaved.param_groups()] == [g["lr"] for g in saved.param_groups()]
    assert resaved.meta["data_cursor"] == saved.meta["data_cursor"]


def damaged_swap_file_rank(raw: dict, folder: str) -> list[list[str]]:
    """Save a fresh NVMe run, then cut the swap file DeepSpeed copied into the checkpoint short,
    then remove it: what the check that runs before a save is published says each time."""
    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    tag_folder = checkpoint.save(trainer.engine, folder, 0, trainer.client_state(), keep_last=1)
    (swap_file,) = (tag_folder / "offloaded_tensors" / "rank00").iterdir()  # before a step: the weights only
    said = []
    for damage in (lambda: None, lambda: os.truncate(swap_file, 100), swap_file.unlink):
        damage()
        errors: list[Exception] = []
        written = checkpoint._swap_files_written(trainer.engine, tag_folder, errors)
        assert swap_file in written
        said.append([str(e) for e in errors])
    return said


def test_a_save_whose_swap_files_are_missing_or_short_is_not_published(demo_world, tmp_path):
    """DeepSpeed copies the swap files with a plain copytree after the partition files: before
    COMPLETE.json, each rank checks its copies are all there at full size (the only copy of the
    swapped weights and moments), else the save fails as a failed write does."""
    raw = offload_run(demo_world, tmp_path / "run", tmp_path / "swap", tp=1)
    (said,) = run_ranks(damaged_swap_file_rank, 1, raw, str(tmp_path / "saved"))
    intact, short, missing = said
    assert intact == []
    assert len(short) == 1 and "is missing or shorter than" in short[0] and "after the save" in short[0], short
    assert missing == short
