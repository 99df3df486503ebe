"""Hostfiles, world size and TP/batch checks: what DeepSpeed's runner would start, and errors that
name the file, line and fix. Parity is checked against the runner's own parsing functions."""
from __future__ import annotations

import pytest
from deepspeed.launcher import runner as ds_runner

from xfm_scale.launch import hostfile as launch
from xfm_scale.launch.hostfile import (Host, LaunchError, LaunchPlan, check_launch, parse_hostfile, resources_from,
                              world_size_from, world_size_of_command)

pytestmark = pytest.mark.unit

GOOD = """\
# cluster A, 3 nodes
worker-0 slots=4

   # indented comment
worker-1 slots=4   # inline comment
worker-2 slots=2 max_slots=2
"""


def _file(tmp_path, text, name="hostfile"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _deepspeed_pool(text):
    return dict(ds_runner._parse_hostfile(text.splitlines(keepends=True)))


def test_good_hostfile_matches_deepspeed(tmp_path):
    hosts = parse_hostfile(_file(tmp_path, GOOD))
    assert hosts == [Host(name="worker-0", slots=4), Host(name="worker-1", slots=4), Host(name="worker-2", slots=2)]
    assert {h.name: h.slots for h in hosts} == _deepspeed_pool(GOOD)


FORMAT_FIX = "expected `HOSTNAME slots=N` (e.g. `worker-0 slots=8`), one host per line"
SPACES_FIX = "write `slots=N` with no spaces, e.g. `worker-0 slots=8`"
COUNT_FIX = "give the number of GPUs on that host, e.g. `slots=8`"


@pytest.mark.parametrize("text, lineno, fragments", [
    ("worker-0 slots=4\nworker-1\n", 2, ["not a host line: 'worker-1'", FORMAT_FIX]),
    ("# c\nworker-0 slot=4\n", 2, ["second field is not slots=N: 'worker-0 slot=4'", FORMAT_FIX]),
    ("worker-0 slots = 4\n", 1, ["malformed slots: 'worker-0 slots = 4'", SPACES_FIX]),
    ("worker-0 slots:4\n", 1, ["malformed slots: 'worker-0 slots:4'", SPACES_FIX]),
    ("slots=4\n", 1, ["not a host line: 'slots=4'", FORMAT_FIX]),
    ("worker-0 slots=-2\n", 1, ["slots=-2 is not a positive integer: 'worker-0 slots=-2'", COUNT_FIX]),
    ("worker-0 slots=four\n", 1, ["slots=four is not a positive integer", COUNT_FIX]),
])
def test_malformed_line_names_line_and_fix(tmp_path, text, lineno, fragments):
    path = _file(tmp_path, text)
    with pytest.raises(LaunchError) as info:
        parse_hostfile(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{lineno}: "), message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(ValueError):  # the runner rejects these too, with less to go on
        _deepspeed_pool(text)


@pytest.mark.parametrize("text, lineno, fragment, deepspeed_reads", [
    ("worker-0 slots=0\n", 1, "slots=0 is not a positive integer", {"worker-0": 0}),
    ("worker-0 slots=4abc\n", 1, "slots=4abc is not a positive integer", {"worker-0": 4}),
    ("worker-0 slots=4 worker-1 slots=4\n", 1, "unexpected 'worker-1' after slots", {"worker-0": 4}),
])
def test_stricter_than_deepspeed_where_it_guesses(tmp_path, text, lineno, fragment, deepspeed_reads):
    """The runner accepts these lines and reads something other than what was meant."""
    assert _deepspeed_pool(text) == deepspeed_reads
    path = _file(tmp_path, text)
    with pytest.raises(LaunchError, match=fragment) as info:
        parse_hostfile(path)
    assert f"{path}:{lineno}:" in str(info.value)


def test_duplicate_host_names_both_lines(tmp_path):
    path = _file(tmp_path, "# nodes\nworker-0 slots=4\nworker-1 slots=4\nworker-0 slots=2\n")
    with pytest.raises(LaunchError) as info:
        parse_hostfile(path)
    message = str(info.value)
    assert f"{path}:4: host 'worker-0' is listed again (first on line 2)" in message
    assert "list each host once" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n   # comments\n"])
def test_empty_hostfile(tmp_path, text):
    path = _file(tmp_path, text)
    with pytest.raises(LaunchError) as info:
        parse_hostfile(path)
    assert f"hostfile {path} lists no hosts" in str(info.value)
    assert "expected `HOSTNAME slots=N`" in str(info.value)


def test_missing_hostfile_is_an_error_not_a_local_run(tmp_path):
    # The runner warns and trains on local GPUs only; a typo here must not shrink the job.
    with pytest.raises(LaunchError, match=r"hostfile .*nope does not exist; fix the path"):
        world_size_from(hostfile=tmp_path / "nope")


# ---- world size ------------------------------------------------------------------------------------
HOSTS = "w0 slots=4\nw1 slots=4\nw2 slots=2\n"


@pytest.mark.parametrize("flags, expected", [
    ({}, {"w0": [0, 1, 2, 3], "w1": [0, 1, 2, 3], "w2": [0, 1]}),
    ({"num_nodes": 2}, {"w0": [0, 1, 2, 3], "w1": [0, 1, 2, 3]}),
    ({"num_gpus": 2}, {"w0": [0, 1], "w1": [0, 1], "w2": [0, 1]}),
    ({"num_nodes": 2, "num_gpus": 1}, {"w0": [0], "w1": [0]}),
    ({"include": "w1"}, {"w1": [0, 1, 2, 3]}),
    ({"include": "w2@w0:3,1"}, {"w0": [1, 3], "w2": [0, 1]}),
    ({"exclude": "w1"}, {"w0": [0, 1, 2, 3], "w2": [0, 1]}),
    ({"exclude": "w0:0@w2:1"}, {"w0": [1, 2, 3], "w1": [0, 1, 2, 3], "w2": [0]}),
])
def test_resources_match_deepspeed_runner(tmp_path, flags, expected):
    path = _file(tmp_path, HOSTS)
    ours = resources_from(hostfile=path, **flags)
    assert dict(ours) == expected
    assert list(ours) == [h for h in ("w0", "w1", "w2") if h in expected]  # rank order = hostfile order
    pool = ds_runner._parse_hostfile(HOSTS.splitlines())
    active = ds_runner.parse_inclusion_exclusion(pool, flags.get("include", ""), flags.get("exclude", ""))
    theirs = ds_runner.apply_num_nodes_and_gpus(active, flags.get("num_nodes", -1), flags.get("num_gpus", -1))
    assert {h: list(s) for h, s in theirs.items()} == expected
    assert world_size_from(hostfile=path, **flags) == sum(len(s) for s in expected.values())


def test_world_size_single_node():
    assert world_size_from(num_gpus=4) == 4
    assert world_size_from(num_gpus=1) == 1


def test_default_hostfile_is_read_like_the_runner(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "DEEPSPEED_DEFAULT_HOSTFILE", str(_file(tmp_path, HOSTS)))
    assert world_size_from() == 10
    assert world_size_from(num_nodes=1) == 4


def test_no_hostfile_counts_local_devices_like_the_runner(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    assert world_size_from() == get_accelerator().device_count()  # GPUs; with DS_ACCELERATOR=cpu, NUMA nodes
    monkeypatch.setattr(launch, "_local_device_count", lambda: 0)
    with pytest.raises(LaunchError, match="no hostfile and no GPU visible on this machine; pass num_gpus"):
        world_size_from()


@pytest.mark.parametrize("flags, fragment", [
    ({"num_nodes": 4}, r"num_nodes=4 but the hostfile lists 3 host\(s\) \(w0, w1, w2\); add hosts or lower num_nodes"),
    ({"num_gpus": 3}, r"num_gpus=3 but host 'w2' has slots=2; lower num_gpus to <= 2"),
    ({"num_gpus": 0}, r"num_gpus=0: must be >= 1"),
    ({"include": "w0", "num_gpus": 2}, r"num_nodes/num_gpus cannot be combined with include/exclude"),
    ({"include": "w0", "exclude": "w1"}, r"include and exclude are mutually exclusive"),
    ({"include": "w9"}, r"include='w9': host 'w9' is not in the hostfile \(w0, w1, w2\); fix the name"),
    ({"include": "w2:5"}, r"include='w2:5': host 'w2' has no slot 5 \(slots 0..1\)"),
    ({"include": "w2:x"}, r"slot 'x' of host 'w2' is not a device index"),
    ({"exclude": "w0@w1@w2"}, r"leaves no ranks to start"),
])
def test_world_size_errors_name_the_fix(tmp_path, flags, fragment):
    with pytest.raises(LaunchError, match=fragment):
        world_size_from(hostfile=_file(tmp_path, HOSTS), **flags)


def test_num_nodes_without_hostfile():
    with pytest.raises(LaunchError, match="num_nodes=2 but no hostfile lists other nodes"):
        world_size_from(num_nodes=2, num_gpus=8)


@pytest.mark.parametrize("command, expected", [
    ("deepspeed --num_gpus 4 launchers/pretrain_large.py --config r.yaml", 4),
    ("deepspeed --hostfile {hosts} --no_ssh --node_rank 0 --master_addr w0 launchers/pretrain_large.py", 10),
    ("deepspeed -H {hosts} --num_nodes=2 --num_gpus 2 launchers/pretrain_large.py --num_gpus 99", 4),
    ("deepspeed --hostfile {hosts} --include w2 launchers/pretrain_large.py", 2),
    ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d launchers/pretrain_large.py", 16),
    ("python -m torch.distributed.run --nproc-per-node=4 launchers/pretrain_large.py", 4),
    ("torchrun --nproc_per_node gpu launchers/pretrain_large.py", None),
    ("torchrun --nnodes 1:4 --nproc_per_node 8 launchers/pretrain_large.py", None),
    ("deepspeed launchers/pretrain_large.py", None),  # the runner counts the GPUs where it runs
    ("sbatch --wait launchers/slurm_pretrain.sbatch", None),
])
def test_world_size_of_command(tmp_path, command, expected):
    hosts = _file(tmp_path, HOSTS)
    assert world_size_of_command(command.format(hosts=hosts).split()) == expected


# ---- TP / batch ------------------------------------------------------------------------------------
def test_check_launch_plan():
    assert check_launch(8, 2, 64, 4) == LaunchPlan(world_size=8, tensor_parallel_size=2, data_parallel_size=4,
                                                   micro_steps=4)
    assert check_launch(1, 1, 3, 3).micro_steps == 1


@pytest.mark.parametrize("args, message", [
    ((8, 3, 96, 4), "tensor_parallel_size=3 does not divide the 8 ranks; choose a divisor of 8 (1, 2, 4, 8) "
                    "or start a multiple of 3 ranks"),
    ((2, 4, 8, 1), "tensor_parallel_size=4 does not divide the 2 ranks; choose a divisor of 2 (1, 2)"),
    ((4, 2, 100, 8), "global_batch_size=100 is not divisible by micro_batch_size (8) x data-parallel size (2) "
                     "= 16; choose a multiple of 16 (e.g. 96 or 112)"),
    ((8, 1, 4, 1), "global_batch_size=4 is not divisible by micro_batch_size (1) x data-parallel size (8) "
                   "= 8; choose a multiple of 8 (e.g. 8)"),
    ((0, 1, 8, 1), "world_size=0: must be a positive integer"),
    ((8, 1, 8, 0), "micro_batch_size=0: must be a positive integer"),
])
def test_check_launch_errors(args, message):
    with pytest.raises(LaunchError) as info:
        check_launch(*args)
    assert str(info.value).startswith(message), str(info.value)
