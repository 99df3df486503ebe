#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.blend_data (console entry point xfm-blend-data)."""
import sys

from xfm_scale.cli.blend_data import main

if __name__ == "__main__":
    sys.exit(main())
