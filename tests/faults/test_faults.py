"""Faults and bad input, as a cluster meets them: 2 CPU ranks under torchrun, the real entry point
(through tests/faults/fault_entry.py, which injects NaNs, a kill inside a save or a full disk).

Every run's checkpoints are checked after the fault (each complete one must still load) and every
resumed run's data cursor is compared with the uninterrupted run's (no sample lost or repeated);
the ledger's closing line sums it up."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import run_config_dict, step_losses
from harness import free_port, tool_env

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("fault_entry.py")
STEPS = 6


def write_run(tmp: Path, data, name: str, **train) -> Path:
    raw = run_config_dict(data, tmp / name, steps=STEPS, micro_batch=4, global_batch=8, save_every=2)
    raw["train"].update(keep_last=10, collective_timeout_s=60, **train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(config: Path, **fault_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ENTRY), "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=tool_env(**fault_env))


def stopped_itself(code: int, out: str) -> bool:
    """The entry point exited 3 (a diagnosis after a checkpoint); torchrun itself reports 1."""
    return code != 0 and "exitcode  : 3" in out


def run(config: Path, ledger: dict, timeout: float = 300, **fault_env: str) -> tuple[int, str]:
    ledger["runs"] += 1
    proc = launch(config, **fault_env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def final_state(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(data cursor, fp32 weights) of a run's last complete checkpoint."""
    from xfm_scale.checkpoint.reader import ZeroCheckpoint, resolve_checkpoint

    ck = ZeroCheckpoint(resolve_checkpoint(run_dir / "checkpoints"))
    return ck.meta["data_cursor"], dict(ck.tensors())


def count_lost_checkpoints(run_dir: Path, ledger: dict) -> list[int]:
    """Every complete checkpoint must still read (all partitions); returns their steps."""
    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale.checkpoint.reader import ZeroCheckpoint

    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    for step in steps:
        try:
            ck = ZeroCheckpoint(run_dir / "checkpoints" / checkpoint.tag_for(step))
            next(iter(ck.tensors()))
        except Exception:  # noqa: BLE001 - any failure to read is a lost checkpoint
            ledger["checkpoints lost"] += 1
    return steps


def samples_lost(cursor: dict, reference: dict) -> int:
    return sum(abs(cursor[k] - reference[k]) for k in reference if k.startswith("offset_"))


