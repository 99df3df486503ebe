#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.demo (console entry point xfm-demo); `make demo` runs it."""
import sys

from xfm_scale.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
