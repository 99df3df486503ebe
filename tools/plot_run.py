#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.plot_run (console entry point xfm-plot-run)."""
import sys

from xfm_scale.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
