#!/usr/bin/env python
"""pretrain_large.py with the X-FM base defaults (launchers/configs/base.yaml): the reference
recipe (RoBERTa-base + BEiT-v2-B/16 + 12-layer fusion, AdamW 1e-4, warm-up 2,500) on ZeRO-3 bf16.

    deepspeed --hostfile HOSTFILE launchers/pretrain_base.py --set data.spec=... --set data.tokenizer_dir=...
"""
import sys
from pathlib import Path

try:
    from xfm_scale.cli.pretrain import main
except ModuleNotFoundError as err:  # this checkout is not on the path (every rank of every node)
    if err.name != "xfm_scale":
        raise
    print(f"{err}: launch from the repository root with PYTHONPATH=$PWD exported, or pip install -e . there",
          file=sys.stderr)
    sys.exit(2)  # bad input, as for the entry point's own set-up errors

if __name__ == "__main__":
    sys.exit(main(default_config=str(Path(__file__).resolve().parent / "configs" / "base.yaml")))