@pytest.fixture(scope="module")
def reference_run(demo_world, tmp_path_factory, ledger) -> Path:
    """The uninterrupted run every faulted run must end equal to."""
    tmp = tmp_path_factory.mktemp("reference")
    code, out = run(write_run(tmp, demo_world, "run"), ledger)
    assert code == 0, out[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def reference(reference_run):
    return final_state(reference_run)


def assert_equals_reference(run_dir: Path, reference, ledger: dict) -> None:
    cursor, weights = final_state(run_dir)
    ref_cursor, ref_weights = reference
    ledger["samples lost"] += samples_lost(cursor, ref_cursor)
    assert cursor == ref_cursor
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        assert torch.equal(weights[name], tensor), name


def worker_pids(launcher_pid: int) -> list[int]:
    """The training processes torchrun started (its children running the entry script)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(p) for p in children if "fault_entry.py" in Path(f"/proc/{p}/cmdline").read_text()]


def test_a_rank_killed_mid_run_stops_the_others_and_a_relaunch_ends_as_the_uninterrupted_run(
        demo_world, tmp_path, reference, ledger):
    config = write_run(tmp_path, demo_world, "run")
    proc = launch(config)
    ledger["runs"] += 1
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and max(step_losses(tmp_path / "run"), default=0) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.2)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    killed_at = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed_at < 90  # the others stopped, no hang
    assert count_lost_checkpoints(tmp_path / "run", ledger)  # at least the step-2 checkpoint survived
    code, out = run(config, ledger)  # the same command again
    assert code == 0, out[-3000:]
    assert "resumed from step0000000" in out
    ledger["kills survived"] += 1
    assert_equals_reference(tmp_path / "run", reference, ledger)


def test_a_kill_while_writing_a_checkpoint_never_publishes_it(demo_world, tmp_path, reference, ledger):
    config = write_run(tmp_path, demo_world, "run")
    code, out = run(config, ledger, XFM_FAULT_KILL_IN_SAVE="4")
    assert code != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step00000004").is_dir() and not (ckpts / "step00000004" / "COMPLETE.json").exists()
    assert count_lost_checkpoints(tmp_path / "run", ledger) == [2]
    # a file of another ZeRO stage's save left in the unfinished folder must not mix into the next
    # save of step 4 (two model-states files for TP rank 0 would make it unreadable)
    (ckpts / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"stale")
    code, out = run(config, ledger)
    assert code == 0, out[-3000:]
    assert "resumed from step00000002" in out
    ledger["kills survived"] += 1
    assert count_lost_checkpoints(tmp_path / "run", ledger) == [2, 4, 6]
    assert_equals_reference(tmp_path / "run", reference, ledger)


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        demo_world, tmp_path, reference, ledger):
    config = write_run(tmp_path, demo_world, "run")
    code, out = run(config, ledger, XFM_FAULT_DISK_FULL_AT="4")
    assert stopped_itself(code, out), out[-3000:]
    assert "saving checkpoint step00000004" in out and "the previous checkpoint step00000002 is intact" in out
    assert not (tmp_path / "run" / "checkpoints" / "step00000004").exists()
    assert count_lost_checkpoints(tmp_path / "run", ledger) == [2]
    code, out = run(config, ledger)  # space freed: the same command resumes
    assert code == 0, out[-3000:]
    assert_equals_reference(tmp_path / "run", reference, ledger)


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_with_a_diagnosis(demo_world, tmp_path, ledger):
    config = write_run(tmp_path, demo_world, "run", max_skipped_in_a_row=2)
    code, out = run(config, ledger, XFM_FAULT_NAN_STEPS="1,3,4")
    assert stopped_itself(code, out), out[-3000:]
    assert "2 optimizer steps in a row were skipped for non-finite values (last, step 4: non-finite" in out
    assert "micro-batch #0" in out and "checkpoint saved" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}
    assert skipped == {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}
    # the skipped steps left weights (and Adam state) untouched: checkpoint 4 equals checkpoint 2
    from xfm_scale.checkpoint.reader import ZeroCheckpoint

    at2, at4 = (ZeroCheckpoint(tmp_path / "run" / "checkpoints" / f"step{s:08d}") for s in (2, 4))
    for name in at2.param_names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(at2.full(name, key), at4.full(name, key)), (name, key)
    assert count_lost_checkpoints(tmp_path / "run", ledger) == [2, 4]


@pytest.fixture(scope="module")
def damaged_world(demo_world, tmp_path_factory):
    """The demo world plus a pair corpus with a corrupt image, an empty and an over-long caption in
    its first shard, spread over three shards."""
    import random

    from xfm_scale.data.demo import caption, draw, png_bytes, random_scene
    from xfm_scale.data.shards import write_corpus

    root = tmp_path_factory.mktemp("damaged")
    rng = random.Random(1)
    records = [{"png": png_bytes(draw(scene, 32, rng)), "txt": caption(scene, rng)}
               for scene in (random_scene(rng) for _ in range(57))]
    records[1]["png"] = b"\x89PNG\r\n\x1a\n this is not an image"
    records[4]["txt"] = "   "
    records[7]["txt"] = "a caption " * 400
    write_corpus(records, out_dir=root / "bad_pairs", name="bad_pairs", modality="pair", maxcount=20)
    spec = yaml.safe_load(Path(demo_world.spec).read_text())
    for corpus in spec["corpora"]:
        corpus["manifest"] = str(Path(demo_world.spec).parent / corpus["manifest"])
    spec["corpora"].append({"name": "bad_pairs", "modality": "pair", "weight": 0.5,
                            "manifest": str(root / "bad_pairs" / "bad_pairs.manifest.json")})
    (root / "blend.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_bad_samples_and_damaged_shards_are_skipped_and_counted_per_corpus_and_reason(
        damaged_world, demo_world, tmp_path):
    """The loader skips each bad sample (corrupt image, empty or over-long caption, a shard cut short
    or deleted after the blend was built) and counts it, and still yields full micro-batches."""
    from xfm_scale.data import BlendLoader, LoaderConfig, build_blend

    blend = build_blend(damaged_world / "blend.yaml", num_samples=400, seed=0, cache_dir=tmp_path)
    shards = sorted((damaged_world / "bad_pairs").glob("*.tar"))
    cut, gone = tmp_path / "cut.tar", tmp_path / "gone.tar"
    shutil.copy(shards[1], cut), shutil.copy(shards[2], gone)
    try:
        with open(shards[1], "r+b") as f:
            f.truncate(shards[1].stat().st_size // 3)
        shards[2].unlink()
        cfg = LoaderConfig(tokenizer_dir=str(demo_world.tokenizer_dir), micro_batch_sizes={"pair": 8, "image": 8, "text": 8},
                           micro_steps_per_step=1, image_size=32, mim_grid=4, mim_num_masked=6, mim_min_block=2)
        loader = BlendLoader(blend, cfg)
        batches = [b for _, b in zip(range(40), loader)]
        assert all(b.size == 8 for b in batches)
        reasons = {key.split("/", 1)[1] for key in loader.bad_samples.as_dict() if key.startswith("bad_pairs/")}
        assert {"bad_image", "empty_caption", "overlong_caption", "truncated_shard", "missing_shard"} <= reasons
    finally:
        shutil.copy(cut, shards[1]), shutil.copy(gone, shards[2])


def test_a_bad_sample_rate_over_the_limit_stops_the_run_with_the_counts(damaged_world, demo_world, tmp_path, ledger):
    config = write_run(tmp_path, demo_world, "run")
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(spec=str(damaged_world / "blend.yaml"), max_bad_sample_rate=0.001, bad_sample_grace=8)
    config.write_text(yaml.safe_dump(raw))
    code, out = run(config, ledger)
    assert stopped_itself(code, out), out[-3000:]
    assert "samples read were bad" in out and "> data.max_bad_sample_rate=0.001" in out and "bad_pairs/" in out
    assert count_lost_checkpoints(tmp_path / "run", ledger)  # it saved before stopping


@pytest.mark.parametrize("tool,args,message", [
    ("launchers/pretrain_large.py", ["--check", "--config", "{config}", "--hostfile", "{hostfile}"], "slots"),
    ("launchers/pretrain_large.py", ["--config", "{bad_config}"], "unknown"),
    ("tools/blend_data.py", ["{bad_spec}", "--num-samples", "10", "--out", "{tmp}/blend"], "is not valid YAML"),
    ("tools/export_weights.py", ["--checkpoint", "{tmp}", "--out", "{tmp}/x"], "holds no complete checkpoint"),
    ("tools/export_weights.py", ["--checkpoint", "{tmp}/nowhere", "--out", "{tmp}/x"], "does not exist"),
])
def test_bad_input_to_the_tools_fails_before_any_rank_naming_the_fix(demo_world, tmp_path, ledger, tool, args, message):
    config = write_run(tmp_path, demo_world, "run")
    (tmp_path / "hostfile").write_text("node-a slots=2\nnode-b\n")
    raw = yaml.safe_load(config.read_text())
    raw["train"]["stepz"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "spec.yaml").write_text("corpora: [\n")
    fill = {"config": config, "hostfile": tmp_path / "hostfile", "bad_config": tmp_path / "bad.yaml",
            "bad_spec": tmp_path / "spec.yaml", "tmp": tmp_path}
    ledger["bad inputs tried"] += 1
    result = subprocess.run([sys.executable, str(ROOT / tool), *(a.format(**fill) for a in args)],
                            capture_output=True, text=True, env=tool_env(), timeout=300, cwd=ROOT)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _Payload:
    """Unpickling this would run code (it creates the marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_files_are_never_unpickled(demo_world, tmp_path, reference_run, ledger):
    """A checkpoint file carrying a pickled object is refused when resuming and exporting; the
    object's code never runs."""
    run_dir = tmp_path / "run"
    config = write_run(tmp_path, demo_world, "run", steps=2 * STEPS)
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints")
    marker = tmp_path / "pwned"
    target = run_dir / "checkpoints" / f"step{STEPS:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)
    state["payload"] = _Payload(str(marker))
    with open(target, "wb") as f:
        torch.save(state, f, pickle_module=pickle)
    code, out = run(config, ledger)
    assert code != 0 and not marker.exists()
    assert "Weights only load failed" in out or "Unsupported global" in out
    ledger["bad inputs tried"] += 1
    result = subprocess.run([sys.executable, str(ROOT / "tools/export_weights.py"), "--checkpoint",
                             str(run_dir / "checkpoints"), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, env=tool_env(), timeout=300, cwd=ROOT)
    assert result.returncode != 0 and not marker.exists()
    ledger["bad inputs tried"] += 1



def test_a_rank_killed_inside_a_per_modality_iteration_resumes_as_the_uninterrupted_run(demo_world, tmp_path, ledger):
    """The per-modality schedule (batch.step_schedule: per_modality) takes three optimizer steps per
    training step (text, image, pair). A rank killed after the second of them in step 3 (its 8th
    optimizer step) loses that iteration; the relaunch resumes from the step-2 checkpoint and ends
    with the uninterrupted run's weights and data cursor, bit for bit."""
    def per_modality(name: str) -> Path:
        path = write_run(tmp_path, demo_world, name)
        raw = yaml.safe_load(path.read_text())
        raw["batch"].update(step_schedule="per_modality", text_global_batch_size=16)
        path.write_text(yaml.safe_dump(raw))
        return path

    code, out = run(per_modality("full"), ledger)
    assert code == 0, out[-3000:]
    reference = final_state(tmp_path / "full")
    config = per_modality("run")
    code, out = run(config, ledger, XFM_FAULT_KILL_AT_OPTIMIZER_STEP="8")
    assert code != 0 and max(step_losses(tmp_path / "run")) == 2  # killed inside step 3
    assert count_lost_checkpoints(tmp_path / "run", ledger) == [2]
    code, out = run(config, ledger)
    assert code == 0, out[-3000:]
    assert "resumed from step00000002" in out
    ledger["kills survived"] += 1
    assert_equals_reference(tmp_path / "run", reference, ledger)
