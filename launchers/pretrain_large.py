#!/usr/bin/env python
"""X-FM pre-training entry point (the code is xfm_scale.cli.pretrain; console entry point xfm-pretrain).

    deepspeed launchers/pretrain_large.py --hostfile HOSTFILE --config RUN.yaml [--set key=value ...]
    deepspeed --num_gpus 8 launchers/pretrain_large.py --config RUN.yaml
    torchrun --nnodes 2 --nproc_per_node 8 ... launchers/pretrain_large.py --config RUN.yaml
    python launchers/pretrain_large.py --check --config RUN.yaml [--hostfile H | --num_gpus N]

Exit codes: 0 finished, 2 bad input (the message names the fix), 3 the run stopped itself after
saving a checkpoint, or a checkpoint could not be saved; relaunching the same command resumes.
"""
import sys

from _entry import entry_point  # launchers/_entry.py

main = entry_point("xfm_scale.cli.pretrain")

if __name__ == "__main__":
    sys.exit(main())
