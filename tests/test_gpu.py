"""GPU paths, run where a GPU is lent (skipped without CUDA): ``DS_ACCELERATOR=cuda make test ARGS="-m gpu"``.

* every attention call of every micro-batch kind runs on a fused SDPA kernel (flash or
  memory-efficient) in bf16, forward and backward: the math fallback is switched off;
* encoder blocks compiled by inductor (model.compile_blocks) give eager's losses and gradients in
  bf16, and activation checkpointing replays their in-kernel dropout masks exactly;
* a bf16 training step on NCCL, with ZeRO-3, with ZeRO-2 and with ZeRO-2 and compiled blocks, from
  pinned, non-blocking loader batches (through benchmarks/train_step.py, which also times it
  against the baseline);
* a ZeRO-3 step with the optimizer state (and, the A/B, the parameters) offloaded to pinned CPU
  memory (benchmarks/memory.py): DeepSpeed's host layout per parameter in bf16, and no freed
  pinned blocks left cached after the engine is built;
* the bf16 configs end to end through the launcher: a run saves (bf16 configs name their optimizer
  files ``bf16_zero_pp_rank_*``), stops, resumes from its checkpoint, and the export reads it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "model"))
from model_fixtures import batches, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.gpu
GPU_ENV = {**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, "DS_ACCELERATOR": "cuda",
           "PYTHONWARNINGS": "ignore"}


def run_on_gpu(args: list[str], timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=GPU_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_attention_runs_on_a_fused_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from xfm_scale import build_model

    cfg = tiny_config(dropout=True)
    cfg.params_dtype = "bfloat16"
    model = build_model(cfg).cuda()
    for batch in batches(cfg, B=8):
        # without MATH, SDPA raises when no fused kernel takes a call (mask, dtype or shape)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = model(batch.to("cuda", dtype=torch.bfloat16))
            out.total.backward()
        assert torch.isfinite(out.total.float()), batch.modality


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    # past its recompile limit dynamo would quietly run a block eagerly (which draws dropout masks
    # otherwise than inductor's kernels): make that an error, as tests/model/test_compile.py does
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def test_inductor_compiled_blocks_match_eager_in_bf16(fresh_dynamo):
    """Inductor's generated kernels (model.compile_blocks) against the eager blocks, bf16, dropout
    off: every objective's loss, and the gradients, agree to bf16 precision."""
    from xfm_scale import build_model
    from xfm_scale import distributed

    cfg = tiny_config()
    cfg.params_dtype = "bfloat16"
    eager = build_model(cfg).cuda()
    compiled = build_model(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    for index, batch in enumerate(batches(cfg, B=8)):
        batch = batch.to("cuda", dtype=torch.bfloat16)
        outputs = []
        for model in (eager, compiled):
            distributed.seed_everything(index)  # the same ITM hard negatives (drawn from the generator)
            outputs.append(model(batch))
        expected, got = outputs
        for name, loss in expected.losses.items():
            assert abs(got.losses[name].float() - loss.float()) <= 3e-2 * abs(loss.float()) + 1e-3, name
        expected.total.backward()
        got.total.backward()
    expected_grads, grads = _grads(eager), _grads(compiled)
    # over all gradients at once: per tensor, bf16 rounding dominates the near-zero ones
    names = sorted(expected_grads)
    worst = relative_error(torch.cat([grads[n].flatten() for n in names]),
                      torch.cat([expected_grads[n].flatten() for n in names]))
    assert worst < 5e-2, f"compiled bf16 gradients differ from eager by {worst:.2e}"


def test_inductor_compiled_blocks_replay_dropout_when_checkpointed(fresh_dynamo):
    """Inductor draws dropout and drop-path masks with its own in-kernel RNG, seeded from the CUDA
    generator: activation checkpointing's recompute must draw the same masks (fp32, exact)."""
    from xfm_scale import build_model
    from xfm_scale import distributed

    cfg = tiny_config(dropout=True)
    model = build_model(cfg).cuda()
    model.compile_blocks()

    def run(checkpointing: bool, seed: int) -> dict[str, torch.Tensor]:
        cfg.set_activation_checkpointing(checkpointing)
        distributed.seed_everything(seed)  # also the TP-stream tracker attention dropout draws from
        model.zero_grad(set_to_none=True)
        sum(model(b.to("cuda")).total for b in batches(cfg, B=8)).backward()
        return _grads(model)

    plain, checkpointed, other_seed = run(False, 7), run(True, 7), run(False, 8)
    assert max(relative_error(checkpointed[n], plain[n]) for n in plain) < 1e-5
    assert max(relative_error(other_seed[n], plain[n]) for n in plain) > 1e-3  # dropout is really on


@pytest.mark.parametrize("stage,compile_blocks", [(3, False), (2, False), (2, True)])
def test_bf16_step_on_nccl_against_the_baseline(tmp_path, stage, compile_blocks):
    out = tmp_path / "train_step.json"
    run_on_gpu(["benchmarks/train_step.py", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--micro-batch", "8",
                "--micro-steps", "2", "--workers", "2", "--zero-stage", str(stage), "--json", str(out),
                "--work-dir", str(tmp_path), *(["--compile-blocks"] if compile_blocks else [])])
    result = json.loads(out.read_text())
    assert result["zero_stage"] == stage and result["compile_blocks"] == compile_blocks
    assert result["precision"] == "bf16" and "spec sheet" in result["peak_source"], result["peak_source"]
    assert all(0 < r["mfu"] < 1 and r["process_max_allocated_gb"] > 0 for r in result["rows"])


def test_zero3_step_with_cpu_offload(tmp_path):
    """A ZeRO-3 step offloaded to pinned host memory. With the parameters offloaded too, the model
    is built with pageable parameter partitions, so the pinned peak of the build is lower than with
    torch's defaults (``--torch-pinned-rounding``: each partition pinned, then freed into torch's
    cache, where it stays); after the build torch's pinned allocator holds no freed blocks. What
    the offload holds in host memory per parameter is DeepSpeed's bf16 layout: 18 B with the
    parameters on the GPU (ds_configs/zero3_offload_optimizer.json, the default), 20 B with them
    offloaded."""
    probes = {}
    for name, extra in (("optimizer", []), ("exact", ["--offload-params"]),
                        ("torch", ["--offload-params", "--torch-pinned-rounding"])):
        out = tmp_path / f"largest_{name}.json"
        run_on_gpu(["benchmarks/memory.py", "--largest", "--family", "tiny", "--min-scale", "1", "--max-scale", "1",
                    "--offload", "cpu", "--json", str(out), *extra])
        (probes[name],) = json.loads(out.read_text())["probes"].values()
        probe = probes[name]
        assert probe["ok"] and probe["device"] == "gpu" and probe["optimizer"] == "DeepSpeedCPUAdam", probe
        per_parameter = {kind: n / probe["parameters"] for kind, n in probe["offloaded_state_bytes"].items()}
        assert per_parameter == {"master weights": 4, "Adam moments": 8, "fp32 gradients": 4,
                                 "gradient partitions": 2, "parameters": 0 if name == "optimizer" else 2}, (name, probe)
    cached = {name: p["pinned_after_build_held_gb"] - p["pinned_after_build_in_use_gb"] for name, p in probes.items()}
    assert cached["exact"] <= 1e-3 * probes["exact"]["pinned_after_build_held_gb"], (cached, probes)
    assert cached["optimizer"] <= 1e-3 * probes["optimizer"]["pinned_after_build_held_gb"], (cached, probes)
    assert cached["torch"] > cached["exact"], (cached, probes)
    peak = {name: p["pinned_after_build_held_peak_gb"] for name, p in probes.items()}
    assert peak["exact"] < peak["torch"], (peak, probes)
    assert probes["optimizer"]["pinned_in_use_gb"] < probes["exact"]["pinned_in_use_gb"], probes


def launch_on_gpu(config: Path, env: dict[str, str]) -> str:
    """One rank through the launcher, as a user runs it (torchrun, one GPU); its output."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(ROOT / "launchers/pretrain_large.py"), "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def save_resume_export(demo_world, tmp_path: Path, stage: int, deepspeed: dict, env: dict[str, str]) -> list[str]:
    """Run 2 of 4 steps and stop, relaunch to the end (a resume), export the last checkpoint;
    returns the files of the step-2 checkpoint. (Written so that a CPU dry run can pass the fp32
    config and a CPU environment.)"""
    from engine_fixtures import run_config_dict, step_losses
    from xfm_scale.interop.export import export_checkpoint
    from xfm_scale.checkpoint.reader import ZeroCheckpoint, resolve_checkpoint

    raw = run_config_dict(demo_world, tmp_path / "run", steps=4, micro_batch=4, global_batch=8, save_every=2)
    raw["deepspeed"] = deepspeed
    raw["train"]["stop_at_step"] = 2
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    launch_on_gpu(config, env)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step00000002").iterdir())
    raw["train"]["stop_at_step"] = None
    config.write_text(yaml.safe_dump(raw))
    assert "resumed from step00000002" in launch_on_gpu(config, env)
    assert sorted(step_losses(tmp_path / "run")) == [1, 2, 3, 4]
    ck = ZeroCheckpoint(resolve_checkpoint(tmp_path / "run" / "checkpoints"))
    assert (ck.stage, ck.step) == (stage, 4)
    export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "export", progress=False)
    assert (tmp_path / "export" / "xfm" / "model.safetensors").exists()
    return saved


@pytest.mark.parametrize("stage", [3, 2])
def test_bf16_run_saves_resumes_and_exports(demo_world, tmp_path, stage):
    saved = save_resume_export(demo_world, tmp_path, stage, {"config": str(ROOT / f"ds_configs/zero{stage}_bf16.json")},
                               GPU_ENV)
    assert any(name.startswith("bf16_zero_pp_rank_0_") for name in saved), saved
