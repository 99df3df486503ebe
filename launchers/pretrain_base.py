#!/usr/bin/env python
"""pretrain_large.py with the X-FM base defaults (launchers/configs/base.yaml): the reference
recipe (RoBERTa-base + BEiT-v2-B/16 + 12-layer fusion, AdamW 1e-4, warm-up 2,500) on ZeRO-3 bf16.

    deepspeed --hostfile HOSTFILE launchers/pretrain_base.py --set data.spec=... --set data.tokenizer_dir=...
"""
import sys
from pathlib import Path

from _entry import entry_point  # launchers/_entry.py

main = entry_point("xfm_scale.cli.pretrain")

if __name__ == "__main__":
    sys.exit(main(default_config=str(Path(__file__).resolve().parent / "configs" / "base.yaml")))
