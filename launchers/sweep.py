#!/usr/bin/env python
"""Thin wrapper: the sweep runner is xfm_scale.cli.sweep (console entry point xfm-sweep).

    python launchers/sweep.py launchers/sweeps/example.yaml [--max-parallel N] [--dry-run]
"""
import sys

try:
    from xfm_scale.cli.sweep import main
except ModuleNotFoundError as err:  # this checkout is not on the path (every rank of every node)
    if err.name != "xfm_scale":
        raise
    print(f"{err}: launch from the repository root with PYTHONPATH=$PWD exported, or pip install -e . there",
          file=sys.stderr)
    sys.exit(2)  # bad input, as for the entry point's own set-up errors

if __name__ == "__main__":
    sys.exit(main())
