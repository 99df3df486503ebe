#!/usr/bin/env python
"""Thin wrapper: the tool is xfm_scale.cli.train_tokenizer (console entry point xfm-train-tokenizer)."""
import sys

from xfm_scale.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
