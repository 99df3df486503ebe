"""bf16, the precision the GPU configs train in, on CPU ranks (gloo): ds_configs/zero3_bf16.json
and zero2_bf16.json as shipped, at TP=2 x DP=2. A run computes with bf16 weights and fp32 master
weights, saves (DeepSpeed names a bf16 run's optimizer files ``bf16_zero_pp_rank_*``), stops and
resumes exactly as an uninterrupted run, and its export (the merged fp32 master weights), loaded
into a bf16 engine at the same layout, computes what the live model computed, bit for bit: the
live bf16 weights are the master weights rounded. (tests/test_gpu.py runs the same configs on a
GPU through the launcher; the fp32 paths are tested in tests/engine and tests/export.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_fixtures import run_config_dict, step_losses
from export_fixtures import MODEL_OVERRIDES, build_then_probe, train_then_probe
from harness import run_ranks

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
STEPS, STOP = 4, 2
TP, DP = 2, 2


def bf16_run(demo_world, output_dir: Path, stage: int) -> dict:
    raw = run_config_dict(demo_world, output_dir, steps=STEPS, micro_batch=4, global_batch=8, tp=TP,
                          save_every=STOP, model_overrides=MODEL_OVERRIDES)
    raw["deepspeed"] = {"config": str(ROOT / "ds_configs" / f"zero{stage}_bf16.json")}
    raw["data"]["eval_manifest"] = str(demo_world.eval_manifest)  # the probe's fixed batch
    raw["train"].update(eval_every=0, keep_last=5)
    return raw


@pytest.fixture(scope="module", params=[3, 2], ids=["zero3", "zero2"])
def runs(request, demo_world, tmp_path_factory):
    """An uninterrupted bf16 run of STEPS, probed live at the end and exported; the same run stopped
    after STOP and relaunched; and a bf16 engine at the same layout built from the export."""
    from xfm_scale.interop.export import export_checkpoint

    stage = request.param
    root = tmp_path_factory.mktemp(f"bf16_zero{stage}")
    full = bf16_run(demo_world, root / "full", stage)
    live = run_ranks(train_then_probe, TP * DP, full)[0]
    resumed = bf16_run(demo_world, root / "resumed", stage)
    resumed["train"]["stop_at_step"] = STOP
    run_ranks(train_then_probe, TP * DP, resumed)
    resumed["train"]["stop_at_step"] = None
    relaunched = run_ranks(train_then_probe, TP * DP, resumed)[0]
    export_checkpoint(root / "full" / "checkpoints", root / "export", progress=False)
    from_export = bf16_run(demo_world, root / "from_export", stage)
    from_export["model"]["init_from"] = str(root / "export" / "xfm")
    loaded = run_ranks(build_then_probe, TP * DP, from_export)[0]
    return {"stage": stage, "root": root, "live": live, "relaunched": relaunched, "loaded": loaded}


def test_a_bf16_run_computes_in_bf16_and_saves_bf16_optimizer_files(runs):
    assert runs["live"]["text"].dtype == runs["live"]["image"].dtype == torch.bfloat16
    folder = runs["root"] / "full" / "checkpoints" / f"step{STEPS:08d}"
    optimizer_files = sorted(p.name for p in folder.glob("*optim_states.pt"))
    assert optimizer_files == [f"bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
                               for d in range(DP) for t in range(TP)], optimizer_files


def test_a_stopped_and_relaunched_bf16_run_equals_the_uninterrupted_one(runs):
    full, resumed = step_losses(runs["root"] / "full"), step_losses(runs["root"] / "resumed")
    assert sorted(full) == sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == full, (resumed, full)
    assert runs["relaunched"]["resumed_at"] == STOP and runs["relaunched"]["step"] == STEPS
    assert runs["relaunched"]["losses"] == runs["live"]["losses"]
    assert torch.equal(runs["relaunched"]["text"], runs["live"]["text"])


def test_the_export_of_a_bf16_run_computes_what_the_live_model_computed(runs):
    """Fixed-batch losses, text and image encoder outputs of the bf16 engine built from the export
    equal the live run's bit for bit, and the export holds fp32 master weights."""
    from safetensors import safe_open

    loaded, live = runs["loaded"], runs["live"]
    assert loaded["resumed_at"] == 0 and loaded["layout"] == live["layout"] == (TP, DP)
    assert loaded["losses"] == live["losses"], (loaded["losses"], live["losses"])
    for key in ("text", "mlm_logits", "image"):
        assert torch.equal(loaded[key], live[key]), key
    with safe_open(str(runs["root"] / "export" / "xfm" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}


def test_the_bf16_checkpoint_reader_sees_the_master_weights_of_the_last_step(runs):
    from xfm_scale.checkpoint.reader import ZeroCheckpoint, resolve_checkpoint

    ck = ZeroCheckpoint(resolve_checkpoint(runs["root"] / "full" / "checkpoints"))
    assert (ck.stage, ck.step, ck.tp, ck.dp) == (runs["stage"], STEPS, TP, DP)
    assert ck.optimizer_step_count() == STEPS
    name = ck.param_names[0]
    assert ck.full(name, "fp32").dtype == torch.float32
    relaunched = ZeroCheckpoint(resolve_checkpoint(runs["root"] / "resumed" / "checkpoints"))
    for name in ck.param_names:
        assert torch.equal(relaunched.full(name, "fp32"), ck.full(name, "fp32")), name
