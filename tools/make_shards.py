#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.make_shards (console entry point xfm-make-shards)."""
import sys

from xfm_scale.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
