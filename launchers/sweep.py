#!/usr/bin/env python
"""Thin wrapper: the sweep runner is xfm_scale.cli.sweep (console entry point xfm-sweep).

    python launchers/sweep.py launchers/sweeps/example.yaml [--max-parallel N] [--dry-run]
"""
import sys

from xfm_scale.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
