#!/usr/bin/env python
"""Thin wrapper: the sweep runner is xfm_scale.cli.sweep (console entry point xfm-sweep).

    python launchers/sweep.py launchers/sweeps/example.yaml [--max-parallel N] [--dry-run]
"""
import sys

from _entry import entry_point  # launchers/_entry.py

main = entry_point("xfm_scale.cli.sweep")

if __name__ == "__main__":
    sys.exit(main())
