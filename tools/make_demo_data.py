#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.make_demo_data (console entry point xfm-make-demo-data)."""
import sys

from xfm_scale.cli.make_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
