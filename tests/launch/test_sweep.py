"""The sweep runner, for real: runs are launched through a stand-in ``deepspeed`` (it reads its own
flags and starts one process with WORLD_SIZE / MASTER_PORT, as the runner gives ranks) that runs
tests/launch/fake_pretrain.py, which writes metrics computed from its --set values."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import tool_env
from xfm_scale.launch.hostfile import parse_hostfile
from xfm_scale.launch.sweep import (SweepBusy, command_for, expand, format_value, launch_problem, load_sweep, run_name,
                             run_sweep)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_pretrain.py"

from xfm_scale.cli import sweep as _cli  # launchers/sweep.py runs its main

FAKE_DEEPSPEED = f'''#!{sys.executable}
"""deepspeed stand-in: its own flags up to the script, then one process with the env ranks get."""
import os, sys
args = sys.argv[1:]
script = next(i for i, a in enumerate(args) if a.endswith(".py"))
flags = dict(zip(args[:script:2], args[1:script:2]))
env = dict(os.environ, WORLD_SIZE=flags["--num_gpus"], MASTER_PORT=flags["--master_port"])
os.execve(sys.executable, [sys.executable, *args[script:]], env)
'''


@pytest.fixture()
def world(tmp_path):
    """A base run config, a stand-in deepspeed on disk, a counter file and the env runs get."""
    (tmp_path / "bin").mkdir()
    deepspeed = tmp_path / "bin" / "deepspeed"
    deepspeed.write_text(FAKE_DEEPSPEED)
    deepspeed.chmod(0o755)
    (tmp_path / "run.yaml").write_text("batch: {micro_batch_size: 2, global_batch_size: 8}\n"
                                       "parallel: {tensor_parallel_size: 1}\noptim: {lr: 1.0e-4}\n")
    (tmp_path / "fail.txt").write_text("")
    counter = tmp_path / "counter.txt"
    return {"tmp": tmp_path, "counter": counter, "env": tool_env(FAKE_COUNTER=str(counter)),
            "command": f"{deepspeed} --num_gpus {{num_gpus}} --master_port {{master_port}} {FAKE}"}


def _sweep_file(world, grid: str, fixed: str = "", names: str = "", command: str | None = None,
                name: str = "sweep.yaml") -> Path:
    tmp = world["tmp"]
    text = (f"base_config: {tmp / 'run.yaml'}\noutput_root: {tmp / 'out'}\n"
            f"command: {command or world['command']}\ngrid:\n{grid}")
    text += f"fixed:\n{fixed}" if fixed else ""
    text += f"names:\n{names}" if names else ""
    path = tmp / name
    path.write_text(text)
    return path


def _counted(world) -> list[str]:
    return world["counter"].read_text().split() if world["counter"].exists() else []


def _main(world, *args) -> int:
    return _cli.main([str(a) for a in args], env=world["env"])


# ---- grid, names, command ------------------------------------------------------------------------
def test_grid_expands_to_named_runs_and_commands(world):
    path = _sweep_file(world, grid="  optim.lr: [1e-4, 2e-4]\n  parallel.tensor_parallel_size: [1, 2]\n",
                       fixed="  num_gpus: 2\n  train.steps: 5\n", names="  parallel.tensor_parallel_size: tp\n")
    spec = load_sweep(path)
    runs = expand(spec)
    assert [r.name for r in runs] == ["lr=0.0001,tp=1", "lr=0.0001,tp=2", "lr=0.0002,tp=1", "lr=0.0002,tp=2"]
    # Unquoted 1e-4 is a float here (PyYAML alone reads it as the string "1e-4").
    assert [type(r.values["optim.lr"]) for r in runs] == [float] * 4
    run = runs[1]
    assert run.output_dir == world["tmp"] / "out" / "lr=0.0001,tp=2"
    assert run.launch_vars == {"num_gpus": 2}
    assert command_for(spec, run, master_port=1234) == [
        str(world["tmp"] / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", "1234", str(FAKE),
        "--config", str(world["tmp"] / "run.yaml"), "--output-dir", str(run.output_dir),
        "--set", "train.steps=5", "--set", "optim.lr=0.0001", "--set", "parallel.tensor_parallel_size=2"]


def test_run_names_default_short_names_and_sanitising():
    assert run_name({"optim.lr": 2e-4, "parallel.tensor_parallel_size": 2}) == "lr=0.0002,tensor_parallel_size=2"
    assert run_name({"optim.lr": 2e-4, "parallel.tensor_parallel_size": 2},
                    {"parallel.tensor_parallel_size": "tp"}) == "lr=0.0002,tp=2"
    # Keys sharing their last part keep enough of their prefix to stay apart.
    assert run_name({"text.dropout": 0.1, "vision.dropout": 0.0}) == "text.dropout=0.1,vision.dropout=0.0"
    assert run_name({"deepspeed.config": "ds_configs/zero3_bf16.json", "model.activation_checkpointing": True,
                     "data.eval_manifest": None}) == (
        "config=ds_configs_zero3_bf16.json,activation_checkpointing=true,eval_manifest=null")
    assert run_name({"optim.betas": [0.9, 0.98]}) == "betas=_0.9_0.98_"
    long_a = run_name({"data.spec": "x" * 300 + "a"})
    long_b = run_name({"data.spec": "x" * 300 + "b"})
    assert len(long_a) == 200 and long_a != long_b and long_a == run_name({"data.spec": "x" * 300 + "a"})


@pytest.mark.parametrize("value", [2e-4, 1e-05, 1e20, 3, 0, True, None, "yes", "2e-4", "ds_configs/zero3_bf16.json",
                                   [0.9, 0.98], {"text.num_layers": 4}, "a b"])
def test_set_values_read_back_by_the_entry_points_yaml_parser(value):
    parsed = yaml.safe_load(format_value(value))
    assert parsed == value and type(parsed) is type(value), format_value(value)


# ---- running, resuming, retrying, results --------------------------------------------------------
def test_sweep_runs_resumes_records_failures_and_retries(world, capsys):
    tmp = world["tmp"]
    path = _sweep_file(world, grid="  optim.lr: [1e-4, 3e-4]\n  parallel.tensor_parallel_size: [1, 2]\n"
                                   "  num_gpus: [2, 4]\n",
                       fixed=f"  train.steps: 5\n  fake.fail_file: {tmp / 'fail.txt'}\n",
                       names="  parallel.tensor_parallel_size: tp\n  num_gpus: gpus\n")
    names = [f"lr={lr},tp={tp},gpus={g}" for lr in ("0.0001", "0.0003") for tp in (1, 2) for g in (2, 4)]
    failing = [n for n in names if n.startswith("lr=0.0003")]
    (tmp / "fail.txt").write_text("0.0003\n")

    # 1. every run starts once; the lr=3e-4 ones fail and are recorded.
    assert _main(world, path) == 1
    assert sorted(_counted(world)) == sorted(names)
    out = capsys.readouterr().out
    assert "8 runs: 0 finished, 8 to run" in out and out.count("FAILED (exit 3)") == 4
    state = json.loads((tmp / "out" / "sweep_state.json").read_text())["runs"]
    assert {n for n, s in state.items() if s["status"] == "failed"} == set(failing)
    assert all(state[n]["returncode"] == 3 and state[n]["attempts"] == 1 for n in failing)
    run_args = json.loads((tmp / "out" / "lr=0.0001,tp=2,gpus=4" / "args.json").read_text())
    assert run_args["world_size"] == "4" and run_args["master_port"].isdigit()
    assert run_args["sets"] == {"train.steps": 5, "fake.fail_file": str(tmp / "fail.txt"), "optim.lr": 0.0001,
                                "parallel.tensor_parallel_size": 2}  # num_gpus went to the launcher
    _assert_results(tmp / "out", [n for n in names if n not in failing])

    # 2. again: finished runs skipped, failed runs not retried without --retry-failed.
    assert _main(world, path) == 1
    assert len(_counted(world)) == 8
    out = capsys.readouterr().out
    assert "8 runs: 4 finished, 0 to run, 4 failed before" in out
    assert f"skip {failing[0]}: failed before (exit 3, log {tmp / 'out' / failing[0] / 'run.log'}); pass " \
           f"--retry-failed to run it again" in out

    # 3. --retry-failed runs exactly the failed ones.
    (tmp / "fail.txt").write_text("")
    assert _main(world, path, "--retry-failed") == 0
    assert sorted(_counted(world)[8:]) == sorted(failing)
    state = json.loads((tmp / "out" / "sweep_state.json").read_text())["runs"]
    assert all(state[n]["status"] == "finished" and state[n]["attempts"] == 2 for n in failing)
    log = (tmp / "out" / failing[0] / "run.log").read_text()
    assert "sweep attempt 1" in log and "failing on purpose" in log and "sweep attempt 2" in log
    _assert_results(tmp / "out", names)

    # 4. a finished sweep runs nothing; 5. nor after its fixed values change, but it says so.
    assert _main(world, path) == 0
    path.write_text(path.read_text().replace("train.steps: 5", "train.steps: 6"))
    assert _main(world, path) == 0
    assert len(_counted(world)) == 12
    out = capsys.readouterr().out
    assert out.count("8 runs: 8 finished, 0 to run") == 2
    assert f"warning: {names[0]} finished with a different base config, command or fixed values" in out


def _expected_metrics(name: str) -> dict[str, float]:
    values = dict(part.split("=") for part in name.split(","))
    lr, tp, gpus = float(values["lr"]), int(values["tp"]), int(values["gpus"])
    metrics = {"loss/total": lr * 1e4 + tp, "samples_per_s": 100.0 * gpus}
    if tp == 2:
        metrics["eval/i2t_r1"] = 0.25 * tp
    return metrics


def _assert_results(root: Path, finished: list[str]) -> None:
    with open(root / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["run", "optim.lr", "parallel.tensor_parallel_size", "num_gpus",
                                 "eval/i2t_r1", "loss/total", "samples_per_s"]
    assert [r["run"] for r in rows] == sorted(finished)
    for row in rows:
        lr, tp, gpus = (part.split("=")[1] for part in row["run"].split(","))
        assert (row["optim.lr"], row["parallel.tensor_parallel_size"], row["num_gpus"]) == (lr, tp, gpus)
        expected = _expected_metrics(row["run"])
        assert {k: float(row[k]) for k in expected} == expected  # exact: written with repr
        assert row["eval/i2t_r1"] == ("" if tp == "1" else "0.5")
    md = (root / "results.md").read_text().splitlines()
    assert md[2] == ("| run | optim.lr | parallel.tensor_parallel_size | num_gpus | eval/i2t_r1 | loss/total "
                     "| samples_per_s |")
    assert [line.split(" | ")[0].lstrip("| ") for line in md[4:]] == sorted(finished)
    if "lr=0.0001,tp=1,gpus=2" in finished:
        assert "| lr=0.0001,tp=1,gpus=2 | 0.0001 | 1 | 2 |  | 2 | 200 |" in md


def test_runs_that_cannot_launch_are_skipped_with_the_reason(world, capsys):
    (world["tmp"] / "run.yaml").write_text("batch: {micro_batch_size: 2, global_batch_size: 12}\n")
    path = _sweep_file(world, grid="  parallel.tensor_parallel_size: [1, 3]\n  num_gpus: [2, 3, 4]\n",
                       fixed="  optim.lr: 1.0e-4\n", names="  parallel.tensor_parallel_size: tp\n")
    assert _main(world, path) == 0
    assert sorted(_counted(world)) == ["tp=1,num_gpus=2", "tp=1,num_gpus=3", "tp=3,num_gpus=3"]
    out = capsys.readouterr().out
    assert ("skip tp=1,num_gpus=4: cannot launch: global_batch_size=12 is not divisible by micro_batch_size (2) "
            "x data-parallel size (4) = 8; choose a multiple of 8") in out
    assert "skip tp=3,num_gpus=2: cannot launch: tensor_parallel_size=3 does not divide the 2 ranks" in out
    assert "6 runs: 0 finished, 3 to run, 0 failed before, 3 cannot launch" in out


def test_dry_run_launches_and_writes_nothing(world, capsys):
    path = _sweep_file(world, grid="  optim.lr: [1e-4, 2e-4]\n", fixed="  num_gpus: 1\n")
    assert _main(world, path, "--dry-run") == 0
    assert not (world["tmp"] / "out").exists() and not _counted(world)
    out = capsys.readouterr().out
    assert out.count("would run lr=") == 2 and "--set optim.lr=0.0002" in out


def test_parallel_runs_get_distinct_ports(world):
    path = _sweep_file(world, grid="  optim.lr: [1e-4, 2e-4, 3e-4, 4e-4]\n", fixed="  num_gpus: 1\n")
    assert _main(world, path, "--max-parallel", 3) == 0
    ports = {json.loads(p.read_text())["master_port"] for p in (world["tmp"] / "out").glob("*/args.json")}
    assert len(ports) == 4


def test_exit_zero_without_final_metrics_is_a_failure(world, capsys):
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed="  num_gpus: 1\n  fake.skip_final: true\n")
    assert _main(world, path) == 1
    assert "lr=0.0001: FAILED (exited 0 without writing final_metrics.json)" in capsys.readouterr().out
    state = json.loads((world["tmp"] / "out" / "sweep_state.json").read_text())["runs"]
    assert state["lr=0.0001"]["status"] == "failed"


def test_launcher_not_found_is_a_failed_run(world, capsys):
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", command=f"{world['tmp']}/no_such_launcher {FAKE}")
    assert _main(world, path) == 1
    assert "lr=0.0001: FAILED (exit 127)" in capsys.readouterr().out
    assert "cannot start" in (world["tmp"] / "out" / "lr=0.0001" / "run.log").read_text()


def test_second_sweep_on_the_same_output_root_is_refused(world):
    spec = load_sweep(_sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed="  num_gpus: 1\n"))
    spec.output_root.mkdir()
    with open(spec.output_root / ".sweep.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SweepBusy, match="another sweep is running on"):
            run_sweep(spec, env=world["env"], log=lambda line: None)
    assert not _counted(world)


# ---- invalid input: exit 2, message naming the key ------------------------------------------------
@pytest.mark.parametrize("edit, fragments", [
    (lambda t: t + "grids: {}\n", ["unknown key 'grids'", "did you mean 'grid'?"]),
    (lambda t: t.replace("optim.lr: [1e-4]", "optim.lr: []"), ["grid.optim.lr is an empty list"]),
    (lambda t: t.replace("optim.lr: [1e-4]", "optim.lr: 1e-4"), ["grid.optim.lr must be a list of values",
                                                                "put a single value under fixed:"]),
    (lambda t: t.replace("run.yaml", "missing.yaml"), ["base_config", "missing.yaml does not exist",
                                                       "fix the path"]),
    (lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("output_root")) + "\n",
     ["missing required key 'output_root'"]),
    (lambda t: t.replace("  num_gpus: 1\n", ""), ["command uses {num_gpus} but the sweep gives it no value",
                                                  "set it under fixed:"]),
    (lambda t: t + "  steps: 5\n", ["fixed.steps: not a dotted run-config key"]),
    (lambda t: t + "  optim.lr: 1.0e-3\n", ["'optim.lr' is under both grid and fixed"]),
    (lambda t: t.replace("optim.lr: [1e-4]", "data.spec: [a/b, a_b]"), ["get the same name 'spec=a_b'"]),
    (lambda t: t.replace("{num_gpus}", "{num_gpu}"), ["command uses {num_gpu} but the sweep gives it no value"]),
])
def test_invalid_sweep_file_exits_2_naming_the_key(world, capsys, edit, fragments):
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed="  num_gpus: 1\n")
    path.write_text(edit(path.read_text()))
    assert _main(world, path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") or err.startswith("error: sweep file"), err
    for fragment in fragments:
        assert fragment in err, err
    assert not _counted(world)


def test_no_launchable_run_exits_2(world, tmp_path, capsys):
    missing = tmp_path / "hosts"
    path = _sweep_file(world, grid="  optim.lr: [1e-4, 2e-4]\n",
                       command=f"deepspeed --hostfile {missing} launchers/pretrain_large.py")
    assert _main(world, path, "--dry-run") == 2
    captured = capsys.readouterr()
    assert f"hostfile {missing} does not exist; fix the path" in captured.out
    assert "no run of" in captured.err
    path = _sweep_file(world, grid="  parallel.tensor_parallel_size: [3]\n",
                       command="torchrun --nproc_per_node 2 launchers/pretrain_large.py")
    assert _main(world, path) == 2
    assert "tensor_parallel_size=3 does not divide the 2 ranks" in capsys.readouterr().out


def test_cli_subprocess_exit_code_and_message(world):
    path = _sweep_file(world, grid="  optim.lr: []\n", fixed="  num_gpus: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "sweep.py"), str(path)], capture_output=True,
                          text=True, env=world["env"], cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {path}: grid.optim.lr is an empty list" in proc.stderr


# ---- shipped files --------------------------------------------------------------------------------
def test_example_sweep_is_valid(monkeypatch, demo_world):
    import dataclasses

    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where users run it
    spec = load_sweep("launchers/sweeps/example.yaml")
    runs = expand(spec)
    assert [r.name for r in runs] == ["lr=0.0005,tp=1", "lr=0.0005,tp=2", "lr=0.001,tp=1", "lr=0.001,tp=2"]
    # the demo data its comment says to build first: here, the session's demo world
    built = {"data.spec": str(demo_world.spec), "data.tokenizer_dir": str(demo_world.tokenizer_dir),
             "data.eval_manifest": str(demo_world.eval_manifest)}
    assert set(built) <= set(runs[0].overrides)
    for run in runs:
        assert launch_problem(spec, dataclasses.replace(run, overrides={**run.overrides, **built})) is None


def test_slurm_template_launches_one_torchrun_per_node(tmp_path):
    """Run the sbatch script with stand-in scontrol/srun/python: it writes a hostfile our parser reads,
    checks the run with it, then starts torchrun with the allocation's sizes and the user's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"scontrol": 'printf "node-a\\nnode-b\\n"',
                       "srun": f'echo "$@" > {tmp_path}/srun.txt',
                       "python": f'echo "$@" > {tmp_path}/check.txt'}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(tool_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
               SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node-[a-b]", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="48",
               TMPDIR=str(tmp_path), XFM_VENV=str(tmp_path / "venv"), PYTHON=str(bin_dir / "python"))
    args = ["--config", "launchers/configs/base.yaml", "--set", "optim.lr=2.0e-4"]
    proc = subprocess.run(["bash", str(REPO / "launchers" / "slurm_pretrain.sbatch"), *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "xfm-hostfile-1234"
    assert [(h.name, h.slots) for h in parse_hostfile(hostfile)] == [("node-a", 4), ("node-b", 4)]
    assert (tmp_path / "check.txt").read_text().split() == [
        "launchers/pretrain_large.py", "--check", "--hostfile", str(hostfile), *args]
    assert (tmp_path / "srun.txt").read_text().split() == [
        # the job's cores per task reach the step (srun does not inherit them since Slurm 22.05)
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=48", str(tmp_path / "venv" / "bin" / "torchrun"),
        "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "1234", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node-a:21234", "launchers/pretrain_large.py", *args]


def test_grid_points_the_entry_point_would_refuse_are_not_launched(world, demo_world, capsys):
    """With the real entry point in the command, each run's config (the base config plus its --set
    values) is validated as its --check would, before anything is launched."""
    from engine_fixtures import run_config_dict

    raw = run_config_dict(demo_world, world["tmp"] / "unused", steps=2, micro_batch=2, global_batch=8)
    (world["tmp"] / "run.yaml").write_text(yaml.safe_dump(raw))
    command = world["command"].replace(str(FAKE), str(REPO / "launchers" / "pretrain_large.py"))
    ranges = _sweep_file(world, grid="  train.log_every: [0]\n", fixed="  num_gpus: 2\n", command=command)
    typo = _sweep_file(world, grid="  optim.lr: [1.0e-4]\n", fixed="  num_gpus: 2\n  optim.learning_rate: 1.0e-3\n",
                       command=command, name="typo.yaml")
    for path, message in ((ranges, "train.log_every=0 must be >= 1"), (typo, "unknown key(s) optim.learning_rate")):
        assert _main(world, path) == 2  # no run of the sweep can launch
        captured = capsys.readouterr()
        assert "cannot launch: " in captured.out and message in captured.out, captured.out
        assert "1 runs: 0 finished, 0 to run, 0 failed before, 1 cannot launch" in captured.out
        assert "no run of" in captured.err
    assert not list((world["tmp"] / "out").rglob("run.log"))  # nothing was started


def test_a_started_run_is_not_resumed_under_changed_settings(world, capsys):
    """A run that failed after writing checkpoints, retried once the sweep file changed, would
    continue those checkpoints under the new settings: refused, with the way out."""
    tmp = world["tmp"]
    fixed = f"  num_gpus: 1\n  fake.fail_file: {tmp / 'fail.txt'}\n"
    (tmp / "fail.txt").write_text("0.0001\n")
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed=fixed + "  train.steps: 5\n")
    assert _main(world, path) == 1  # failed...
    (tmp / "out" / "lr=0.0001" / "checkpoints" / "step00000002").mkdir(parents=True)  # ...after a save
    (tmp / "fail.txt").write_text("")
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed=fixed + "  train.steps: 50\n")
    assert _main(world, path, "--retry-failed") == 2  # its only run cannot launch
    out = capsys.readouterr().out
    assert "skip lr=0.0001: cannot launch: its checkpoints in " in out and "delete " in out
    assert len(_counted(world)) == 1
    # unchanged settings: the retry resumes as usual
    path = _sweep_file(world, grid="  optim.lr: [1e-4]\n", fixed=fixed + "  train.steps: 5\n")
    assert _main(world, path, "--retry-failed") == 0
    assert len(_counted(world)) == 2
