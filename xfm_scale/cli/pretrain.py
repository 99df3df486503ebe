#!/usr/bin/env python
"""X-FM pre-training entry point.

    deepspeed launchers/pretrain_large.py --hostfile HOSTFILE --config RUN.yaml [--set key=value ...]
    deepspeed --num_gpus 8 launchers/pretrain_large.py --config RUN.yaml
    torchrun --nnodes 2 --nproc_per_node 8 ... launchers/pretrain_large.py --config RUN.yaml
    python launchers/pretrain_large.py --check --config RUN.yaml [--hostfile H | --num_gpus N]

Every rank loads and validates the run config before it touches the process group, so a bad
config fails at once with a message naming the fix. ``--check`` validates without starting ranks
(hostfile, TP size vs ranks, batch divisibility, config keys and value ranges, data paths and the
blend spec's corpora, init folders): the sweep script and cluster users run it before submitting.

Exit codes: 0 finished (or stopped at train.stop_at_step), 2 bad input (the message names the fix),
3 the run stopped itself after saving a checkpoint (too many skipped non-finite steps or bad
samples) or a checkpoint could not be saved (disk full: the previous one is intact); a crash or a
killed rank gives another non-zero code, and relaunching the same command resumes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from xfm_scale.quiet import silence_known_noise
from xfm_scale.runfolder import FINAL_METRICS, RunFolder


def parse_args(argv=None, default_config: str | None = None):
    parser = argparse.ArgumentParser(description="X-FM pre-training (DeepSpeed ZeRO-3 + megatron TP)")
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="run config YAML (launchers/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config field, e.g. --set optim.lr=2e-4 (repeatable)")
    parser.add_argument("--output-dir", help="shortcut for --set train.output_dir=DIR")
    parser.add_argument("--check", action="store_true", help="validate the launch and exit (starts no rank)")
    parser.add_argument("--hostfile", help="with --check: the DeepSpeed hostfile the job will use")
    parser.add_argument("--num_gpus", type=int, help="with --check: ranks per node without a hostfile")
    parser.add_argument("--num_nodes", type=int, help="with --check: nodes used from the hostfile")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed's runner adds it
    return parser.parse_args(argv)


def load_config(args):
    from xfm_scale.config import run as run_config

    overrides = run_config.parse_overrides(args.set)
    if args.output_dir:
        overrides["train.output_dir"] = args.output_dir
    return run_config.load(args.config, overrides)


def check_launch(args, cfg) -> int:
    from xfm_scale.launch.hostfile import check_launch as check_layout, world_size_from

    from xfm_scale.interop.pretrained import check_init_sources

    world = world_size_from(hostfile=args.hostfile, num_nodes=args.num_nodes, num_gpus=args.num_gpus)
    check_layout(world, cfg.parallel.tensor_parallel_size, cfg.batch.global_batch_size, cfg.batch.micro_batch_size)
    sources = check_init_sources(cfg.model)  # first: a missing checkpoint gets its download hint
    cfg.validate(world)
    print(f"ok: {world} ranks, TP={cfg.parallel.tensor_parallel_size}, "
          f"DP={world // cfg.parallel.tensor_parallel_size}, global batch {cfg.batch.global_batch_size}")
    for line in sources:
        print(line)
    return 0


SETUP_ERROR_GRACE_S = 10.0
"""How long a rank other than 0 waits before reporting a set-up error itself (see
report_setup_error)."""


def report_setup_error(err: Exception, rank: int) -> None:
    """Every rank validates the same run config, so rank 0 reports a set-up error once for all. A
    rank that found it first must not exit at once: the launcher (torchrun, DeepSpeed's) would then
    stop rank 0 before it printed, and the job would end with no message. So the other ranks wait;
    if rank 0 failed too, the launcher stops them meanwhile, and if it did not (say a path missing
    on this node only), they report the error themselves, naming their rank."""
    if rank == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return
    time.sleep(SETUP_ERROR_GRACE_S)
    print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)


def finished_already(cfg) -> bool:
    """Whether this run already finished (relaunching the same command): final metrics written
    and its newest checkpoint at train.steps."""
    folder = RunFolder(Path(cfg.train.output_dir))
    return cfg.train.resume and folder.finished() and folder.latest_complete() == cfg.train.steps


def main(argv=None, default_config: str | None = None) -> int:
    """The entry point; ``default_config``: the run config when --config is not given
    (launchers/pretrain_base.py passes launchers/configs/base.yaml)."""
    from xfm_scale.config import ConfigError

    silence_known_noise()
    args = parse_args(argv, default_config)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args)
        if args.check:
            return check_launch(args, cfg)
        from xfm_scale.interop.pretrained import check_init_sources

        if rank == 0:  # one reader of the pretrained files' headers; rank 0 reports set-up errors for all
            check_init_sources(cfg.model)  # a missing pretrained checkpoint: its download hint
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group exists
    except (ConfigError, ValueError, FileNotFoundError) as err:
        report_setup_error(err, rank)
        return 2
    if finished_already(cfg):
        if rank == 0:
            print(f"nothing to do: the run in {cfg.train.output_dir} finished at step {cfg.train.steps} "
                  f"({FINAL_METRICS} is there); raise train.steps to train further, or choose another "
                  "train.output_dir", flush=True)
        return 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from xfm_scale.checkpoint.reader import CheckpointError
    from xfm_scale.checkpoint.writer import CheckpointSaveError
    from xfm_scale.data.shards import DataSpecError
    from xfm_scale.train.trainer import Trainer, TrainingStopped

    try:
        Trainer(cfg).run()
    except (ConfigError, DataSpecError, CheckpointError) as err:
        # bad input found only once the ranks are up (a checkpoint or an init folder that does not
        # load, a corpus whose shards disagree with its manifest): the message names the fix
        print(f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointSaveError) as err:  # a diagnosis, not a crash: no traceback
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
