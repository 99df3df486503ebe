#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.model_info (console entry point xfm-model-info)."""
import sys

from xfm_scale.cli.model_info import main

if __name__ == "__main__":
    sys.exit(main())
