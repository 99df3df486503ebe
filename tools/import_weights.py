#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.import_weights (console entry point xfm-import-weights)."""
import sys

from xfm_scale.cli.import_weights import main

if __name__ == "__main__":
    sys.exit(main())
