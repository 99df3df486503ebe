#!/usr/bin/env python
"""pretrain_large.py with the X-FM base defaults (launchers/configs/base.yaml): the reference
recipe (RoBERTa-base + BEiT-v2-B/16 + 12-layer fusion, AdamW 1e-4, warm-up 2,500) on ZeRO-3 bf16.

    deepspeed --hostfile HOSTFILE launchers/pretrain_base.py --set data.spec=... --set data.tokenizer_dir=...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_large  # noqa: E402

pretrain_large.DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.yaml")

if __name__ == "__main__":
    sys.exit(pretrain_large.main())
